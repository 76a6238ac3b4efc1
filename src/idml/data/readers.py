"""Readers for image data sets as users keep them on disk, with the standard zero-shot splits.

Each reader takes the data set's folder (or file) and returns :class:`DatasetSplits` of plain
records: image paths with the data set's own integer class ids; no image is decoded here.
Train classes are disjoint from test classes (the zero-shot retrieval protocol,
``docs/method.md``). :mod:`idml.data.registry` lists the data sets and
dispatches to these readers (:func:`idml.data.registry.read_dataset`).

Anything malformed raises :class:`DatasetError` naming the file (and line or field) and what
was expected: a data set is never silently smaller than what its metadata lists.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from idml.data.cache import cache_root, extract_once
from idml.data.records import (
    IMAGE_SUFFIXES,
    INTEGER,
    DatasetError,
    DatasetSplits,
    Records,
    descend_wrapper,
    is_image,
    manifest_path,
    ordered_labels,
    read_manifest_table,
    subfolders,
)

# ----------------------------------------------------------------------------------------------
# Shared helpers


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing {what}: {path} does not exist")
    return path


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a UTF-8 text file ({err})") from err
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse_int(text: str, where: str, what: str) -> int:
    if not INTEGER.fullmatch(text):
        raise DatasetError(f"{where}: {what} {text!r} is not an integer")
    return int(text)


def _check_exist(paths: Sequence[Path], where: Sequence[str], dataset: str) -> None:
    """Raise if any listed image is missing (first one named, with where it is listed)."""
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        i = missing[0]
        raise DatasetError(
            f"{dataset}: {len(missing)} of {len(paths)} listed image(s) do not exist; "
            f"first: {paths[i]} (listed at {where[i]})"
        )


def _split_by_class(
    paths: Sequence[Path], labels: Sequence[int], is_train: Callable[[int], bool]
) -> tuple[Records, Records]:
    train = [(p, y) for p, y in zip(paths, labels, strict=True) if is_train(y)]
    test = [(p, y) for p, y in zip(paths, labels, strict=True) if not is_train(y)]
    return _records(train), _records(test)


def _records(pairs: Iterable[tuple[Path, int]]) -> Records:
    pairs = list(pairs)
    return Records([p for p, _ in pairs], [y for _, y in pairs])


def _load_mat(path: Path, variables: Sequence[str]) -> dict[str, Any]:
    """A MATLAB file's variables (scipy's ``squeeze_me``); each of ``variables`` must be there."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several types for damaged files
        raise DatasetError(f"{path}: not a readable MATLAB file ({err})") from err
    for key in variables:
        if key not in mat:
            raise DatasetError(f"{path}: variable {key!r} missing (expected the official file)")
    return mat


def _images_in(folder: Path) -> list[Path]:
    """The images directly in a class folder, sorted; none is an error."""
    images = sorted(p for p in folder.iterdir() if is_image(p))
    if not images:
        raise DatasetError(
            f"class folder {folder} holds no images (expected files directly inside with one "
            f"of the suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return images


_ID_PREFIX = re.compile(r"^[0-9]+\.")


# ----------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt")


def _find_cub_root(root: Path) -> Path:
    for candidate in (root, root / "CUB_200_2011"):
        if any((candidate / f).is_file() for f in CUB_FILES):
            return candidate
    raise DatasetError(
        f"{root} is not a CUB-200-2011 folder: looked for {', '.join(CUB_FILES)} and images/ "
        f"in {root} and in {root / 'CUB_200_2011'}"
    )


def read_cub(root: Path) -> DatasetSplits:
    """CUB-200-2011: classes 1-100 train, 101-200 test, whatever subset the metadata lists."""
    root = _find_cub_root(root)
    files = {f: _require_file(root / f, "CUB metadata file") for f in CUB_FILES}

    class_names: dict[int, str] = {}
    for n, line in _read_lines(files["classes.txt"]):
        where = f"{files['classes.txt']}:{n}"
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected '<class_id> <class_name>', got {line!r}")
        class_names[_parse_int(parts[0], where, "class id")] = _ID_PREFIX.sub("", parts[1])

    images: dict[int, tuple[str, str]] = {}
    for n, line in _read_lines(files["images.txt"]):
        where = f"{files['images.txt']}:{n}"
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected '<image_id> <image_name>', got {line!r}")
        image_id = _parse_int(parts[0], where, "image id")
        if image_id in images:
            raise DatasetError(f"{where}: image id {image_id} listed twice")
        images[image_id] = (parts[1], where)

    labels: dict[int, int] = {}
    for n, line in _read_lines(files["image_class_labels.txt"]):
        where = f"{files['image_class_labels.txt']}:{n}"
        parts = line.split()
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected '<image_id> <class_id>', got {line!r}")
        image_id = _parse_int(parts[0], where, "image id")
        class_id = _parse_int(parts[1], where, "class id")
        if image_id not in images:
            raise DatasetError(f"{where}: image id {image_id} is not in {files['images.txt']}")
        if class_id not in class_names:
            raise DatasetError(f"{where}: class id {class_id} is not in {files['classes.txt']}")
        labels[image_id] = class_id

    unlabelled = [i for i in images if i not in labels]
    if unlabelled:
        name, where = images[unlabelled[0]]
        raise DatasetError(
            f"{len(unlabelled)} image(s) of {files['images.txt']} have no class in "
            f"{files['image_class_labels.txt']}; first: image id {unlabelled[0]} ({where})"
        )
    ids = sorted(images)
    paths = [root / "images" / images[i][0] for i in ids]
    _check_exist(paths, [images[i][1] for i in ids], "cub")
    train, test = _split_by_class(paths, [labels[i] for i in ids], lambda y: y <= 100)
    return DatasetSplits(train=train, test=test, class_names=class_names)


# ----------------------------------------------------------------------------------------------
# Cars196


def read_cars(root: Path) -> DatasetSplits:
    """Cars196 from ``cars_annos.mat``: classes 1-98 train, 99-196 test.

    ``root`` is the folder holding ``cars_annos.mat`` (image paths are relative to it) or the
    ``.mat`` file itself.
    """
    import numpy as np

    mat_path = root if root.is_file() else root / "cars_annos.mat"
    if not mat_path.is_file():
        raise DatasetError(
            f"{root} is not a Cars196 folder: looked for {mat_path} (with car_ims/ beside it)"
        )
    base = mat_path.parent
    mat = _load_mat(mat_path, ("annotations", "class_names"))
    annotations = np.atleast_1d(mat["annotations"])
    fields = annotations.dtype.names or ()
    for key in ("relative_im_path", "class"):
        if key not in fields:
            raise DatasetError(
                f"{mat_path}: annotations have no field {key!r} (fields: {', '.join(fields)})"
            )
    class_names = {i: str(n) for i, n in enumerate(np.atleast_1d(mat["class_names"]), 1)}

    paths, labels, where = [], [], []
    for i, ann in enumerate(annotations):
        at = f"{mat_path}: annotations[{i}]"
        try:
            rel = str(np.asarray(ann["relative_im_path"]).item())
            class_id = int(np.asarray(ann["class"]).item())
        except (ValueError, TypeError) as err:
            raise DatasetError(f"{at}: expected a path and an integer class ({err})") from err
        if class_id not in class_names:
            raise DatasetError(f"{at}: class {class_id} has no entry in class_names")
        paths.append(base / rel)
        labels.append(class_id)
        where.append(at)
    _check_exist(paths, where, "cars")
    train, test = _split_by_class(paths, labels, lambda y: y <= 98)
    return DatasetSplits(train=train, test=test, class_names=class_names)


# ----------------------------------------------------------------------------------------------
# Stanford Online Products

SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _read_sop_list(path: Path) -> Records:
    lines = _read_lines(path)
    if not lines or lines[0][1].split() != SOP_HEADER:
        got = lines[0][1] if lines else "an empty file"
        raise DatasetError(f"{path}:1: expected the header {' '.join(SOP_HEADER)!r}, got {got!r}")
    paths, labels, where = [], [], []
    for n, line in lines[1:]:
        at = f"{path}:{n}"
        parts = line.split(maxsplit=3)
        if len(parts) != 4:
            raise DatasetError(f"{at}: expected '{' '.join(SOP_HEADER)}', got {line!r}")
        labels.append(_parse_int(parts[1], at, "class_id"))
        paths.append(path.parent / parts[3])
        where.append(at)
    _check_exist(paths, where, "sop")
    return Records(paths, labels)


def read_sop(root: Path) -> DatasetSplits:
    """Stanford Online Products: ``Ebay_train.txt`` train, ``Ebay_test.txt`` test."""
    files = [root / "Ebay_train.txt", root / "Ebay_test.txt"]
    if not any(f.is_file() for f in files):
        raise DatasetError(
            f"{root} is not a Stanford Online Products folder: looked for "
            f"{files[0].name} and {files[1].name} in it"
        )
    train, test = (_read_sop_list(_require_file(f, "SOP list file")) for f in files)
    return DatasetSplits(train=train, test=test)


# ----------------------------------------------------------------------------------------------
# In-Shop Clothes Retrieval

_ITEM_ID = re.compile(r"^id_([0-9]+)$")
INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]


def _inshop_rows(listing: Path) -> list[tuple[int, str]]:
    """The numbered rows after the image count and the header, checked against the count."""
    lines = _read_lines(listing)
    if len(lines) < 2:
        raise DatasetError(f"{listing}: expected an image count, a header and rows")
    count = _parse_int(lines[0][1], f"{listing}:{lines[0][0]}", "image count")
    if lines[1][1].split() != INSHOP_HEADER:
        raise DatasetError(
            f"{listing}:{lines[1][0]}: expected the header {' '.join(INSHOP_HEADER)!r}, "
            f"got {lines[1][1]!r}"
        )
    rows = lines[2:]
    if len(rows) != count:
        raise DatasetError(f"{listing}: line 1 announces {count} images but {len(rows)} are listed")
    return rows


def read_inshop(root: Path) -> DatasetSplits:
    """In-Shop: ``list_eval_partition.txt`` (in ``root`` or ``root/Eval``) train/query/gallery.

    Image paths (``img/...``) are relative to ``root`` (or ``root/Img`` as in the download).
    """
    candidates = [root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"]
    listing = next((c for c in candidates if c.is_file()), None)
    if listing is None:
        raise DatasetError(
            f"{root} is not an In-Shop folder: looked for {candidates[0]} and {candidates[1]}"
        )
    base = root
    if not (root / "img").is_dir() and (root / "Img" / "img").is_dir():
        base = root / "Img"
    rows = _inshop_rows(listing)
    parts_by_status: dict[str, list[tuple[Path, int]]] = {"train": [], "query": [], "gallery": []}
    class_names: dict[int, str] = {}
    paths, where = [], []
    for n, line in rows:
        at = f"{listing}:{n}"
        parts = line.split()
        if len(parts) != 3:
            raise DatasetError(f"{at}: expected '{' '.join(INSHOP_HEADER)}', got {line!r}")
        name, item, status = parts
        match = _ITEM_ID.match(item)
        if match is None:
            raise DatasetError(f"{at}: item_id {item!r} is not of the form id_00000001")
        if status not in parts_by_status:
            raise DatasetError(f"{at}: evaluation_status {status!r} is not train, query or gallery")
        item_id = int(match.group(1))
        class_names[item_id] = item
        path = base / name
        parts_by_status[status].append((path, item_id))
        paths.append(path)
        where.append(at)
    _check_exist(paths, where, "inshop")
    return DatasetSplits(
        train=_records(parts_by_status["train"]),
        test=None,
        query=_records(parts_by_status["query"]),
        gallery=_records(parts_by_status["gallery"]),
        class_names=class_names,
    )


# ----------------------------------------------------------------------------------------------
# Omniglot

OMNIGLOT_PARTS = ("images_background", "images_evaluation")


def _find_omniglot_root(folder: Path) -> Path | None:
    for candidate in (folder, *subfolders(folder)):
        if all((candidate / part).is_dir() for part in OMNIGLOT_PARTS):
            return candidate
    return None


def read_omniglot(root: Path) -> DatasetSplits:
    """Omniglot: characters of ``images_background`` train, of ``images_evaluation`` test.

    ``root`` is the folder holding both (or their parent), or the ``.tar.gz`` archive, which is
    extracted once into ``cache_root()/omniglot``. A class is one character (alphabet +
    character folder); ids count the background classes, then the evaluation classes, each in
    sorted order, so they are distinct across the splits.
    """
    if root.is_file():
        root = extract_once(root, cache_root() / "omniglot")
    found = _find_omniglot_root(root)
    if found is None:
        raise DatasetError(
            f"{root} is not an Omniglot folder: looked for {' and '.join(OMNIGLOT_PARTS)} "
            "in it and in its subfolders (or pass the omniglot .tar.gz)"
        )
    splits, class_names = [], {}
    for part in OMNIGLOT_PARTS:
        pairs = []
        for alphabet in subfolders(found / part):
            characters = subfolders(alphabet)
            if not characters:
                raise DatasetError(f"alphabet folder {alphabet} holds no character folders")
            for character in characters:
                class_id = len(class_names)
                class_names[class_id] = f"{alphabet.name}/{character.name}"
                pairs += [(p, class_id) for p in _images_in(character)]
        splits.append(_records(pairs))
    return DatasetSplits(train=splits[0], test=splits[1], class_names=class_names)


# ----------------------------------------------------------------------------------------------
# Oxford Flowers-102

FLOWERS_LABELS = "imagelabels.mat"
FLOWERS_TRAIN_LAST = 51  # classes 1-51 train, 52-102 test (zero-shot, as CUB and Cars)
_FLOWERS_CLASS = re.compile(r"^([0-9]{3})\.(.+)$")


def _is_official_flowers(folder: Path) -> bool:
    return (folder / FLOWERS_LABELS).is_file() or (folder / "jpg").is_dir()


def read_flowers102(root: Path) -> DatasetSplits:
    """Oxford Flowers-102: classes 1-51 train, 52-102 test.

    Either the official layout (``jpg/image_00001.jpg``... with ``imagelabels.mat``, whose
    ``labels`` are the 1-based classes in image-number order; also inside one wrapper folder
    such as torchvision's ``flowers-102/``) or class folders named ``NNN.name`` with NNN the
    Oxford class id (also inside a wrapper such as ``images/``), read in the order of
    :func:`read_folder` (sorted folders, sorted files).
    """
    if not _is_official_flowers(root):
        root = descend_wrapper(root)
    if _is_official_flowers(root):
        return _read_flowers_official(root)
    return _read_flowers_folders(root)


def _flowers_labels(mat_path: Path) -> list[int]:
    import numpy as np

    labels = np.atleast_1d(_load_mat(mat_path, ("labels",))["labels"])
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or not len(labels):
        raise DatasetError(f"{mat_path}: labels must be a vector of class ids, got "
                           f"{labels.dtype} {labels.shape}")
    bad = [i for i, y in enumerate(labels) if not 1 <= y <= 102 or y != int(y)]
    if bad:
        raise DatasetError(f"{mat_path}: labels[{bad[0]}] is {labels[bad[0]]}; expected a class "
                           "id 1-102")
    return [int(y) for y in labels]


def _read_flowers_official(root: Path) -> DatasetSplits:
    mat_path = _require_file(root / FLOWERS_LABELS, "Flowers-102 label file")
    jpg = root / "jpg"
    if not jpg.is_dir():
        raise DatasetError(f"missing Flowers-102 image folder: {jpg} does not exist")
    labels = _flowers_labels(mat_path)
    paths = [jpg / f"image_{i:05d}.jpg" for i in range(1, len(labels) + 1)]
    _check_exist(paths, [f"{mat_path}: labels[{i}]" for i in range(len(labels))], "flowers102")
    found = sum(1 for p in jpg.iterdir() if is_image(p))
    if found != len(labels):
        raise DatasetError(f"{mat_path} has labels for {len(labels)} images but {jpg} holds "
                           f"{found}: the label file does not belong to these images")
    train, test = _split_by_class(paths, labels, lambda y: y <= FLOWERS_TRAIN_LAST)
    return DatasetSplits(train=train, test=test)


def _read_flowers_folders(root: Path) -> DatasetSplits:
    folders = subfolders(root)
    if not folders:
        raise DatasetError(
            f"{root} is not a Flowers-102 folder: looked for jpg/ and {FLOWERS_LABELS}, or "
            "class folders named NNN.name (NNN the Oxford class id 001-102)"
        )
    class_names: dict[int, str] = {}
    paths, labels = [], []
    for folder in folders:
        match = _FLOWERS_CLASS.match(folder.name)
        if match is None or not 1 <= int(match[1]) <= 102:
            raise DatasetError(f"{folder}: expected a class folder named NNN.name with NNN the "
                               "Oxford class id 001-102")
        class_id = int(match[1])
        if class_id in class_names:
            raise DatasetError(f"{folder}: class id {class_id} has two folders in {root}")
        class_names[class_id] = match[2]
        images = _images_in(folder)
        paths += images
        labels += [class_id] * len(images)
    train, test = _split_by_class(paths, labels, lambda y: y <= FLOWERS_TRAIN_LAST)
    return DatasetSplits(train=train, test=test, class_names=class_names)


# ----------------------------------------------------------------------------------------------
# Class folders and CSV manifests


def _pick_train_classes(names: Sequence[str], train_classes: str | None, source: str) -> set[str]:
    """The class names that train, from a fraction of the sorted ``names`` or a comma list."""
    spec = "0.5" if train_classes is None else train_classes.strip()
    try:
        fraction = float(spec)
    except ValueError:
        fraction = None
    if fraction is not None and spec not in names:
        if not 0 < fraction < 1:
            raise DatasetError(
                f"train_classes={spec!r} for {source}: expected a fraction strictly between 0 "
                "and 1 or a comma list of class names"
            )
        n_train = math.floor(fraction * len(names))
        return set(names[:n_train])
    listed = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in listed if s not in names]
    if unknown:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise DatasetError(
            f"train_classes for {source}: {', '.join(map(repr, unknown))} are not classes "
            f"there (classes: {shown})"
        )
    return set(listed)


def read_folder(root: Path, *, train_classes: str | None = None) -> DatasetSplits:
    """Class-folder tree ``root/<class>/<image>``; ids are positions in sorted folder order.

    A wrapper folder (``flowers102/images/<class>/``, see
    :func:`~idml.data.records.descend_wrapper`) is descended into. Only images directly
    inside a class folder count; an empty one is an error.
    """
    if not root.is_dir():
        raise DatasetError(f"folder root {root} is not a directory")
    root = descend_wrapper(root)
    folders = subfolders(root)
    if not folders:
        raise DatasetError(f"{root} holds no class folders (expected {root}/<class>/<images>)")
    names = [f.name for f in folders]
    train_names = _pick_train_classes(names, train_classes, str(root))
    train, test = [], []
    for class_id, folder in enumerate(folders):
        pairs = [(p, class_id) for p in _images_in(folder)]
        (train if folder.name in train_names else test).extend(pairs)
    return DatasetSplits(
        train=_records(train), test=_records(test), class_names=dict(enumerate(names))
    )


class _Row(NamedTuple):
    path: Path
    label: str
    split: str | None  # "train" / "test", or None without a split column
    at: str  # manifest:line


def _manifest_of(root: Path, csv: str | Path | None) -> Path:
    if csv is not None:
        manifest = Path(csv).expanduser()
        manifest = manifest if manifest.is_absolute() else root / manifest
    elif root.is_file():
        manifest = root
    else:
        raise DatasetError(f"csv dataset: {root} is a folder; pass csv=PATH or the CSV as root")
    return _require_file(manifest, "CSV manifest")


def _read_manifest(manifest: Path) -> tuple[list[_Row], bool]:
    """The rows of a ``path,label[,split]`` manifest and whether it has the split column."""
    columns, table = read_manifest_table(manifest)
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DatasetError(
            f"{manifest}:1: header lacks column(s) {', '.join(missing)}; expected "
            f"'path,label[,split]', got {','.join(columns) or 'an empty file'!r}"
        )
    has_split = "split" in columns
    rows = []
    for at, row in table:
        if None in row or any(row.get(c) is None for c in columns):
            raise DatasetError(f"{at}: expected {len(columns)} fields ({','.join(columns)})")
        for column in ("path", "label"):
            if not row[column].strip():
                raise DatasetError(f"{at}: field {column!r} is empty")
        split = row["split"].strip().lower() if has_split else None
        if has_split and split not in ("train", "test"):
            raise DatasetError(
                f"{at}: field 'split' is {row['split']!r}; expected 'train' or 'test'"
            )
        path = manifest_path(manifest, row["path"].strip())
        rows.append(_Row(path, row["label"].strip(), split, at))
    if not rows:
        raise DatasetError(f"{manifest}: no rows after the header")
    return rows, has_split


def _check_disjoint(rows: Sequence[_Row]) -> None:
    """Raise at the first label listed in both splits (zero-shot protocol)."""
    first_in: dict[tuple[str, str | None], str] = {}
    for row in rows:
        first_in.setdefault((row.label, row.split), row.at)
        other = "test" if row.split == "train" else "train"
        if (row.label, other) in first_in:
            raise DatasetError(
                f"{row.at}: label {row.label!r} is in both splits (also {other} at "
                f"{first_in[(row.label, other)]}); zero-shot retrieval needs disjoint classes"
            )


def read_csv(
    root: Path, *, csv: str | Path | None = None, train_classes: str | None = None
) -> DatasetSplits:
    """CSV manifest with header ``path,label[,split]`` (extra columns are ignored).

    Paths are relative to the manifest's folder (or absolute). Labels are any non-empty
    strings; ids are their positions in :func:`~idml.data.records.ordered_labels` order.
    ``split`` is ``train`` or ``test``; without that column ``train_classes`` picks the train
    labels as for ``folder``. A label may not be in both splits (zero-shot protocol).
    """
    manifest = _manifest_of(root, csv)
    rows, has_split = _read_manifest(manifest)
    _check_exist([r.path for r in rows], [r.at for r in rows], "csv")
    names = ordered_labels(r.label for r in rows)
    ids = {name: i for i, name in enumerate(names)}
    if has_split:
        if train_classes is not None:
            raise DatasetError(f"{manifest} has a split column; train_classes does not apply")
        _check_disjoint(rows)
        is_train = [r.split == "train" for r in rows]
    else:
        train_names = _pick_train_classes(names, train_classes, str(manifest))
        is_train = [r.label in train_names for r in rows]
    train = [(r.path, ids[r.label]) for r, t in zip(rows, is_train, strict=True) if t]
    test = [(r.path, ids[r.label]) for r, t in zip(rows, is_train, strict=True) if not t]
    return DatasetSplits(
        train=_records(train), test=_records(test), class_names=dict(enumerate(names))
    )
