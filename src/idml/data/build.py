"""A run's data: the splits its config describes, read, checked and cached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from idml.core.config import RunConfig
from idml.data.cache import cache_root
from idml.data.digits import load_digits_splits
from idml.data.duplicates import drop_duplicates, split_keys
from idml.data.images import CachedImageDataset, ImageDataset, cache_images, validate_images
from idml.data.records import DatasetError, Records
from idml.data.registry import get_dataset, read_dataset, resolve_root
from idml.data.splits import RetrievalSplits, remap_labels, validation_mask, with_label_noise
from idml.data.transforms import build_transforms, test_crop_fraction


def _subset(records: Records, mask: list[bool]) -> Records:
    """The records where ``mask`` is true."""
    keep = [i for i, m in enumerate(mask) if m]
    return Records([records.paths[i] for i in keep], [records.labels[i] for i in keep])


def _validated(
    parts: dict[str, Records], skip_bad: bool, where: str, log: Callable[[str], None]
) -> dict[str, Records]:
    """``parts`` (records by split) with every image decoded once: a bad one raises, or with
    ``skip_bad`` is dropped and logged (a split left with under 2 classes still raises)."""
    checked = {}
    for part, records in parts.items():
        good, bad = validate_images(records, skip_bad=skip_bad)
        if bad:
            log(f"skipped {len(bad)} unreadable image(s) of {len(records)} in the {part} split "
                f"(first: {bad[0][0]}: {bad[0][1]})")
            if len(good.classes) < 2:
                raise DatasetError(f"the {part} split of {where} has fewer than 2 classes left")
        checked[part] = good
    return checked


def _unique(parts: dict[str, Records], allow: bool, where: str,
            log: Callable[[str], None]) -> dict[str, Records]:
    """Each split without duplicates (see :func:`~idml.data.duplicates.drop_duplicates`), and
    the test images identical to a training image counted in the log."""
    keys = split_keys(parts)  # one stat (and hash, where sizes collide) per image
    unique = {part: drop_duplicates(records, part, where, allow, log, keys[part])
              for part, records in parts.items()}
    if "train" in parts and "test" in parts:
        shared = len(set(keys["test"]) & set(keys["train"]))  # one per kept test image
        if shared:
            log(f"{shared} test image(s) of {where} are identical to a training image "
                "(kept; they are not unseen)")
    return unique


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
    allow_duplicates: bool = False,
    log: Callable[[str], None] = print,
) -> RetrievalSplits:
    """Read an image data set from disk, check every image, and build the split data sets.

    ``root`` None: see :func:`idml.data.registry.resolve_root` (a ``csv`` manifest alone, or
    the data set under ``$IDML_DATA_ROOT``). Every image is decoded once before training
    starts, so a broken file stops the run here (naming it) rather than mid-epoch; with
    ``skip_bad_images`` it is dropped and counted. With ``cache`` images are decoded once,
    downscaled to the short side the test transform needs, and kept (and persisted under the
    idml cache folder) as uint8 tensors: the paper's transforms then run on small tensors
    instead of full JPEG decodes every epoch. An image listed twice in a split (the same file
    or the same bytes) stops the run naming both, or with ``allow_duplicates`` is kept once
    (:mod:`idml.data.duplicates`); images shared by train and test are counted in the log.
    """
    data_root, csv = resolve_root(name, root, csv)
    parts = read_dataset(name, data_root, train_classes=train_classes, csv=csv).parts()
    parts = _validated(parts, skip_bad_images, str(data_root), log)
    parts = _unique(parts, allow_duplicates, str(data_root), log)

    short_side = round(image_size / test_crop_fraction(input_spec))

    def make(records: Records, train: bool) -> Dataset:
        transform = build_transforms(input_spec, image_size, train=train and augment)
        if not cache:
            return ImageDataset(records, transform)
        decoded = cache_images(records, short_side, cache_dir=cache_root() / "decoded")
        return CachedImageDataset(decoded, records.labels, transform, records.paths)

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


def splits_from_config(
    cfg: RunConfig, input_spec: dict[str, Any], log: Callable[[str], None] = print
) -> RetrievalSplits:
    """The data splits a run config describes, normalised for a model's ``input_spec``;
    ``cfg.label_noise`` moves that fraction of the training labels (seeded by ``cfg.seed``)."""
    return with_label_noise(_clean_splits(cfg, input_spec, log), cfg.label_noise, cfg.seed)


def _clean_splits(
    cfg: RunConfig, input_spec: dict[str, Any], log: Callable[[str], None]
) -> RetrievalSplits:
    if get_dataset(cfg.dataset).in_memory:  # the embedded digits
        return load_digits_splits(
            tuple(input_spec["mean"]), tuple(input_spec["std"]), cfg.val_fraction,
            cfg.rotation_classes,
        )
    return load_image_splits(
        cfg.dataset,
        cfg.data_root,
        input_spec=input_spec,
        image_size=cfg.image_size,
        train_classes=cfg.train_classes,
        csv=cfg.csv,
        val_fraction=cfg.val_fraction,
        augment=cfg.augment,
        cache=cfg.cache_images,
        skip_bad_images=cfg.skip_bad_images,
        allow_duplicates=cfg.allow_duplicates,
        log=log,
    )
