"""The training loader: batch order a function of the seed alone, class-balanced batches
(pytorch-metric-learning's MPerClassSampler, seeded), and per-process shards of global batches
for data-parallel training."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from idml.core.errors import IdmlError

_PML_RNG_LOCK = threading.Lock()


def _m_per_class_sampler_class() -> type:
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    class SeededMPerClassSampler(MPerClassSampler):
        """PML's ``MPerClassSampler`` with its own seeded RNG.

        PML draws from the module-level ``c_f.NUMPY_RANDOM`` (the global ``np.random``), so
        its order depends on whatever else used that RNG. Each ``__iter__`` here swaps in
        this sampler's ``RandomState`` while PML builds the (eagerly materialised) index
        list, then restores it: same algorithm, reproducible order per seed, a new order
        each epoch.
        """

        def __init__(self, labels, m, batch_size, length_before_new_iter, seed):
            super().__init__(labels, m, batch_size, length_before_new_iter)
            self.rng = np.random.RandomState(seed)  # noqa: NPY002 -- PML calls the legacy API

        def __iter__(self):
            with _PML_RNG_LOCK:
                saved = c_f.NUMPY_RANDOM
                c_f.NUMPY_RANDOM = self.rng
                try:
                    indices = list(super().__iter__())
                finally:
                    c_f.NUMPY_RANDOM = saved
            return iter(indices)

    return SeededMPerClassSampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` indices from ``sampler``; this process takes its slice.

    Every process draws the same global batches (same sampler, same seed) and keeps rows
    ``[rank * b, (rank + 1) * b)`` with ``b = batch_size / world_size``, so the union over the
    processes of one step is the single-process batch, in rank order. Incomplete last
    batches are dropped. One process: exactly ``BatchSampler(sampler, batch_size, True)``.
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise IdmlError(f"rank {rank} is not in a job of {world_size} processes")
        if batch_size % world_size:
            raise IdmlError(f"batch_size={batch_size} is the global batch and must be "
                            f"divisible by the number of processes ({world_size})")
        self.sampler, self.batch_size = sampler, batch_size
        self.rank, self.world_size = rank, world_size
        self.shard = batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.shard
        for batch in BatchSampler(self.sampler, self.batch_size, drop_last=True):
            yield batch[start:start + self.shard]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]


def _reseed_worker(rank: int, worker_id: int) -> None:
    """Worker seeds of process ``rank`` differ from process 0's (whose are torch's own)."""
    seed = (torch.initial_seed() + 1_000_003 * rank) % 2**63
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- as torch seeds a worker's legacy RNG


def make_train_loader(
    dataset: Dataset,
    labels: Sequence[int],
    batch_size: int,
    m_per_class: int,
    seed: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Training DataLoader whose batch order is a function of ``seed`` alone.

    ``m_per_class > 0``: each batch holds ``batch_size / m_per_class`` classes with
    ``m_per_class`` images each (PML's ``MPerClassSampler``, seeded); an epoch is about
    ``len(labels)`` images. ``m_per_class = 0``: plain shuffled batches. Incomplete last
    batches are dropped. Random augmentations in workers are seeded from the loader's
    generator too.

    ``batch_size`` is the global batch: with ``world_size`` processes, each draws the same
    global batches and yields its slice of ``batch_size / world_size`` (see
    :class:`ShardedBatchSampler`); the index sampler is ``loader.batch_sampler.sampler``.
    Workers of processes other than 0 get their own seeds.
    """
    generator = torch.Generator().manual_seed(seed)
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "generator": generator,
        "persistent_workers": num_workers > 0,
        "worker_init_fn": partial(_reseed_worker, rank) if rank > 0 else None,
    }
    sampler: Sampler[int]
    if m_per_class <= 0:
        sampler = RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]
    else:
        num_classes = len(set(int(y) for y in labels))
        if batch_size % m_per_class:
            raise IdmlError(f"m_per_class={m_per_class} must divide batch_size={batch_size}")
        if m_per_class * num_classes < batch_size:
            raise IdmlError(
                f"batch_size={batch_size} needs {batch_size // m_per_class} classes at "
                f"m_per_class={m_per_class}, but the training set has {num_classes}"
            )
        if len(labels) != len(dataset):  # type: ignore[arg-type]
            raise IdmlError(f"{len(labels)} labels for a dataset of {len(dataset)}")  # type: ignore[arg-type]
        sampler = _m_per_class_sampler_class()(
            np.asarray(labels), m_per_class, batch_size, max(len(labels), batch_size), seed
        )
    batches = ShardedBatchSampler(sampler, batch_size, rank, world_size)
    return DataLoader(dataset, batch_sampler=batches, **common)
