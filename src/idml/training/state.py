"""What ``last.pt`` holds to resume a run exactly: :class:`ResumeState` and the random states.

A run draws from the global torch, NumPy and Python generators, the loader's generator, the
m-per-class sampler's ``RandomState``, the mixup and augmentation generators and (on GPUs)
the CUDA generators; all of them are saved after every epoch, in types that
``torch.load(weights_only=True)`` accepts, so a killed run continues as if never stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from idml.core.config import RunConfig
from idml.core.runtime import seed_everything


@dataclass
class ResumeState:
    """Everything a run needs to continue after ``epoch`` completed epochs."""

    config: dict[str, Any]  #: the resolved config (plain types)
    epoch: int  #: completed epochs
    model: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]  #: proxies and other loss parameters
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]  #: process 0's random states (:func:`rng_state`)
    initial: dict[str, float]  #: metrics before training
    history: list[dict[str, Any]]  #: one record per completed epoch
    best: dict[str, Any] | None  #: ``{"score", "state"}`` of the best validation epoch
    world_size: int = 1  #: processes that trained it
    rank_rng: list[dict[str, Any]] | None = None  #: every process's random states

    def to_payload(self) -> dict[str, Any]:
        """A plain dict for :func:`idml.core.checkpoint.save_checkpoint`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> ResumeState:
        """Inverse of :meth:`to_payload` (extra checkpoint keys such as the format marker are
        ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _numpy_state_out(state: tuple) -> tuple:
    """A NumPy ``RandomState`` state with its key array as a tensor (``weights_only``-safe)."""
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss


def _numpy_state_in(state: tuple) -> tuple:
    """Inverse of :func:`_numpy_state_out`."""
    name, keys, pos, has_gauss, gauss = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


def _index_sampler(loader: DataLoader) -> Any:
    """The sampler that draws the (global) index order of a training loader."""
    return getattr(loader.batch_sampler, "sampler", loader.sampler)


def rng_state(loader: DataLoader, generators: list[torch.Generator]) -> dict[str, Any]:
    """Every random state a run draws from, in types ``weights_only`` loading accepts."""
    sampler_rng = getattr(_index_sampler(loader), "rng", None)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_out(np.random.get_state()),  # noqa: NPY002 -- legacy state
        "python": random.getstate(),
        "loader": loader.generator.get_state() if loader.generator is not None else None,
        "generators": [g.get_state() for g in generators],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sampler_rng is not None:
        state["sampler"] = _numpy_state_out(sampler_rng.get_state())
    return state


def set_rng_state(state: dict[str, Any], loader: DataLoader,
                  generators: list[torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_in(state["numpy"]))  # noqa: NPY002 -- legacy state
    random.setstate(state["python"])
    if state["loader"] is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
    for gen, gen_state in zip(generators, state["generators"], strict=True):
        gen.set_state(gen_state)
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "sampler" in state:
        _index_sampler(loader).rng.set_state(_numpy_state_in(state["sampler"]))


def process_seeds(cfg: RunConfig, rank: int, salt: int = 0) -> tuple[int, int]:
    """Seeds of the global RNGs and of the augmentation generator of process ``rank``.

    Process 0 keeps the single-process seeds (``cfg.seed``, ``cfg.seed + 2``); the others get
    their own, far apart, so their random augmentations differ.
    """
    if rank == 0 and salt == 0:
        return cfg.seed, cfg.seed + 2
    return cfg.seed + 1_000_003 * rank + salt, cfg.seed + 2 + 1_000_033 * rank + salt


def restore_rng(state: ResumeState, rank: int, world_size: int, cfg: RunConfig,
                loader: DataLoader, generators: list[torch.Generator]) -> str | None:
    """Every random state of a saved run; per-process ones where it had as many processes.

    Returns a note for the log when the number of processes changed (the same global batches
    follow; per-process augmentation streams restart), else ``None``.
    """
    if world_size > 1 and state.world_size == world_size:
        set_rng_state(state.rank_rng[rank], loader, generators)  # type: ignore[index]
        return None
    # The sampler, loader and mixup states are the same on every process: take process 0's.
    set_rng_state(state.rng, loader, generators)
    if state.world_size == world_size:
        return None
    if rank > 0:
        seed, aug_seed = process_seeds(cfg, rank, salt=7919 * state.epoch)
        seed_everything(seed)
        generators[1].manual_seed(aug_seed)
    return (f"resuming with {world_size} process(es) a run saved with {state.world_size}: the "
            "same global batches follow; per-process augmentation streams restart")
