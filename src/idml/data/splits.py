"""Data sets with zero-shot retrieval splits (train classes disjoint from test classes)."""

from __future__ import annotations

import dataclasses
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


class NoisyLabels(Dataset):
    """``data`` with some labels replaced (training labels with errors, for experiments).

    ``labels`` are the labels training sees, ``clean_labels`` the true ones; ``flipped`` marks
    the images whose label was changed.
    """

    def __init__(self, data: Dataset, labels: torch.Tensor) -> None:
        self.data, self.labels = data, labels
        self.clean_labels = labels_of(data)
        if len(self.labels) != len(self.clean_labels):
            raise IdmlError(f"{len(self.clean_labels)} images but {len(self.labels)} labels")

    @property
    def flipped(self) -> torch.Tensor:
        """Boolean mask of the images whose label is wrong."""
        return self.labels != self.clean_labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i][0], int(self.labels[i])


def symmetric_label_noise(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Labels with ``round(fraction * N)`` of them (chosen by ``seed``) moved to another
    class drawn uniformly from the rest (symmetric noise among the classes present)."""
    if not 0.0 <= fraction < 1.0:
        raise IdmlError(f"label_noise must be in [0, 1), got {fraction}")
    classes = torch.unique(labels)
    if fraction > 0 and len(classes) < 2:
        raise IdmlError("label noise needs at least two training classes")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=gen)[: round(fraction * len(labels))]
    position = torch.searchsorted(classes, labels[chosen])
    shift = torch.randint(1, max(len(classes), 2), (len(chosen),), generator=gen)
    noisy = labels.clone()
    noisy[chosen] = classes[(position + shift) % len(classes)]
    return noisy


def with_label_noise(splits: RetrievalSplits, fraction: float, seed: int) -> RetrievalSplits:
    """``splits`` whose training set has symmetric label noise (validation and test clean)."""
    if fraction == 0:
        return splits
    noisy = symmetric_label_noise(labels_of(splits.train), fraction, seed)
    return dataclasses.replace(splits, train=NoisyLabels(splits.train, noisy))


def labels_of(data: Dataset) -> torch.Tensor:
    """The integer labels of a data set built here, as a 1-d ``long`` tensor."""
    labels = getattr(data, "labels", None)
    if labels is None:
        labels = data.records.labels  # type: ignore[attr-defined]
    return torch.as_tensor(labels, dtype=torch.long)


def paths_of(data: Dataset) -> list[str] | None:
    """The image file of each item of a data set built here; ``None`` for in-memory data."""
    inner = data.data if isinstance(data, NoisyLabels) else data
    paths = getattr(inner, "paths", None)
    if paths is None and hasattr(inner, "records"):
        paths = inner.records.paths
    return None if paths is None else [str(p) for p in paths]


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
