"""Thumbnails of indexed items: made once, at index time, from the rawest image available.

An item's image is its file, or for the embedded digits (which have no files) the 8x8 bitmap
its name points to (:func:`idml.data.digits.digit_image`). Thumbnails are encoded (JPEG for
photos, PNG for small or upscaled images) and packed into one byte array with offsets (an
index folder's ``thumbnails.npy``, memory-mapped when served, and ``thumbnail_offsets.npy``),
so a server never opens a path to show an item.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from idml.data.digits import DIGITS_PREFIX, digit_image
from idml.data.images import io_threads, load_rgb

#: Longest side of a thumbnail in pixels; smaller images are upscaled (nearest) to MIN_THUMB.
MAX_THUMB = 112
MIN_THUMB = 64
JPEG_QUALITY = 85
_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def fit_thumbnail(img: Image.Image) -> Image.Image:
    """``img`` scaled down to at most ``MAX_THUMB`` a side, or tiny images (the digits) up to
    at least ``MIN_THUMB`` by whole-pixel (nearest) steps, so strokes stay sharp."""
    side = max(img.size)
    if side > MAX_THUMB:
        img = img.copy()
        img.thumbnail((MAX_THUMB, MAX_THUMB))
    elif side < MIN_THUMB:
        factor = math.ceil(MIN_THUMB / side)
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    return img


def item_image(path: str) -> Image.Image | None:
    """The image of an indexed item: a digit's bitmap or the file at ``path``; ``None`` if
    there is none to read (a missing or unreadable file)."""
    if path.startswith(DIGITS_PREFIX):
        found = digit_image(path)
        if found is not None:
            return found
    try:
        return load_rgb(path)
    except Exception:  # PIL raises many types for corrupt files; the item gets no thumbnail
        return None


def encode_thumbnail(img: Image.Image) -> bytes:
    """``fit_thumbnail(img)`` as PNG (small or single-channel images) or JPEG (photos)."""
    small = max(img.size) <= MIN_THUMB
    img = fit_thumbnail(img)
    buf = io.BytesIO()
    if small or img.mode == "L":
        img.save(buf, format="PNG", optimize=True)
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def mime_of(blob: bytes) -> str:
    """The MIME type of an encoded thumbnail, by its first bytes."""
    return next((m for magic, m in _MIME.items() if blob.startswith(magic)),
                "application/octet-stream")


def item_thumbnail(path: str) -> bytes | None:
    """The encoded thumbnail of the item at ``path`` (:func:`item_image`), ``None`` if its
    image cannot be read."""
    img = item_image(path)
    return None if img is None else encode_thumbnail(img)


@functools.lru_cache(maxsize=4096)
def file_thumbnail(path: str) -> tuple[bytes, str] | None:
    """The thumbnail of an indexed item made now from its image (:func:`item_image`), for
    indexes built without thumbnails; ``None`` if the image cannot be read. The last 4,096
    are kept (a few KB each)."""
    blob = item_thumbnail(path)
    return None if blob is None else (blob, mime_of(blob))


@dataclass
class Thumbnails:
    """Encoded thumbnails of ``len(offsets) - 1`` items; an empty slice: no thumbnail."""

    data: np.ndarray  #: uint8, every thumbnail's bytes, one after another
    offsets: np.ndarray  #: int64 ``[N + 1]``, item ``i`` is ``data[offsets[i]:offsets[i+1]]``

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def missing(self) -> int:
        """Items without a thumbnail."""
        return int((np.diff(self.offsets) == 0).sum())

    def get(self, i: int) -> tuple[bytes, str] | None:
        """Item ``i``'s thumbnail and its MIME type, or ``None`` if it has none."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if end == start:
            return None
        blob = self.data[start:end].tobytes()
        return blob, mime_of(blob)

    def has(self, i: int) -> bool:
        """Whether item ``i`` has a thumbnail."""
        return bool(self.offsets[i + 1] > self.offsets[i])

    @classmethod
    def pack(cls, encoded: Sequence[bytes | None]) -> Thumbnails:
        """Pack one encoded thumbnail (or ``None``) per item."""
        sizes = [0 if b is None else len(b) for b in encoded]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        data = np.frombuffer(b"".join(b for b in encoded if b), dtype=np.uint8)
        return cls(data, offsets)

    def check(self, count: int) -> list[str]:
        """What is wrong with these arrays for an index of ``count`` items."""
        if self.data.dtype != np.uint8 or self.data.ndim != 1:
            return ["thumbnail data is not a flat uint8 array"]
        o = self.offsets
        if o.ndim != 1 or len(o) != count + 1:
            return [f"thumbnail offsets hold {len(o) - 1} items, the index {count}"]
        if o[0] != 0 or o[-1] != len(self.data) or (np.diff(o) < 0).any():
            return ["thumbnail offsets are not increasing from 0 to the data's end"]
        return []


def make_thumbnails(paths: Sequence[str]) -> Thumbnails:
    """Thumbnails of the items at ``paths`` (:func:`item_thumbnail`), decoded in threads."""
    with ThreadPoolExecutor(max_workers=io_threads()) as pool:
        return Thumbnails.pack(list(pool.map(item_thumbnail, paths)))
