"""Embeddings files: the semantic and uncertainty embeddings of a set of images, with their
paths, labels and the fingerprint of the model that made them.

A file (:func:`save_embeddings` / :func:`load_embeddings`) is an ``.npz`` readable with
``allow_pickle=False``: ``semantic`` float32 ``[N, D]``, ``uncertainty`` float32 ``[N, Du]``,
``paths`` unicode ``[N]`` (absolute for image files), ``labels`` int64 ``[N]`` (-1 = unknown)
and ``meta``, a JSON string
(format ``idml-embeddings``, version 1, the model fingerprint, the checkpoint, the dimensions,
the idml version, the class names of the labels where known).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from idml.core.errors import IdmlError
from idml.core.io import atomic_write

EMBEDDINGS_FORMAT = "idml-embeddings"
EMBEDDINGS_VERSION = 1
#: Tolerance on ``||s|| = 1`` when an embeddings file is validated.
UNIT_TOLERANCE = 1e-3


class EmbeddingsError(IdmlError):
    """An embeddings file (or array set) that cannot be used; the message names the file."""


@dataclasses.dataclass
class EmbeddingSet:
    """Embeddings of a collection of images with their paths, labels and metadata."""

    semantic: np.ndarray  #: float32 ``[N, D]``, unit rows
    uncertainty: np.ndarray  #: float32 ``[N, Du]``
    paths: np.ndarray  #: unicode ``[N]``
    labels: np.ndarray  #: int64 ``[N]``, -1 = unknown
    meta: dict[str, Any]  #: format, version, fingerprint, checkpoint, dims, idml_version, ...

    def __len__(self) -> int:
        return len(self.semantic)

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the model that made the embeddings."""
        return self.meta.get("fingerprint")

    def validate(self, source: str = "embeddings") -> EmbeddingSet:
        """Raise :class:`EmbeddingsError` (naming ``source``) if the arrays are inconsistent."""
        s, u, p, y = self.semantic, self.uncertainty, self.paths, self.labels
        checks = [
            (s.dtype == np.float32 and s.ndim == 2, f"semantic must be float32 [N, D], got "
                                                    f"{s.dtype} {s.shape}"),
            (u.dtype == np.float32 and u.ndim == 2, f"uncertainty must be float32 [N, Du], got "
                                                    f"{u.dtype} {u.shape}"),
            (p.dtype.kind == "U" and p.ndim == 1, f"paths must be a unicode [N] array, got "
                                                  f"{p.dtype} {p.shape}"),
            (y.dtype == np.int64 and y.ndim == 1, f"labels must be int64 [N], got "
                                                  f"{y.dtype} {y.shape}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EmbeddingsError(f"{source}: {message}")
        counts = {len(s), len(u), len(p), len(y)}
        if len(counts) != 1:
            raise EmbeddingsError(
                f"{source}: row counts differ (semantic {len(s)}, uncertainty {len(u)}, "
                f"paths {len(p)}, labels {len(y)})"
            )
        if not (np.isfinite(s).all() and np.isfinite(u).all()):
            raise EmbeddingsError(f"{source}: embeddings contain NaN or Inf")
        if len(s) and np.abs(np.linalg.norm(s, axis=1) - 1.0).max() > UNIT_TOLERANCE:
            raise EmbeddingsError(f"{source}: semantic rows are not unit vectors")
        if self.meta.get("format") != EMBEDDINGS_FORMAT:
            raise EmbeddingsError(f"{source}: not an idml embeddings file (meta format "
                                  f"{self.meta.get('format')!r})")
        if self.meta.get("version") != EMBEDDINGS_VERSION:
            raise EmbeddingsError(f"{source}: embeddings version {self.meta.get('version')!r}; "
                                  f"this idml reads {EMBEDDINGS_VERSION}")
        dims = (self.meta.get("semantic_dim"), self.meta.get("uncertainty_dim"))
        if dims != (s.shape[1], u.shape[1]):
            raise EmbeddingsError(f"{source}: meta says dims {dims}, arrays have "
                                  f"{(s.shape[1], u.shape[1])}")
        return self


def is_embeddings_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an embeddings file written by idml (the format marker of its
    meta); anything unreadable is not."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
    except Exception:  # not a zip, no meta, not JSON: not ours
        return False
    return isinstance(meta, dict) and meta.get("format") == EMBEDDINGS_FORMAT


def save_embeddings(path: str | os.PathLike, embeddings: EmbeddingSet) -> Path:
    """Validate and write ``embeddings`` to ``path`` (``.npz``) atomically."""
    path = Path(path)
    embeddings.validate(str(path))
    return atomic_write(path, lambda fh: np.savez(
        fh,
        semantic=embeddings.semantic,
        uncertainty=embeddings.uncertainty,
        paths=embeddings.paths,
        labels=embeddings.labels,
        meta=np.array(json.dumps(embeddings.meta)),
    ))


def load_embeddings(path: str | os.PathLike) -> EmbeddingSet:
    """Read and validate an embeddings file; any problem raises :class:`EmbeddingsError`."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file {path} does not exist")
    keys = ("semantic", "uncertainty", "paths", "labels", "meta")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise EmbeddingsError(f"embeddings file {path} lacks {', '.join(missing)}")
            arrays = {k: data[k] for k in keys}
    except EmbeddingsError:
        raise
    except Exception as exc:  # zipfile, pickle refusal, truncated data, ...
        raise EmbeddingsError(
            f"cannot read embeddings file {path}: not an idml embeddings file or damaged "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise EmbeddingsError(f"embeddings file {path}: meta is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise EmbeddingsError(f"embeddings file {path}: meta is not a JSON object")
    return EmbeddingSet(meta=meta, **arrays).validate(f"embeddings file {path}")
