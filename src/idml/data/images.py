"""Image pipeline: decoding, checking, a decoded-image cache and the image data sets.

Two interchangeable data sets feed the same transforms: :class:`ImageDataset` decodes files
with PIL on every access; :class:`CachedImageDataset` reads uint8 tensors from a
:class:`DecodedCache` (every image decoded and downscaled once), which is what makes
training affordable on a few CPU cores. Transforms start with ``ToImage`` so both inputs go
through the same tensor operations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from idml.core.errors import IdmlError
from idml.core.io import atomic_path
from idml.data.cache import fingerprint
from idml.data.records import DatasetError, Records

_GREY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "F"})


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


def io_threads() -> int:
    """Threads for image decoding (PIL releases the GIL): a few more than the cores."""
    return min(16, (os.cpu_count() or 1) + 2)


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes completely, else why not.

    ``verify()`` checks structure (and PNG checksums) without decoding; only a full
    ``load()`` notices a truncated JPEG, so both run. JPEGs are decoded at reduced DCT
    scale (``draft``): every byte is still read, at a fraction of the cost.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # PIL raises many types on corrupt files (struct.error, ...)
        return f"{type(err).__name__}: {err}"
    return None


def validate_images(
    records: Records, *, skip_bad: bool, num_threads: int | None = None
) -> tuple[Records, list[tuple[Path, str]]]:
    """Decode every image once; return the records that decode and the ``(path, reason)`` bad.

    With ``skip_bad=False`` the first bad image (in record order) raises :class:`DatasetError`
    naming it; with ``skip_bad=True`` the bad ones are dropped and returned so the caller can
    report how many were skipped. Decoding runs on a thread pool (PIL releases the GIL).
    """
    workers = num_threads or io_threads()
    bad: list[tuple[Path, str]] = []
    keep_paths, keep_labels = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for path, label, reason in zip(
                records.paths, records.labels, pool.map(check_image, records.paths), strict=True
            ):
                if reason is None:
                    keep_paths.append(path)
                    keep_labels.append(label)
                    continue
                if not skip_bad:
                    raise DatasetError(f"image {path} does not decode ({reason})")
                bad.append((path, reason))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return Records(keep_paths, keep_labels), bad


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
            raise IdmlError("inconsistent decoded cache: offsets do not match data/shapes")
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
        """Write atomically (see :func:`idml.core.io.atomic_path`)."""
        state = {
            "format": _CACHE_FORMAT,
            "data": self.data,
            "offsets": self.offsets,
            "shapes": self.shapes,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: Path) -> DecodedCache:
        state = torch.load(path, weights_only=True, mmap=True)
        if state.get("format") != _CACHE_FORMAT:
            raise IdmlError(f"{path}: decoded cache format {state.get('format')!r} unknown")
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

    def __init__(self, cache: DecodedCache, labels: Sequence[int], transform: Any = None,
                 paths: Sequence[Path] | None = None) -> None:
        if len(cache) != len(labels):
            raise IdmlError(f"{len(cache)} cached images but {len(labels)} labels")
        self.cache, self.labels, self.transform = cache, list(labels), transform
        self.paths = list(paths) if paths is not None else None  # where each image came from

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
