"""Images to embed or search with, and their labels where known: a folder, a CSV manifest, a
list of files and folders, or one split of a registered data set.

Folders and manifests follow the readers' rules (:mod:`idml.data.records`): the same wrapper
descent, the same label order. Unlike a data set, a source may be unlabelled (label -1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from idml.data.records import (
    IMAGE_SUFFIXES,
    DatasetError,
    descend_wrapper,
    is_image,
    manifest_path,
    ordered_labels,
    read_manifest_table,
)
from idml.data.registry import read_dataset


@dataclass
class Source:
    """Images to embed: paths, int labels (-1 unknown) and the class names of the labels."""

    paths: list[str]
    labels: list[int]
    class_names: list[str] | None = None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [p for p in (Path(dirpath) / name for name in sorted(filenames)) if is_image(p)]
    if not found:
        raise DatasetError(
            f"{root} holds no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def collect_images(items: Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from a mix of files and folders (folders are listed recursively)."""
    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(str(p) for p in list_images(path))
        elif path.is_file():
            paths.append(str(path))
        else:
            raise DatasetError(f"query {path} does not exist")
    if not paths:
        raise DatasetError("no query images given")
    return paths


def folder_source(folder: str | os.PathLike) -> Source:
    """Every image under ``folder``; the label of an image is its top-level subfolder.

    Class ids are positions in the sorted subfolder names (stored as ``class_names``); images
    directly in ``folder`` get -1 (a flat folder is unlabelled). A wrapper folder
    (:func:`~idml.data.records.descend_wrapper`) is descended into.
    """
    paths = list_images(folder)
    root = descend_wrapper(Path(folder))
    tops = [p.relative_to(root).parts for p in paths]
    names = sorted({parts[0] for parts in tops if len(parts) > 1})
    ids = {name: i for i, name in enumerate(names)}
    labels = [ids[parts[0]] if len(parts) > 1 else -1 for parts in tops]
    return Source([str(p) for p in paths], labels, names or None)


def _manifest_rows(manifest: Path) -> list[tuple[str, str]]:
    """``(path, label)`` of each row; the label is ``""`` where absent."""
    columns, table = read_manifest_table(manifest)
    if "path" not in columns:
        raise DatasetError(f"{manifest}:1: header lacks a 'path' column; expected "
                           f"'path,label', got {','.join(columns) or 'an empty file'!r}")
    rows = []
    for at, row in table:
        text = (row.get("path") or "").strip()
        if not text:
            raise DatasetError(f"{at}: field 'path' is empty")
        path = manifest_path(manifest, text)
        if not path.is_file():
            raise DatasetError(f"{at}: image {path} does not exist")
        rows.append((str(path), (row.get("label") or "").strip()))
    if not rows:
        raise DatasetError(f"{manifest}: no rows after the header")
    return rows


def csv_source(manifest: str | os.PathLike) -> Source:
    """A CSV manifest with a ``path`` column and optionally ``label`` (other columns ignored).

    Relative paths are relative to the manifest's folder. Labels are names mapped to ids in
    :func:`~idml.data.records.ordered_labels` order; an empty label is -1.
    """
    manifest = Path(manifest)
    try:
        rows = _manifest_rows(manifest)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{manifest} is not a UTF-8 CSV file ({exc})") from exc
    names = ordered_labels(label for _, label in rows if label)
    ids = {name: i for i, name in enumerate(names)}
    return Source([p for p, _ in rows], [ids[y] if y else -1 for _, y in rows], names or None)


def read_source(source: str | os.PathLike) -> Source:
    """A folder (see :func:`folder_source`) or a ``.csv`` manifest (see :func:`csv_source`)."""
    path = Path(source)
    if path.is_dir():
        return folder_source(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return csv_source(path)
    if not path.exists():
        raise DatasetError(f"source {path} does not exist")
    raise DatasetError(f"source {path} is neither a folder of images nor a .csv manifest")


def dataset_source(
    name: str,
    root: str | Path,
    split: str,
    *,
    train_classes: str | None = None,
    csv: str | Path | None = None,
) -> Source:
    """Split ``split`` of data set ``name`` at ``root`` (see :func:`read_dataset`).

    Labels are the data set's own class ids; ``class_names`` lists the names by id where the
    data set has them.
    """
    dataset = read_dataset(name, root, train_classes=train_classes, csv=csv)
    parts = dataset.parts()
    if split not in parts:
        raise DatasetError(f"the {name} data set at {root} has no {split!r} split "
                           f"(it has {', '.join(parts)})")
    records = parts[split]
    names = dataset.class_names
    class_names = None
    if names and all(isinstance(k, int) and k >= 0 for k in names):
        class_names = [str(names.get(i, i)) for i in range(max(names) + 1)]
    return Source([str(p) for p in records.paths], list(records.labels), class_names)
