"""What every reader returns (:class:`Records`, :class:`DatasetSplits`), its error, and the
few rules that readers and embedding sources share: what counts as an image, when a folder is
only a wrapper, in which order labels get their ids and where a manifest's paths point."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from idml.core.errors import IdmlError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


class DatasetError(IdmlError):
    """A data set on disk does not have the expected layout or content."""


@dataclass(frozen=True)
class Records:
    """Image paths with the data set's own integer class ids (not necessarily contiguous)."""

    paths: list[Path]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise IdmlError(f"{len(self.paths)} paths but {len(self.labels)} labels")

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


def is_image(path: Path) -> bool:
    """A visible file with an image suffix (hidden ones, e.g. macOS ``._x.jpg``, are not)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and (
        path.is_file()
    )


def subfolders(folder: Path) -> list[Path]:
    """The visible subfolders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(is_image(p) for p in folder.iterdir())


def descend_wrapper(folder: Path) -> Path:
    """``folder``, or its only subfolder when ``folder`` merely wraps the class folders.

    A wrapper (``flowers102/images/<class>/``) has exactly one subfolder, and neither it nor
    that subfolder holds images of its own (a single folder of images is one class).
    """
    inner = subfolders(folder)
    if len(inner) == 1 and not _has_images(folder) and not _has_images(inner[0]):
        return inner[0]
    return folder


#: An integer as the data sets' text files write one: ASCII digits, no separators or
#: padding (``int()`` would also take "1_0", " 7" and other scripts' digits).
INTEGER = re.compile(r"-?[0-9]+")


def ordered_labels(labels: Iterable[str]) -> list[str]:
    """The distinct labels in id order: numeric when all are integers, else as strings.

    Integer-equal labels (``"1"``, ``"01"``) are ordered by their text, so the order never
    depends on set iteration order (string hashing varies with ``PYTHONHASHSEED``).
    """
    unique = set(labels)
    # ASCII integers only: Python's int() also takes "1_0", " 1" and other scripts' digits
    if all(INTEGER.fullmatch(s) for s in unique):
        return sorted(unique, key=lambda s: (int(s), s))
    return sorted(unique)


def read_text_file(path: Path) -> str:
    """A manifest's text (UTF-8, a byte-order mark dropped); other encodings get an error
    naming the file and the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column "
                           f"{column}); save the file as UTF-8") from None


def read_manifest_table(manifest: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """A CSV manifest's column names (stripped; a repeated one is an error naming it) and its
    rows, each as ``("<file>:<line>", {column: value})`` (:func:`read_text_file` decoding)."""
    with io.StringIO(read_text_file(manifest), newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        repeated = sorted({c for c in columns if c and columns.count(c) > 1})
        if repeated:
            raise DatasetError(f"{manifest}:1: header repeats column(s) {', '.join(repeated)}")
        reader.fieldnames = columns
        rows = [(f"{manifest}:{reader.line_num}", row) for row in reader]
    return columns, rows


def manifest_path(manifest: Path, text: str) -> Path:
    """A path as written in a manifest: ``~`` expanded, relative to the manifest's folder."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else manifest.parent / path
