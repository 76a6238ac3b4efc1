"""The embedded default data set: scikit-learn's 8x8 handwritten digits (no download).

Train on digits 0-4 (and their rotations as extra classes), evaluate retrieval on the unseen
digits 5-9. Images live in memory as normalised tensors; :func:`digits_transform` maps any
image to the same input, for embedding new images with a digits model.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from idml.data.images import to_storage_mode
from idml.data.splits import LabeledTensors, RetrievalSplits, carve_validation

#: Names of the classes (the digit of each label).
DIGIT_NAMES = [str(d) for d in range(10)]
#: Items of the embedded digits have no file; they are named ``digits/<split>/<index>``.
DIGITS_PREFIX = "digits/"
_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read once per process: images ``[1797, 8, 8]`` (0..16) and
    targets (its loader parses a CSV each call: ~18 ms)."""
    bunch = load_digits()
    for array in (bunch.images, bunch.target):
        array.flags.writeable = False
    return bunch.images, bunch.target


def digit_path(split: str, index: int) -> str:
    """The name of image ``index`` of ``split`` (``train``: digits 0-4 without the rotated
    copies; ``test``: 5-9), as embeddings and indexes record it."""
    return f"{DIGITS_PREFIX}{split}/{index:04d}"


def digit_image(name: str) -> Image.Image | None:
    """The 8x8 grey image (ink light, 0..255) named ``name`` by :func:`digit_path`, or
    ``None`` if ``name`` names no digit."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] + "/" != DIGITS_PREFIX or parts[1] not in _SPLITS \
            or not parts[2].isascii() or not parts[2].isdigit():
        return None
    images, target = _raw_digits()
    chosen = images[(target < 5) == (parts[1] == "train")]
    index = int(parts[2])
    if index >= len(chosen):
        return None
    pixels = np.asarray(chosen[index], dtype=np.float64) * 255.0 / 16.0
    return Image.fromarray(pixels.round().astype(np.uint8), mode="L")


def add_rotation_classes(train: LabeledTensors) -> LabeledTensors:
    """Add each training image rotated by 90, 180 and 270 degrees as three *new* classes.

    Class expansion by rotation, as in few-shot work on Omniglot (Santoro et al. 2016): with
    only five training digits, a model learns features that separate those five and little
    else, and the untrained network's pixel-like features retrieve the unseen digits better
    (measured: recall@1 and MAP@R fell with training on 0-4 alone); twenty classes teach
    stroke features that transfer. Labels ``c + k * C`` for rotation ``k``.
    """
    num = int(train.labels.max()) + 1
    images = [torch.rot90(train.images, k, dims=(2, 3)) for k in range(4)]
    labels = [train.labels + k * num for k in range(4)]
    return LabeledTensors(torch.cat(images), torch.cat(labels))


def load_digits_splits(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    val_fraction: float = 0.0,
    rotation_classes: bool = True,
) -> RetrievalSplits:
    """scikit-learn's bundled 8x8 handwritten digits: train on 0-4, test on unseen 5-9.

    1,797 grayscale images, no download; pixels (0..16) are scaled to [0, 1], then normalised
    with the model's ``mean``/``std``. ``rotation_classes``: see :func:`add_rotation_classes`
    (applied after the validation split, to the training digits only; test is untouched).
    """
    raw, target = _raw_digits()
    images = torch.from_numpy(np.asarray(raw, dtype=np.float32) / 16.0).unsqueeze(1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images - m) / sd
    labels = torch.from_numpy(np.array(target, dtype=np.int64))
    is_train = labels < 5
    train, val = carve_validation(LabeledTensors(images[is_train], labels[is_train]), val_fraction)
    if rotation_classes:
        train = add_rotation_classes(train)
    return RetrievalSplits(
        train=train,
        test=LabeledTensors(images[~is_train], labels[~is_train]),
        num_train_classes=int(train.labels.max()) + 1,
        val=val,
        in_memory=True,
    )


def digits_transform(spec: dict[str, Any]) -> Any:
    """PIL image -> normalised ``[C, 8, 8]`` as the embedded digits are fed to the model.

    scikit-learn's digits are 32x32 bitmaps counted in 4x4 blocks (0..16, ink high), scaled
    to [0, 1] by :func:`idml.data.splits.load_digits_splits`: the image is converted to grey,
    reduced to 8x8 by area averaging (``BOX``) and 0..255 is scaled to [0, 1], so light strokes on a
    dark background (as the data set stores them) map to high values. No inversion.
    """
    chans, height, width = tuple(spec["input_size"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(-1, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:
        grey = to_storage_mode(img).convert("L").resize((width, height), Image.Resampling.BOX)
        x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0).unsqueeze(0)
        return (x.expand(chans, -1, -1) - mean) / std

    return transform
