"""Data sets with zero-shot retrieval splits (train classes disjoint from test classes)."""

from __future__ import annotations

from dataclasses import dataclass

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
    """Train/validation/test sets of one data set.

    Train labels are contiguous ``0..num_train_classes-1`` (proxy indices); validation and
    test keep their own labels (only equality matters for retrieval).
    """

    train: LabeledTensors
    test: LabeledTensors
    num_train_classes: int
    val: LabeledTensors | None = None
    in_chans: int = 3


def remap_labels(labels: torch.Tensor) -> torch.Tensor:
    """Map arbitrary labels to ``0..C-1`` in sorted order of the originals."""
    _, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    return inverse


def carve_validation(
    train: LabeledTensors, fraction: float
) -> tuple[LabeledTensors, LabeledTensors | None]:
    """Split off the last ``fraction`` of the training *classes* as a validation set.

    Class-disjoint, like the test split, so model selection never sees test classes.
    """
    if fraction <= 0:
        return train, None
    classes = torch.unique(train.labels)
    n_val = int(round(fraction * len(classes)))
    if n_val < 2 or n_val > len(classes) - 2:
        raise ValueError(
            f"val_fraction={fraction} leaves {n_val} validation class(es) of {len(classes)}; "
            "need at least 2 for validation and 2 for training"
        )
    val_classes = classes[-n_val:]
    is_val = torch.isin(train.labels, val_classes)
    fit = LabeledTensors(train.images[~is_val], remap_labels(train.labels[~is_val]))
    return fit, LabeledTensors(train.images[is_val], train.labels[is_val])


def normalize_splits(
    splits: RetrievalSplits, mean: tuple[float, ...], std: tuple[float, ...]
) -> RetrievalSplits:
    """Normalise every in-memory split with the model's input mean/std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for part in (splits.train, splits.val, splits.test):
        if part is not None:
            part.images = (part.images - m) / s
    return splits


def load_digits_splits() -> RetrievalSplits:
    """scikit-learn's bundled 8x8 handwritten digits: train on 0-4, test on unseen 5-9.

    1,797 grayscale images, no download; pixels (0..16) are scaled to [0, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    is_train = labels < 5
    return RetrievalSplits(
        train=LabeledTensors(images[is_train], labels[is_train]),
        test=LabeledTensors(images[~is_train], labels[~is_train]),
        num_train_classes=5,
        in_chans=1,
    )


def load_splits(name: str, *, val_fraction: float = 0.0) -> RetrievalSplits:
    """Load a data set by name and apply the class-disjoint validation split."""
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; available: digits")
    splits = load_digits_splits()
    splits.train, splits.val = carve_validation(splits.train, val_fraction)
    splits.num_train_classes = int(splits.train.labels.max()) + 1
    return splits


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
