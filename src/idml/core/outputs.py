"""Where a command may write: never into a run folder's own files, never over its own input,
and over an existing file or folder only if it is this command's own earlier product
(recognised by the marker of its format) or with ``--overwrite``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from idml.core.errors import IdmlError
from idml.core.rundir import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE, RESUME_FILE, RUN_FILES


class OutputError(IdmlError):
    """An output path that would destroy something the command did not create."""


def is_run_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds an ``idml train`` run (its config and a model, state or log)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and any(
        (folder / name).is_file() for name in (CHECKPOINT_FILE, RESUME_FILE, LOG_FILE))


def _same(a: Path, b: Path) -> bool:
    """Same file: the same path, a symbolic link to it, or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]],
    kind: str,
    is_own: Callable[[Path], bool],
    overwrite: bool = False,
    folder: bool = False,
) -> Path:
    """``out`` as a Path if a command may write it (a file, or with ``folder`` a folder that
    is replaced as a whole); else an :class:`OutputError` saying why and what to do.

    ``inputs``: what the command reads; ``kind``: what it writes, for the message;
    ``is_own(out)``: whether an existing ``out`` is an earlier product of the same kind.
    """
    out = Path(out)
    if not folder and out.is_dir():
        raise OutputError(f"cannot write {out}: it is a folder; give a file name")
    run_dir = out if folder else out.parent
    if (folder or out.name in RUN_FILES) and is_run_folder(run_dir):
        what = "the run folder" if folder else f"the {out.name} of the run folder"
        raise OutputError(f"--out {out} is {what} {run_dir} written by idml train; a run's "
                          "files are never the output of another command: choose another --out")
    for source in map(Path, inputs):
        if _same(out, source) or (folder and out.exists() and _inside(source, out)):
            raise OutputError(f"--out {out} would destroy this command's own input {source}; "
                              "choose another --out")
    if out.exists() and not overwrite and not is_own(out):
        raise OutputError(f"--out {out} exists and is not {kind} written by idml; choose "
                          "another --out, or pass --overwrite to replace it")
    return out
