"""Data sets with zero-shot retrieval splits (train classes disjoint from test classes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from idml.core.errors import IdmlError


class LabeledTensors(Dataset):
    """In-memory images ``[N, C, H, W]`` (float, already normalised) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise IdmlError(f"{len(images)} images but {len(labels)} labels")
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
        raise IdmlError(
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
