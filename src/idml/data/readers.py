"""Readers for image data sets as users keep them on disk, with the standard zero-shot splits.

Each reader returns plain records (image paths + the data set's own integer class ids); no
image is decoded here except by :func:`validate_images`. Train classes are disjoint from test
classes (the zero-shot retrieval protocol, ``docs/idml-method.md`` section 6):

==========  ====================================================================================
name        layout and split
==========  ====================================================================================
cub         ``images.txt``, ``image_class_labels.txt``, ``classes.txt``, ``images/``; classes
            1-100 train, 101-200 test (ids from the metadata, never from folder order)
cars        ``cars_annos.mat`` (+ ``car_ims/``); classes 1-98 train, 99-196 test
sop         ``Ebay_train.txt`` / ``Ebay_test.txt``
inshop      ``list_eval_partition.txt``: train / query / gallery (``test`` is None)
omniglot    ``images_background/`` train, ``images_evaluation/`` test, or the ``.tar.gz``
folder      ``root/<class>/<image>``; the first ``train_classes`` of the sorted classes train
csv         manifest ``path,label[,split]``
==========  ====================================================================================

Anything malformed raises :class:`DatasetError` naming the file (and line or field) and what
was expected: a data set is never silently smaller than what its metadata lists.
"""

from __future__ import annotations

import csv as csv_module
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
DATASET_NAMES = ("cub", "cars", "sop", "inshop", "omniglot", "folder", "csv")


class DatasetError(ValueError):
    """A data set on disk does not have the expected layout or content."""


@dataclass(frozen=True)
class Records:
    """Image paths with the data set's own integer class ids (not necessarily contiguous)."""

    paths: list[Path]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[int]:
        """The distinct class ids, sorted."""
        return sorted(set(self.labels))


@dataclass
class DatasetSplits:
    """Zero-shot splits of one data set.

    ``test`` is evaluated leave-one-out (every image a query against all others). In-Shop
    instead has a fixed ``query`` / ``gallery`` split and ``test`` is None. ``class_names``
    maps class ids to readable names where the data set has them (empty for SOP).
    """

    train: Records
    test: Records | None
    query: Records | None = None
    gallery: Records | None = None
    class_names: dict[int, str] = field(default_factory=dict)

    def parts(self) -> dict[str, Records]:
        """The splits that are present, by name."""
        named = {"train": self.train, "test": self.test, "query": self.query}
        named["gallery"] = self.gallery
        return {k: v for k, v in named.items() if v is not None}


def read_dataset(
    name: str,
    root: str | Path,
    *,
    train_classes: str | None = None,
    csv: str | Path | None = None,
) -> DatasetSplits:
    """Read data set ``name`` from ``root`` (see the module docstring for the layouts).

    ``train_classes`` (``folder`` and split-less ``csv`` only): a fraction such as ``"0.5"``
    (the first half of the sorted classes train, the rest test; the default) or a comma list
    of class names. ``csv``: the manifest path (relative to ``root``); for ``name="csv"``
    ``root`` may also be the manifest itself.
    """
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    if train_classes is not None and name not in ("folder", "csv"):
        raise DatasetError(f"train_classes applies to 'folder' and 'csv' only, not {name!r}")
    if csv is not None and name != "csv":
        raise DatasetError(f"csv= applies to the 'csv' dataset only, not {name!r}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{name} root {root} does not exist")
    if name == "cub":
        splits = read_cub(root)
    elif name == "cars":
        splits = read_cars(root)
    elif name == "sop":
        splits = read_sop(root)
    elif name == "inshop":
        splits = read_inshop(root)
    elif name == "omniglot":
        splits = read_omniglot(root)
    elif name == "folder":
        splits = read_folder(root, train_classes=train_classes)
    else:
        splits = read_csv(root, csv=csv, train_classes=train_classes)
    for part, records in splits.parts().items():
        n = len(records.classes)
        if n < 2:
            raise DatasetError(
                f"{name} at {root}: the {part} split has {n} class(es) ({len(records)} images); "
                "retrieval needs at least 2"
            )
    return splits


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
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{where}: {what} {text!r} is not an integer") from None


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


_ID_PREFIX = re.compile(r"^\d+\.")


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
    import scipy.io

    mat_path = root if root.is_file() else root / "cars_annos.mat"
    if not mat_path.is_file():
        raise DatasetError(
            f"{root} is not a Cars196 folder: looked for {mat_path} (with car_ims/ beside it)"
        )
    base = mat_path.parent
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True)
    except Exception as err:  # scipy raises several types for damaged files
        raise DatasetError(f"{mat_path}: not a readable MATLAB file ({err})") from err
    for key in ("annotations", "class_names"):
        if key not in mat:
            raise DatasetError(f"{mat_path}: variable {key!r} missing (expected the official file)")
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

_ITEM_ID = re.compile(r"^id_(\d+)$")
INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]


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


def cache_root() -> Path:
    """Folder for extracted archives and decoded images: ``$IDML_CACHE`` or ``~/.cache/idml``."""
    env = os.environ.get("IDML_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idml"


def _find_omniglot_root(folder: Path) -> Path | None:
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
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
        root = extract_archive(root, cache_root() / "omniglot")
    found = _find_omniglot_root(root)
    if found is None:
        raise DatasetError(
            f"{root} is not an Omniglot folder: looked for {' and '.join(OMNIGLOT_PARTS)} "
            "in it and in its subfolders (or pass the omniglot .tar.gz)"
        )
    splits, class_names = [], {}
    for part in OMNIGLOT_PARTS:
        pairs = []
        for alphabet in _subdirs(found / part):
            characters = _subdirs(alphabet)
            if not characters:
                raise DatasetError(f"alphabet folder {alphabet} holds no character folders")
            for character in characters:
                class_id = len(class_names)
                class_names[class_id] = f"{alphabet.name}/{character.name}"
                pairs += [(p, class_id) for p in _images_in(character)]
        splits.append(_records(pairs))
    return DatasetSplits(train=splits[0], test=splits[1], class_names=class_names)


def _archive_stamp(archive: Path) -> dict[str, object]:
    stat = archive.stat()
    return {"archive": str(archive.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _safe_extract(archive: Path, dest: Path) -> None:
    """The downloader's checked extraction (no escapes, links or bombs), as a DatasetError."""
    from idml.data.download import DownloadError
    from idml.data.download import extract_archive as checked_extract

    try:
        checked_extract(archive, dest, kind="tar")
    except DownloadError as err:
        raise DatasetError(f"{archive}: {err}") from err


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract a tar archive into ``target`` once; later calls reuse it (same archive stamp).

    Only plain files and folders with relative names inside ``target`` are accepted: an
    absolute name, a ``..`` component, a link or a device member raises :class:`DatasetError`
    and leaves nothing behind. Extraction goes to a temporary sibling folder renamed into
    place when complete, so an interrupted run never leaves a half-extracted cache.
    """
    stamp_name = ".idml-source.json"
    stamp = _archive_stamp(archive)
    if (target / stamp_name).is_file():
        try:
            if json.loads((target / stamp_name).read_text()) == stamp:
                return target
        except (OSError, ValueError):
            pass  # unreadable stamp: extract again
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _safe_extract(archive, tmp)
        (tmp / stamp_name).write_text(json.dumps(stamp))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Class folders and CSV manifests


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    images = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise DatasetError(
            f"class folder {folder} holds no images (expected files directly inside with one "
            f"of the suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return images


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

    A single wrapper folder without images of its own (``flowers102/images/<class>/``) is
    descended into. Only files directly inside a class folder count; an empty one is an error.
    """
    if not root.is_dir():
        raise DatasetError(f"folder root {root} is not a directory")
    folders = _subdirs(root)
    if len(folders) == 1 and not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in folders[0].iterdir() if p.is_file()
    ):
        root, folders = folders[0], _subdirs(folders[0])
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


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    """Labels in sorted order: numerically when they are all integers, else as strings."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def read_csv(
    root: Path, *, csv: str | Path | None = None, train_classes: str | None = None
) -> DatasetSplits:
    """CSV manifest with header ``path,label[,split]`` (extra columns are ignored).

    Paths are relative to the manifest's folder (or absolute). Labels are any non-empty
    strings; ids are their positions in sorted order (numeric order if all are integers).
    ``split`` is ``train`` or ``test``; without that column ``train_classes`` picks the train
    labels as for ``folder``. A label may not be in both splits (zero-shot protocol).
    """
    if csv is not None:
        manifest = Path(csv).expanduser()
        if not manifest.is_absolute():
            manifest = root / manifest
    elif root.is_file():
        manifest = root
    else:
        raise DatasetError(f"csv dataset: {root} is a folder; pass csv=PATH or the CSV as root")
    _require_file(manifest, "CSV manifest")
    base = manifest.parent
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv_module.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise DatasetError(
                f"{manifest}:1: header lacks column(s) {', '.join(missing)}; expected "
                f"'path,label[,split]', got {','.join(columns) or 'an empty file'!r}"
            )
        reader.fieldnames = columns
        has_split = "split" in columns
        rows = []
        for row in reader:
            at = f"{manifest}:{reader.line_num}"
            if None in row or any(row.get(c) is None for c in columns):
                raise DatasetError(f"{at}: expected {len(columns)} fields ({','.join(columns)})")
            path_text, label = row["path"].strip(), row["label"].strip()
            if not path_text:
                raise DatasetError(f"{at}: field 'path' is empty")
            if not label:
                raise DatasetError(f"{at}: field 'label' is empty")
            split = None
            if has_split:
                split = row["split"].strip().lower()
                if split not in ("train", "test"):
                    raise DatasetError(
                        f"{at}: field 'split' is {row['split']!r}; expected 'train' or 'test'"
                    )
            path = Path(path_text).expanduser()
            rows.append((path if path.is_absolute() else base / path, label, split, at))
    if not rows:
        raise DatasetError(f"{manifest}: no rows after the header")
    _check_exist([r[0] for r in rows], [r[3] for r in rows], "csv")

    names = _sorted_labels(r[1] for r in rows)
    ids = {name: i for i, name in enumerate(names)}
    if has_split:
        if train_classes is not None:
            raise DatasetError(f"{manifest} has a split column; train_classes does not apply")
        first_in: dict[tuple[str, str], str] = {}
        for _, label, split, at in rows:
            first_in.setdefault((label, split), at)
            other = "test" if split == "train" else "train"
            if (label, other) in first_in:
                raise DatasetError(
                    f"{at}: label {label!r} is in both splits (also {other} at "
                    f"{first_in[(label, other)]}); zero-shot retrieval needs disjoint classes"
                )
        is_train = [split == "train" for _, _, split, _ in rows]
    else:
        train_names = _pick_train_classes(names, train_classes, str(manifest))
        is_train = [label in train_names for _, label, _, _ in rows]
    train = [(r[0], ids[r[1]]) for r, t in zip(rows, is_train, strict=True) if t]
    test = [(r[0], ids[r[1]]) for r, t in zip(rows, is_train, strict=True) if not t]
    return DatasetSplits(
        train=_records(train), test=_records(test), class_names=dict(enumerate(names))
    )


# ----------------------------------------------------------------------------------------------
# Image validation


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes completely, else why not.

    ``verify()`` checks structure (and PNG checksums) without decoding; only a full
    ``load()`` notices a truncated JPEG, so both run. JPEGs are decoded at reduced DCT
    scale (``draft``): every byte is still read, at a fraction of the cost.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # PIL raises many types on corrupt files (struct.error, ...)
        return f"{type(err).__name__}: {err}"
    return None


def io_threads() -> int:
    """Threads for image decoding (PIL releases the GIL): a few more than the cores."""
    return min(16, (os.cpu_count() or 1) + 2)


def validate_images(
    records: Records, *, skip_bad: bool, num_threads: int | None = None
) -> tuple[Records, list[tuple[Path, str]]]:
    """Decode every image once; return the records that decode and the ``(path, reason)`` bad.

    With ``skip_bad=False`` the first bad image (in record order) raises :class:`DatasetError`
    naming it; with ``skip_bad=True`` the bad ones are dropped and returned so the caller can
    report how many were skipped. Decoding runs on a thread pool (PIL releases the GIL).
    """
    workers = num_threads or io_threads()
    bad: list[tuple[Path, str]] = []
    keep_paths, keep_labels = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for path, label, reason in zip(
                records.paths, records.labels, pool.map(check_image, records.paths), strict=True
            ):
                if reason is None:
                    keep_paths.append(path)
                    keep_labels.append(label)
                    continue
                if not skip_bad:
                    raise DatasetError(f"image {path} does not decode ({reason})")
                bad.append((path, reason))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return Records(keep_paths, keep_labels), bad


def fingerprint(paths: Sequence[Path], *extra: object) -> str:
    """Hash of the paths with their sizes and mtimes (plus ``extra``): a cache key."""
    digest = hashlib.sha256(repr(extra).encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
