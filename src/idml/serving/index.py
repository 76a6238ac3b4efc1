"""faiss indexes over semantic embeddings, bound to the model that made them.

The index searches the unit-norm semantic embeddings by inner product (= cosine):
``exact`` (``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, k-means cells trained on the data,
``nprobe`` cells visited per query) or ``hnsw`` (``IndexHNSWFlat``, a proximity graph).

An index folder holds ``index.faiss`` (``faiss.write_index``), ``embeddings.npz`` (semantic
and uncertainty arrays, for re-ranking), optionally ``thumbnails.npy`` and
``thumbnail_offsets.npy`` (the items' thumbnails, :mod:`idml.serving.thumbnails`) and
``meta.json`` (kind, parameters, the model fingerprint, dimensions, count, paths, labels,
class names, SHA-256 of the other files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from idml import __version__
from idml.core.errors import IdmlError
from idml.core.io import atomic_folder, atomic_write, atomic_write_text, sha256_file
from idml.serving.embeddings import EmbeddingSet
from idml.serving.thumbnails import Thumbnails

INDEX_FORMAT = "idml-index"
INDEX_VERSION = 1
KINDS = ("exact", "ivf", "hnsw")
INDEX_FILE, ARRAYS_FILE, META_FILE = "index.faiss", "embeddings.npz", "meta.json"
#: Thumbnails: the encoded bytes one after another (memory-mapped when loaded, so a large
#: index's thumbnails stay on disk until shown) and the offsets of each item's.
THUMBS_FILE, THUMB_OFFSETS_FILE = "thumbnails.npy", "thumbnail_offsets.npy"
_THUMB_FILES = (THUMBS_FILE, THUMB_OFFSETS_FILE)
_FAISS_TYPES = {"exact": "IndexFlatIP", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}


class IndexFormatError(IdmlError):
    """An index folder that cannot be used; the message names the folder or file."""


@dataclasses.dataclass
class RetrievalIndex:
    """A faiss index with the embeddings, paths and labels of the items it holds."""

    index: Any  #: the faiss index over ``semantic`` (inner product)
    kind: str  #: exact | ivf | hnsw
    params: dict[str, Any]  #: nlist/nprobe (ivf), m/ef_construction/ef_search (hnsw)
    semantic: np.ndarray  #: float32 [N, D], unit rows
    uncertainty: np.ndarray  #: float32 [N, Du]
    paths: list[str]
    labels: np.ndarray  #: int64 [N], -1 = unknown
    meta: dict[str, Any]  #: fingerprint, checkpoint, class_names, ism, ...
    location: str | None = None  #: the folder it was loaded from or saved to
    thumbnails: Thumbnails | None = None  #: one per item, where the index was built with them

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the model that embedded the items."""
        return self.meta.get("fingerprint")

    @property
    def semantic_dim(self) -> int:
        return int(self.semantic.shape[1])

    @property
    def uncertainty_dim(self) -> int:
        return int(self.uncertainty.shape[1])

    def label_name(self, label: int) -> str | None:
        """The class name of ``label`` where the embeddings recorded one."""
        names = self.meta.get("class_names") or []
        return str(names[label]) if 0 <= label < len(names) else None


def default_nlist(count: int) -> int:
    """IVF cells for ``count`` items: about ``4 sqrt(N)``, with >= 39 training points per cell."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


def default_nprobe(nlist: int) -> int:
    """IVF cells visited per query by default: a quarter of them, at least 8 (or all)."""
    return min(nlist, max(8, nlist // 4))


def build_index(
    embeddings: EmbeddingSet,
    kind: str = "exact",
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 64,
    ef_search: int = 128,
    seed: int = 0,
) -> RetrievalIndex:
    """Index the semantic embeddings of ``embeddings`` (see the module docstring for kinds).

    ``ivf``: ``nlist`` cells (default :func:`default_nlist`), k-means trained on the
    embeddings with ``seed``; ``nprobe`` cells searched (default :func:`default_nprobe`).
    ``hnsw``: ``hnsw_m`` links per node, ``ef_construction`` / ``ef_search`` beam widths.
    """
    embeddings.validate("embeddings")
    semantic = np.ascontiguousarray(embeddings.semantic, dtype=np.float32)
    n, dim = semantic.shape
    if n == 0:
        raise IdmlError("cannot index an empty embedding set")
    if kind == "exact":
        index, params = faiss.IndexFlatIP(dim), {}
    elif kind == "ivf":
        index, params = _ivf_index(semantic, nlist, nprobe, seed)
    elif kind == "hnsw":
        index, params = _hnsw_index(dim, hnsw_m, ef_construction, ef_search)
    else:
        raise IdmlError(f"unknown index kind {kind!r}; use {', '.join(KINDS)}")
    index.add(semantic)
    meta = {k: v for k, v in embeddings.meta.items()
            if k not in ("format", "version", "count", "semantic_dim", "uncertainty_dim")}
    return RetrievalIndex(
        index=index,
        kind=kind,
        params=params,
        semantic=semantic,
        uncertainty=np.ascontiguousarray(embeddings.uncertainty, dtype=np.float32),
        paths=[str(p) for p in embeddings.paths],
        labels=np.asarray(embeddings.labels, dtype=np.int64),
        meta=meta,
    )


def check_nprobe(nprobe: int, nlist: int) -> int:
    """``nprobe``, if it is in ``[1, nlist]`` (cells an IVF search may visit)."""
    if not 1 <= nprobe <= nlist:
        raise IdmlError(f"nprobe must be in [1, nlist={nlist}], got {nprobe}")
    return nprobe


def _ivf_index(semantic: np.ndarray, nlist: int | None, nprobe: int | None,
               seed: int) -> tuple[Any, dict[str, Any]]:
    """An inverted-file index with k-means cells trained on ``semantic`` (not yet filled)."""
    n, dim = semantic.shape
    defaulted, nlist = nlist is None, default_nlist(n) if nlist is None else nlist
    if not 1 <= nlist <= n:
        raise IdmlError(f"nlist must be in [1, {n}] (the number of items), got {nlist}")
    nprobe = check_nprobe(default_nprobe(nlist) if nprobe is None else nprobe, nlist)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    if defaulted:  # fewer than 39 items: one cell, without faiss's warning about it
        index.cp.min_points_per_centroid = 1
    index.train(semantic)
    index.nprobe = nprobe
    return index, {"nlist": nlist, "nprobe": nprobe, "seed": seed}


def _hnsw_index(dim: int, m: int, ef_construction: int,
                ef_search: int) -> tuple[Any, dict[str, Any]]:
    """A proximity-graph index (not yet filled)."""
    if m < 2 or ef_construction < 1 or ef_search < 1:
        raise IdmlError(f"hnsw needs m >= 2 and positive ef values, got m={m}, "
                        f"ef_construction={ef_construction}, ef_search={ef_search}")
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    return index, {"m": m, "ef_construction": ef_construction, "ef_search": ef_search}


def is_index_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an index folder written by idml (only its three files, and the
    format marker in its meta) or an empty folder: what :func:`save_index` may replace."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    if not names:
        return True
    if not names <= {INDEX_FILE, ARRAYS_FILE, META_FILE, *_THUMB_FILES}:
        return False
    try:
        return json.loads((folder / META_FILE).read_text()).get("format") == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_index(index: RetrievalIndex, directory: str | os.PathLike) -> Path:
    """Write ``index`` into ``directory``: index.faiss, embeddings.npz, meta.json (and
    the thumbnail files where it has thumbnails).

    The folder is written whole beside its place and renamed into it, so readers see the
    old index or the new one, never a mix; an interrupted write leaves no temporary folder.
    """
    folder = Path(directory)
    with atomic_folder(folder) as tmp:
        _write_index_files(index, tmp)
    index.location = str(folder)
    return folder


def _write_index_files(index: RetrievalIndex, folder: Path) -> None:
    faiss.write_index(index.index, str(folder / INDEX_FILE))
    atomic_write(folder / ARRAYS_FILE, lambda fh: np.savez(
        fh, semantic=index.semantic, uncertainty=index.uncertainty))
    thumbs = index.thumbnails
    if thumbs is not None:
        atomic_write(folder / THUMBS_FILE, lambda fh: np.save(fh, thumbs.data))
        atomic_write(folder / THUMB_OFFSETS_FILE, lambda fh: np.save(fh, thumbs.offsets))
    meta = {
        **index.meta,
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "idml_version": __version__,
        "kind": index.kind,
        "params": index.params,
        "semantic_dim": index.semantic_dim,
        "uncertainty_dim": index.uncertainty_dim,
        "count": len(index),
        "paths": index.paths,
        "labels": index.labels.tolist(),
        "sha256": {name: sha256_file(folder / name)
                   for name in (INDEX_FILE, ARRAYS_FILE, *_THUMB_FILES)
                   if (folder / name).is_file()},
    }
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))


#: What every index meta file must hold.
_META_FIELDS = ("kind", "params", "semantic_dim", "uncertainty_dim", "count", "paths", "labels",
                "sha256")


def load_index(directory: str | os.PathLike) -> RetrievalIndex:
    """Read an index folder written by :func:`save_index`, checking every file.

    A missing, damaged or inconsistent file raises :class:`IndexFormatError` naming it.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise IndexFormatError(f"index folder {folder} does not exist")
    for name in (META_FILE, INDEX_FILE, ARRAYS_FILE):
        if not (folder / name).is_file():
            raise IndexFormatError(f"index folder {folder} lacks {name} (not an idml index, "
                                   "or an incomplete copy)")
    meta = _read_meta(folder)
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as exc:
        raise IndexFormatError(f"cannot read faiss index {folder / INDEX_FILE} ({exc})") from exc
    arrays = _read_arrays(folder / ARRAYS_FILE, ("semantic", "uncertainty"))
    semantic, uncertainty = arrays["semantic"], arrays["uncertainty"]
    thumbnails = None
    if THUMBS_FILE in meta["sha256"]:
        thumbnails = Thumbnails(_read_npy(folder / THUMBS_FILE, mmap=True),
                                _read_npy(folder / THUMB_OFFSETS_FILE))
    labels = np.asarray(meta["labels"], dtype=np.int64)
    problems = _inconsistencies(index, meta, semantic, uncertainty, labels)
    if thumbnails is not None:
        problems += thumbnails.check(len(labels))
    if problems:
        raise IndexFormatError(f"index folder {folder} is inconsistent: {'; '.join(problems)}")
    keep = {k: v for k, v in meta.items() if k not in (*_META_FIELDS, "format", "version")}
    return RetrievalIndex(
        index=index, kind=meta["kind"], params=dict(meta["params"]), semantic=semantic,
        uncertainty=uncertainty, paths=[str(p) for p in meta["paths"]], labels=labels,
        meta=keep, location=str(folder), thumbnails=thumbnails,
    )


def _read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """The array of the ``.npy`` file ``path`` (memory-mapped, read-only, with ``mmap``); a
    bad file raises :class:`IndexFormatError` naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        raise IndexFormatError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc


def _read_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the ``.npz`` file ``path``; a bad file raises
    :class:`IndexFormatError` naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in names}
    except Exception as exc:
        raise IndexFormatError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc


def _read_meta(folder: Path) -> dict[str, Any]:
    """``meta.json``, checked: format, version, fields, kind, and the other files' SHA-256."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{meta_path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{meta_path} is not the meta file of an idml index")
    if meta.get("version") != INDEX_VERSION:
        raise IndexFormatError(f"{meta_path}: index version {meta.get('version')!r}; this idml "
                               f"reads {INDEX_VERSION}")
    missing = [k for k in _META_FIELDS if k not in meta]
    if missing:
        raise IndexFormatError(f"{meta_path} lacks {', '.join(missing)}")
    if meta["kind"] not in KINDS:
        raise IndexFormatError(f"{meta_path}: unknown index kind {meta['kind']!r}")
    if not isinstance(meta["sha256"], dict):
        raise IndexFormatError(f"{meta_path}: field sha256 must map file names to digests, "
                               f"got {type(meta['sha256']).__name__}")
    for name in _THUMB_FILES:
        if (THUMBS_FILE in meta["sha256"]) != (name in meta["sha256"]):
            raise IndexFormatError(f"{meta_path} lists one thumbnail file without the other")
        if name in meta["sha256"] and not (folder / name).is_file():
            raise IndexFormatError(f"index folder {folder} lacks {name}, which {meta_path} "
                                   "lists")
    for name in (INDEX_FILE, ARRAYS_FILE, *_THUMB_FILES):
        expected = meta["sha256"].get(name)
        if expected is not None and sha256_file(folder / name) != expected:
            raise IndexFormatError(f"{folder / name} is damaged or was replaced: its SHA-256 "
                                   f"differs from the one recorded in {meta_path}")
    return meta


def _inconsistencies(index: Any, meta: dict[str, Any], semantic: np.ndarray,
                     uncertainty: np.ndarray, labels: np.ndarray) -> list[str]:
    """What does not agree between the faiss index, the arrays and the meta file."""
    kind, count, paths = meta["kind"], meta["count"], meta["paths"]
    problems = []
    if type(index).__name__ != _FAISS_TYPES[kind]:
        problems.append(f"faiss index is a {type(index).__name__}, meta says {kind}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        problems.append("faiss index does not use inner product")
    if semantic.dtype != np.float32 or uncertainty.dtype != np.float32:
        problems.append("embeddings are not float32")
    dims = (semantic.shape[1:], uncertainty.shape[1:])
    if dims != ((meta["semantic_dim"],), (meta["uncertainty_dim"],)) or index.d != dims[0][0]:
        problems.append(f"dimensions differ (faiss {index.d}, arrays {dims}, meta "
                        f"{meta['semantic_dim']}/{meta['uncertainty_dim']})")
    sizes = {index.ntotal, len(semantic), len(uncertainty), len(paths), len(labels), count}
    if len(sizes) != 1:
        problems.append(f"item counts differ (faiss {index.ntotal}, arrays {len(semantic)}/"
                        f"{len(uncertainty)}, paths {len(paths)}, labels {len(labels)}, "
                        f"meta {count})")
    return problems
