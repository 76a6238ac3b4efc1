"""Data-parallel training over several processes (``torchrun``): gloo on CPU, NCCL on GPU.

:class:`Distributed` describes this process's place in the job and holds every collective
that training needs. A plain single-process run gets ``Distributed()`` (one process), where
each method is the identity or a direct call, so :func:`idml.training.run.train` has one code path.

How a step equals the single-process step on the same global batch:

- every process builds the same global batch sequence and takes its slice
  (:class:`idml.data.images.ShardedBatchSampler`);
- :meth:`Distributed.gather` concatenates the embeddings of all processes in rank order with
  autograd, so each process computes the loss of the whole global batch (pair losses and
  their miners, and Proxy-Anchor, see every sample). Its backward sums the gradients of all
  processes: each computes the same loss, so a process's local rows get ``world_size`` times
  their gradient;
- :meth:`Distributed.average_gradients` then averages every gradient over the processes
  (as ``DistributedDataParallel`` does): the model's gradient becomes the sum of the
  per-shard contributions, i.e. the single-process gradient, and the proxies' (identical on
  every process) stay as they are. Parameters, proxies included, therefore get identical
  updates everywhere (:meth:`Distributed.max_parameter_difference` checks it).

What differs from one process:

- mixup partners are drawn within each process's shard (every process draws the same
  ``lam`` and permutation), so with mixup on only the pairing differs;
- random augmentations come from per-process generators (process 0 keeps the
  single-process seeds);
- trainable BatchNorm: on CUDA the model's BatchNorms become ``SyncBatchNorm`` (statistics
  of the global batch). SyncBatchNorm needs CUDA: on the CPU each process normalises
  with its shard's statistics and process 0's running statistics are kept (broadcast after
  every epoch). Frozen BatchNorm (the image presets) is unaffected;
- sums run in another order: float32 rounding, which AdamW can amplify over many steps
  (as it does between two thread counts of one process).

``DistributedDataParallel`` itself is not used: the warm-up switches the backbone's
``requires_grad`` on and off, the semantic metric leaves the uncertainty head without a
gradient, and the proxies live in the loss; DDP's reducer fails on the first two and does not
cover the third. One all-reduce per step after ``backward`` (bucketed) handles all three.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from idml.core.errors import IdmlError

T = TypeVar("T")

#: Collectives wait this long: the other processes wait while process 0 evaluates.
TIMEOUT = timedelta(hours=2)
#: Gradients are all-reduced in flat buckets of at most this many bytes.
BUCKET_BYTES = 64 * 2**20


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward: sum over processes, keep own rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@dataclass(frozen=True)
class Distributed:
    """This process's rank among ``world_size`` processes; one process unless launched so."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        """An initialised process group, else ``torchrun``'s ``WORLD_SIZE``/``RANK``/
        ``LOCAL_RANK``, else a single process."""
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            return cls(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        return cls(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that evaluates, logs and writes the run folder."""
        return self.rank == 0

    def select_device(self, name: str) -> torch.device:
        """``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA is present, else the CPU."""
        if name in ("auto", "cuda") and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise IdmlError(f"process with LOCAL_RANK {self.local_rank} has no GPU: "
                                f"{torch.cuda.device_count()} visible")
            return torch.device("cuda", self.local_rank)
        if name in ("auto", "cpu"):
            return torch.device("cpu")
        if name == "cuda":
            raise IdmlError("device='cuda': no such device on this machine")
        raise IdmlError(f"device={name!r}: with several processes each uses cuda:LOCAL_RANK "
                        "(device='cuda' or 'auto') or the CPU (device='cpu')")

    # --- collectives ------------------------------------------------------------------------

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of every process, in rank order, differentiable (float32 across processes).

        The backward sums the gradients that all processes computed for the gathered rows.
        One process: ``tensor`` itself.
        """
        if not self.enabled:
            return tensor
        return _GatherRows.apply(tensor.float())

    def gather_labels(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like :meth:`gather` for tensors without gradient (labels, indices)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_indices(self, index: torch.Tensor) -> torch.Tensor:
        """Per-process row indices (e.g. a mixup permutation) as indices into gathered rows."""
        return self.gather_labels(index + self.rank * len(index))

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Average ``.grad`` over the processes (parameters without a gradient are skipped:
        they are the same ones on every process)."""
        if not self.enabled:
            return
        open_buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        buckets: list[list[torch.Tensor]] = []
        for g in (p.grad for p in params if p.grad is not None):
            bucket = open_buckets.get((g.dtype, g.device))
            if bucket is None or sum(t.nbytes for t in bucket) + g.nbytes > BUCKET_BYTES:
                bucket = open_buckets[(g.dtype, g.device)] = []
                buckets.append(bucket)
            bucket.append(g)
        for bucket in buckets:  # the same order on every process
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_state(self, *modules: nn.Module) -> None:
        """Give every process the parameters and buffers of process 0."""
        if not self.enabled:
            return
        with torch.no_grad():
            for module in modules:
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def broadcast_buffers(self, *modules: nn.Module) -> None:
        """Process 0's buffers (e.g. BatchNorm running statistics) everywhere."""
        if not self.enabled:
            return
        with torch.no_grad():
            for module in modules:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def max_parameter_difference(self, params: Iterable[torch.Tensor]) -> float:
        """Largest ``|p - p on process 0|`` over ``params`` and processes (0: identical)."""
        if not self.enabled:
            return 0.0
        with torch.no_grad():
            mine = torch.cat([p.detach().float().reshape(-1) for p in params])
            main = mine.clone()
            dist.broadcast(main, src=0)
            diff = (mine - main).abs().max() if mine.numel() else mine.new_zeros(())
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def all_objects(self, obj: T) -> list[T]:
        """``obj`` of every process, in rank order (picklable objects)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on process 0 while the others wait; every process returns its result
        (sent pickled: keep it small).

        An error on process 0 is raised there and, as the same type where possible, on the
        others, so no process is left waiting.
        """
        return self._on_main(fn, share=True)

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on process 0, then on the others (e.g. downloads, caches written once);
        each process returns its own result. An error on process 0 stops all."""
        if not self.enabled:
            return fn()
        result = self._on_main(fn, share=False)
        return result if self.is_main else fn()

    def _on_main(self, fn: Callable[[], T], share: bool) -> T:
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, on every process
                error = exc
        message = None if error is None else f"{type(error).__name__}: {error}"
        box: list[Any] = [message, result if share and error is None else None]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise _remote_error(box[0])
        return result if self.is_main else box[1]  # type: ignore[return-value]


def _remote_error(message: str) -> BaseException:
    """The error of process 0, re-raised on another process (the CLI reports
    ``ValueError``/``OSError`` as a message)."""
    name, _, text = message.partition(": ")
    text = f"{text} (on process 0)"
    kinds = {"ValueError": ValueError, "FileExistsError": FileExistsError,
             "FileNotFoundError": FileNotFoundError, "OSError": OSError}
    return kinds.get(name, RuntimeError)(text if name in kinds else f"process 0: {message}")


@contextmanager
def process_group(ctx: Distributed, device: torch.device) -> Iterator[None]:
    """Initialise the process group for ``ctx`` (NCCL on CUDA, gloo otherwise) unless one
    exists, and destroy the one it created on exit, also on errors.

    Who creates the group for :func:`idml.training.run.train` must import torchvision (e.g.
    ``idml.training.run``) first: imported after ``init_process_group``, torchvision keeps gloo's
    threads alive past ``destroy_process_group`` and the process may abort at exit.
    """
    created = False
    if ctx.enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                device_id=device if device.type == "cuda" else None,
            )
            created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
