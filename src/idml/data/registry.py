"""The data sets idml reads, by name: the one list that the config, the CLI and the readers
consult (``--dataset`` choices, input channels, readers and their options, where a data set
lies under a data root), and :func:`read_dataset`, which dispatches through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idml.data import readers
from idml.data.digits import digits_transform
from idml.data.records import DatasetError, DatasetSplits
from idml.data.transforms import build_transforms

#: Environment variable naming a folder that holds data sets under their ``root_names``.
DATA_ROOT_ENV = "IDML_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of idml needs to know about one data set."""

    name: str
    summary: str  #: one line for ``--help``
    reader: Callable[..., DatasetSplits] | None  #: ``reader(root, **options)``; None: embedded
    in_chans: int = 3  #: input channels of a model trained on it
    in_memory: bool = False  #: tensors built in memory (no image files, no data root)
    train_classes: bool = False  #: the reader takes ``train_classes=``
    csv: bool = False  #: the reader takes ``csv=``
    root_names: tuple[str, ...] = ()  #: its folder or file names in a data root, preferred first
    #: ``transform(input_spec)`` for new images at test time; None: the paper's test transform
    pil_transform: Callable[[dict[str, Any]], Callable[[Any], Any]] | None = None


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("digits", "scikit-learn's 8x8 digits, embedded (no download)", None,
                    in_chans=1, in_memory=True, pil_transform=digits_transform),
        DatasetInfo("cub", "CUB-200-2011 (official layout; classes 1-100 / 101-200)",
                    readers.read_cub, root_names=("CUB_200_2011",)),
        DatasetInfo("cars", "Cars196 (cars_annos.mat; classes 1-98 / 99-196)",
                    readers.read_cars, root_names=("cars196",)),
        DatasetInfo("sop", "Stanford Online Products (Ebay_train.txt / Ebay_test.txt)",
                    readers.read_sop, root_names=("Stanford_Online_Products",)),
        DatasetInfo("inshop", "In-Shop clothes (list_eval_partition.txt: query / gallery)",
                    readers.read_inshop, root_names=("InShop",)),
        DatasetInfo("omniglot", "Omniglot (images_background / images_evaluation, or the .tar.gz)",
                    readers.read_omniglot, root_names=("omniglot", "omniglot.tar.gz")),
        DatasetInfo("flowers102", "Oxford Flowers-102 (jpg/ + imagelabels.mat, or NNN.name "
                    "class folders; classes 1-51 / 52-102)",
                    readers.read_flowers102, root_names=("flowers102",)),
        DatasetInfo("folder", "any class-folder tree root/<class>/<image>", readers.read_folder,
                    train_classes=True),
        DatasetInfo("csv", "a CSV manifest path,label[,split]", readers.read_csv,
                    train_classes=True, csv=True),
    )
}
#: The names, in registry order (``--dataset`` choices).
DATASET_NAMES = tuple(DATASETS)


def get_dataset(name: str) -> DatasetInfo:
    """The registry entry of ``name``; an unknown name raises :class:`DatasetError`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {name!r}: dataset= must be one of {', '.join(DATASET_NAMES)}"
        ) from None


def test_transform(name: str, input_spec: dict[str, Any], image_size: int) -> Any:
    """How a PIL image (RGB) is fed at test time to a model trained on data set ``name``."""
    info = get_dataset(name)
    if info.pil_transform is not None:
        return info.pil_transform(input_spec)
    return build_transforms(input_spec, image_size, train=False)


def _taking(option: str) -> str:
    return ", ".join(repr(n) for n, info in DATASETS.items() if getattr(info, option))


def read_dataset(
    name: str,
    root: str | Path,
    *,
    train_classes: str | None = None,
    csv: str | Path | None = None,
) -> DatasetSplits:
    """Read data set ``name`` from ``root`` with its reader (see :mod:`idml.data.readers`).

    ``train_classes`` (``folder`` and split-less ``csv`` only): a fraction such as ``"0.5"``
    (the first half of the sorted classes train, the rest test; the default) or a comma list
    of class names. ``csv``: the manifest path (relative to ``root``); for ``name="csv"``
    ``root`` may also be the manifest itself. Every split must have at least 2 classes.
    """
    info = get_dataset(name)
    if info.reader is None:
        raise DatasetError(f"dataset {name!r} is embedded in idml; there is no root to read")
    if train_classes is not None and not info.train_classes:
        raise DatasetError(f"train_classes applies to {_taking('train_classes')} only, "
                           f"not {name!r}")
    if csv is not None and not info.csv:
        raise DatasetError(f"csv= applies to {_taking('csv')} only, not {name!r}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{name} root {root} does not exist")
    options: dict[str, object] = {"train_classes": train_classes} if info.train_classes else {}
    if info.csv:
        options["csv"] = csv
    splits = info.reader(root, **options)
    for part, records in splits.parts().items():
        n = len(records.classes)
        if n < 2:
            raise DatasetError(
                f"{name} at {root}: the {part} split has {n} class(es) ({len(records)} images); "
                "retrieval needs at least 2"
            )
    return splits


def resolve_data_root(name: str, data_root: str | Path | None) -> Path:
    """Where data set ``name`` lies: ``data_root`` when given, else the first of its
    ``root_names`` that exists under ``$IDML_DATA_ROOT``."""
    if data_root is not None:
        return Path(data_root).expanduser()
    info = get_dataset(name)
    base = os.environ.get(DATA_ROOT_ENV)
    if base and info.root_names:
        for root_name in info.root_names:
            candidate = Path(base).expanduser() / root_name
            if candidate.exists():
                return candidate
        raise DatasetError(
            f"dataset {name!r}: data_root is not given and {DATA_ROOT_ENV}={base} holds none of "
            f"{', '.join(info.root_names)}; pass data_root= (the folder that holds it)"
        )
    where = (f", or set {DATA_ROOT_ENV} to a folder holding {' or '.join(info.root_names)}"
             if info.root_names else f" ({DATA_ROOT_ENV} does not apply: it has no standard name)")
    raise DatasetError(f"dataset {name!r} needs data_root= (the folder that holds it){where}")


def resolve_root(
    name: str, data_root: str | Path | None, csv: str | Path | None
) -> tuple[Path, str | Path | None]:
    """The root to read ``name`` from and the ``csv=`` still to pass to :func:`read_dataset`.

    A ``csv`` manifest given without ``data_root`` is its own root (its paths are relative to
    its folder); otherwise the root is :func:`resolve_data_root`'s.
    """
    if data_root is None and name == "csv" and csv is not None:
        return Path(csv).expanduser(), None
    return resolve_data_root(name, data_root), csv
