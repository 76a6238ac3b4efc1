"""Data sets with zero-shot retrieval splits (train classes disjoint from test classes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class LabeledTensors(Dataset):
    """In-memory images ``[N, C, H, W]`` (float, already normalised) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class RetrievalSplits:
    """Train/validation/test sets of one data set; every set has a ``labels`` attribute.

    Train labels are contiguous ``0..num_train_classes-1`` (proxy indices); validation and
    test keep the data set's own ids (only equality matters for retrieval). In-Shop style data
    has ``query``/``gallery`` instead of ``test``. ``in_memory`` marks tensor data sets
    (augmented per batch on the device instead of per image).
    """

    train: Dataset
    test: Dataset | None
    num_train_classes: int
    val: Dataset | None = None
    query: Dataset | None = None
    gallery: Dataset | None = None
    in_memory: bool = False


def labels_of(data: Dataset) -> torch.Tensor:
    """The integer labels of a data set built here, as a 1-d ``long`` tensor."""
    labels = getattr(data, "labels", None)
    if labels is None:
        labels = data.records.labels  # type: ignore[attr-defined]
    return torch.as_tensor(labels, dtype=torch.long)


def remap_labels(labels: torch.Tensor) -> torch.Tensor:
    """Map arbitrary labels to ``0..C-1`` in sorted order of the originals."""
    _, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    return inverse


def validation_mask(labels: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Mask of the items whose class is among the last ``fraction`` of the training classes.

    Class-disjoint, like the test split, so model selection never sees test classes.
    ``None`` when ``fraction`` is 0.
    """
    if fraction <= 0:
        return None
    classes = torch.unique(labels)
    n_val = int(round(fraction * len(classes)))
    if n_val < 2 or n_val > len(classes) - 2:
        raise ValueError(
            f"val_fraction={fraction} leaves {n_val} validation class(es) of {len(classes)}; "
            "need at least 2 for validation and 2 for training"
        )
    return torch.isin(labels, classes[-n_val:])


def carve_validation(
    train: LabeledTensors, fraction: float
) -> tuple[LabeledTensors, LabeledTensors | None]:
    """Split off a class-disjoint validation set (see :func:`validation_mask`)."""
    is_val = validation_mask(train.labels, fraction)
    if is_val is None:
        return train, None
    fit = LabeledTensors(train.images[~is_val], remap_labels(train.labels[~is_val]))
    return fit, LabeledTensors(train.images[is_val], train.labels[is_val])


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
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images - m) / sd
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
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


def _subset(records: Any, mask: list[bool]) -> Any:
    """The records where ``mask`` is true (a :class:`idml.data.readers.Records`)."""
    keep = [i for i, m in enumerate(mask) if m]
    return type(records)([records.paths[i] for i in keep], [records.labels[i] for i in keep])


def load_image_splits(
    name: str,
    root: str | None,
    *,
    input_spec: dict[str, Any],
    image_size: int,
    train_classes: str | None = None,
    csv: str | None = None,
    val_fraction: float = 0.0,
    augment: bool = True,
    cache: bool = True,
    skip_bad_images: bool = False,
    log: Callable[[str], None] = print,
) -> RetrievalSplits:
    """Read an image data set from disk, check every image, and build the split data sets.

    Every image is decoded once before training starts, so a broken file stops the run here
    (naming it) rather than mid-epoch; with ``skip_bad_images`` it is dropped and counted.
    With ``cache`` images are decoded once, downscaled to the short side the test transform
    needs, and kept (and persisted under the idml cache folder) as uint8 tensors: the paper's
    transforms then run on small tensors instead of full JPEG decodes every epoch.
    """
    from idml.data.images import (
        CachedImageDataset,
        ImageDataset,
        build_transforms,
        cache_images,
        test_crop_fraction,
    )
    from idml.data.readers import DatasetError, Records, cache_root, read_dataset, validate_images

    if root is None and name == "csv" and csv is not None:
        root, csv = csv, None  # the manifest alone: its paths are relative to its folder
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root (the folder that holds it)")
    parts = read_dataset(name, root, train_classes=train_classes, csv=csv).parts()
    for part, records in parts.items():
        good, bad = validate_images(records, skip_bad=skip_bad_images)
        if bad:
            log(f"skipped {len(bad)} unreadable image(s) of {len(records)} in the {part} split "
                f"(first: {bad[0][0]}: {bad[0][1]})")
            if len(good.classes) < 2:
                raise DatasetError(f"the {part} split of {root} has fewer than 2 classes left")
        parts[part] = good

    short_side = round(image_size / test_crop_fraction(input_spec))

    def make(records: Records, train: bool) -> Dataset:
        transform = build_transforms(input_spec, image_size, train=train and augment)
        if not cache:
            return ImageDataset(records, transform)
        decoded = cache_images(records, short_side, cache_dir=cache_root() / "decoded")
        return CachedImageDataset(decoded, records.labels, transform)

    train = parts["train"]
    is_val = validation_mask(torch.tensor(train.labels), val_fraction)
    val = None
    if is_val is not None:
        val, train = _subset(train, is_val.tolist()), _subset(train, (~is_val).tolist())
    fit = Records(train.paths, remap_labels(torch.tensor(train.labels)).tolist())
    return RetrievalSplits(
        train=make(fit, train=True),
        test=make(parts["test"], train=False) if "test" in parts else None,
        num_train_classes=len(fit.classes),
        val=make(val, train=False) if val is not None else None,
        query=make(parts["query"], train=False) if "query" in parts else None,
        gallery=make(parts["gallery"], train=False) if "gallery" in parts else None,
    )


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    degrees: float = 10.0,
    translate: float = 0.125,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Batched random rotation / shift / zoom of in-memory images (one draw per image).

    For tensor data sets (the embedded digits) where per-image PIL transforms would cost more
    than the model; runs on the images' device. Parameters are drawn on the CPU ``generator``
    so runs are reproducible on any device.
    """
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * degrees)
    zoom = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    shift = (2 * u[:, 2:] - 1) * translate * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(images.device, images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        images, grid, padding_mode="border", align_corners=False
    )
