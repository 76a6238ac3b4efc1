"""What idml derives from data sets and keeps between runs, under :func:`cache_root`: archives
extracted once (:func:`extract_once`) and decoded images keyed by :func:`fingerprint`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from idml.core.io import atomic_folder, write_json
from idml.data.download import DownloadError, extract_archive
from idml.data.records import DatasetError

_STAMP = ".idml-source.json"


def cache_root() -> Path:
    """Folder for extracted archives and decoded images: ``$IDML_CACHE`` or ``~/.cache/idml``."""
    env = os.environ.get("IDML_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idml"


def fingerprint(paths: Sequence[Path], *extra: object) -> str:
    """Hash of the paths with their sizes and mtimes (plus ``extra``): a cache key."""
    digest = hashlib.sha256(repr(extra).encode())
    for p in paths:
        st = os.stat(p)
        # os.fsencode: a file name that is not valid UTF-8 is still a key (its own bytes)
        digest.update(os.fsencode(os.path.abspath(p)))
        digest.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _archive_stamp(archive: Path) -> dict[str, object]:
    stat = archive.stat()
    return {"archive": str(archive.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_extracted(target: Path, stamp: dict[str, object]) -> bool:
    try:
        return json.loads((target / _STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False  # no stamp or an unreadable one: extract again


def extract_once(archive: Path, target: Path) -> Path:
    """Extract a tar archive into ``target`` once; later calls reuse it (same archive stamp).

    Extraction is :func:`idml.data.download.extract_archive`'s checked one (no escaping
    names, links, devices or bombs; a refusal raises :class:`DatasetError` and leaves
    nothing). It goes to a temporary sibling folder renamed into place when complete, so an
    interrupted run never leaves a half-extracted cache.
    """
    stamp = _archive_stamp(archive)
    if _is_extracted(target, stamp):
        return target
    with atomic_folder(target) as tmp:  # a stale extraction is replaced as a whole
        try:
            extract_archive(archive, tmp, kind="tar")
        except DownloadError as err:
            raise DatasetError(f"{archive}: {err}") from err
        write_json(tmp / _STAMP, stamp)
    return target
