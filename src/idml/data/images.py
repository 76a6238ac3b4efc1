"""Image pipeline: decoding, transforms, a decoded-image cache and the training loader.

Two interchangeable data sets feed the same transforms: :class:`ImageDataset` decodes files
with PIL on every access; :class:`CachedImageDataset` reads uint8 tensors from a
:class:`DecodedCache` (every image decoded and downscaled once), which is what makes
training affordable on a few CPU cores. Transforms start with ``ToImage`` so both inputs go
through the same tensor operations.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from torchvision.transforms import InterpolationMode, v2

from idml.data.readers import DatasetError, Records, fingerprint, io_threads

_GREY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "F"})
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )


def to_storage_mode(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit grey (``L``) or ``RGB``; transparency is composited onto white.

    Grey sources (including Omniglot's 1-bit PNGs) stay single-channel so a cache of them
    takes a third of the memory; :func:`to_rgb` replicates the channel.
    """
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _GREY_MODES:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 3-channel RGB (grey replicated, transparency over white)."""
    img = to_storage_mode(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode the image at ``path`` completely, as RGB."""
    with Image.open(path) as img:
        img.load()  # decode before the file closes (to_rgb may return img itself)
        return to_rgb(img)


class ImageDataset(Dataset):
    """``(transform(rgb image), label)`` for each record, decoded with PIL on access."""

    def __init__(self, records: Records, transform: Any = None) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = load_rgb(self.records.paths[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.records.labels[i])


def test_crop_fraction(input_spec: dict[str, Any]) -> float:
    """Fraction of the resized test image that the centre crop keeps (timm's ``crop_pct``)."""
    return float(input_spec.get("crop_pct") or 0.875)


def build_transforms(input_spec: dict[str, Any], image_size: int, train: bool) -> v2.Compose:
    """The paper's augmentation, for PIL images or uint8 ``[C, H, W]`` tensors.

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip. Test: resize the short side to
    ``round(image_size / crop_pct)`` then centre-crop ``image_size`` (256 -> 224 at the
    default ``crop_pct`` 0.875). Then float in [0, 1] normalised with the spec's mean/std
    (and ``interpolation`` from the spec, default bilinear). A single-channel spec
    (``input_size[0] == 1``) gets grey inputs.
    """
    interpolation = _INTERPOLATIONS.get(
        str(input_spec.get("interpolation", "bilinear")), InterpolationMode.BILINEAR
    )
    steps: list[Any] = [v2.ToImage()]
    if train:
        steps += [
            v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        crop_pct = test_crop_fraction(input_spec)
        steps += [
            v2.Resize(round(image_size / crop_pct), interpolation=interpolation, antialias=True),
            v2.CenterCrop(image_size),
        ]
    if tuple(input_spec.get("input_size", (3,)))[0] == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(input_spec["mean"]), std=list(input_spec["std"])),
    ]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------------------------
# Decoded-image cache

_CACHE_FORMAT = 1


def _target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size with the short side at ``short_side``, aspect kept; never enlarged."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    scale = short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(path: str | Path, short_side: int) -> torch.Tensor:
    """uint8 ``[C, H, W]`` (C = 1 for grey sources, else 3), short side <= ``short_side``.

    Large JPEGs are decoded at a reduced DCT scale first (``draft``, never below the target),
    then resized with PIL's antialiased bicubic filter.
    """
    with Image.open(path) as img:
        size = _target_size(img.width, img.height, short_side)
        if img.format == "JPEG" and size != img.size:
            img.draft(img.mode, size)
        img = to_storage_mode(img)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class DecodedCache:
    """Decoded images packed in one uint8 buffer: ``cache[i]`` is a ``[C, H, W]`` view.

    One storage (rather than one tensor per image) saves and loads quickly, can be
    memory-mapped, and is shared by DataLoader workers without copying.
    """

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor) -> None:
        if len(offsets) != len(shapes) + 1 or int(offsets[-1]) != data.numel():
            raise ValueError("inconsistent decoded cache: offsets do not match data/shapes")
        self.data, self.offsets, self.shapes = data, offsets, shapes

    @classmethod
    def from_tensors(cls, images: Sequence[torch.Tensor]) -> DecodedCache:
        shapes = torch.tensor([list(t.shape) for t in images], dtype=torch.int64).view(-1, 3)
        sizes = shapes.prod(dim=1)
        offsets = torch.zeros(len(images) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(sizes, 0)
        data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        for i, t in enumerate(images):
            data[int(offsets[i]) : int(offsets[i + 1])] = t.reshape(-1)
        return cls(data, offsets, shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.data[start:stop].view(*self.shapes[i].tolist())

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(fd)
        try:
            state = {
                "format": _CACHE_FORMAT,
                "data": self.data,
                "offsets": self.offsets,
                "shapes": self.shapes,
            }
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: Path) -> DecodedCache:
        state = torch.load(path, weights_only=True, mmap=True)
        if state.get("format") != _CACHE_FORMAT:
            raise ValueError(f"{path}: decoded cache format {state.get('format')!r} unknown")
        return cls(state["data"], state["offsets"], state["shapes"])


def decoded_cache_path(records: Records, short_side: int, cache_dir: str | Path) -> Path:
    """Cache file keyed by the images' paths, sizes and mtimes and by ``short_side``."""
    key = fingerprint(records.paths, "decoded", _CACHE_FORMAT, short_side)
    return Path(cache_dir) / f"decoded-s{short_side}-{key[:20]}.pt"


def cache_images(
    records: Records,
    short_side: int,
    num_threads: int | None = None,
    cache_dir: str | Path | None = None,
) -> DecodedCache:
    """Decode every image once (downscaled so its short side is at most ``short_side``).

    With ``cache_dir`` the result is stored there and later calls with the same images
    (paths, sizes, mtimes) and ``short_side`` load the file instead of decoding.
    """
    path = decoded_cache_path(records, short_side, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cache = DecodedCache.load(path)
            if len(cache) == len(records):
                return cache
        except Exception:  # a damaged cache file is rebuilt, not fatal
            pass
    workers = num_threads or io_threads()

    def decode(p: Path) -> torch.Tensor:
        try:
            return decode_image(p, short_side)
        except Exception as err:
            raise DatasetError(f"image {p} does not decode ({type(err).__name__}: {err})") from err

    with ThreadPoolExecutor(max_workers=workers) as pool:
        cache = DecodedCache.from_tensors(list(pool.map(decode, records.paths)))
    if path is not None:
        cache.save(path)
    return cache


class CachedImageDataset(Dataset):
    """:class:`ImageDataset` over a :class:`DecodedCache`: ``(transform(uint8 RGB), label)``."""

    def __init__(self, cache: DecodedCache, labels: Sequence[int], transform: Any = None) -> None:
        if len(cache) != len(labels):
            raise ValueError(f"{len(cache)} cached images but {len(labels)} labels")
        self.cache, self.labels, self.transform = cache, list(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.cache[i]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        img = img.contiguous()  # also copies out of a memory-mapped buffer
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def loader_throughput(
    dataset: Dataset, batch_size: int, num_workers: int, max_batches: int
) -> float:
    """Images per second delivered by a DataLoader over ``dataset`` (no model).

    The first batch (worker start-up) is not timed when more than one batch is read.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    count, start = 0, None
    for i, (images, _) in enumerate(loader):
        if i == 0 and max_batches > 1:
            start = time.perf_counter()
            continue
        if start is None:
            start = time.perf_counter()
        count += len(images)
        if i + 1 >= max_batches:
            break
    if start is None or count == 0:
        return 0.0
    return count / max(time.perf_counter() - start, 1e-9)


# ----------------------------------------------------------------------------------------------
# Training loader

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
            raise ValueError(f"rank {rank} is not in a job of {world_size} processes")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is the global batch and must be "
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
            raise ValueError(f"m_per_class={m_per_class} must divide batch_size={batch_size}")
        if m_per_class * num_classes < batch_size:
            raise ValueError(
                f"batch_size={batch_size} needs {batch_size // m_per_class} classes at "
                f"m_per_class={m_per_class}, but the training set has {num_classes}"
            )
        if len(labels) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(labels)} labels for a dataset of {len(dataset)}")  # type: ignore[arg-type]
        sampler = _m_per_class_sampler_class()(
            np.asarray(labels), m_per_class, batch_size, max(len(labels), batch_size), seed
        )
    batches = ShardedBatchSampler(sampler, batch_size, rank, world_size)
    return DataLoader(dataset, batch_sampler=batches, **common)
