"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from idml.core.errors import CheckpointError
from idml.core.io import atomic_write

FORMAT = "idml-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    A crash mid-write leaves the previous checkpoint intact, never a truncated one.
    """
    return atomic_write(
        path, lambda fh: torch.save({"format": FORMAT, "version": VERSION, **payload}, fh)
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    The whole file is checked first (:func:`verify_checkpoint_file`): a truncated file or a
    flipped byte inside a weight raises :class:`CheckpointError` instead of loading silently.
    """
    path = Path(path)
    verify_checkpoint_file(path)  # torch.load itself does not check the tensors' CRCs
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path}: not an idml checkpoint or damaged ({exc})"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an idml checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {data.get('version')!r}; this idml reads {VERSION}"
        )
    return data


def verify_checkpoint_file(path: str | Path) -> None:
    """Check every stored CRC-32 of a checkpoint (a zip archive); raise CheckpointError if bad.

    ``torch.load`` does not verify the checksums of tensor data, so a flipped byte inside a
    weight loads silently as a different weight; this reads the whole file once (fast) and
    catches that, as well as truncation and files that are not zip archives at all.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not an idml checkpoint or damaged ({exc})"
        ) from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: entry {bad} fails its CRC check")


def weights_fingerprint(state: dict[str, torch.Tensor], *extra: object) -> str:
    """Short stable hash (16 hex digits) of a state dict's names, dtypes, shapes and values.

    Independent of the device the tensors are on and of the dict's order; ``extra`` (plain
    values with a stable ``repr``) is hashed too, e.g. the preprocessing a model expects.
    """
    import hashlib

    digest = hashlib.sha256(repr(extra).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
