"""Retrieval: faiss indexes over semantic embeddings, search with introspective re-ranking.

The index searches the unit-norm semantic embeddings by inner product (= cosine):
``exact`` (``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, k-means cells trained on the data,
``nprobe`` cells visited per query) or ``hnsw`` (``IndexHNSWFlat``, a proximity graph). Each
result carries its cosine similarity, its Euclidean distance on the unit sphere
``sqrt(2 - 2 cos)`` and its introspective similarity with the query (the ISM of
:mod:`idml.method.metric`, cosine form, with the model's ``a``, ``b`` and uncertainty distance), and
each query its confidence: its uncertainty ``||u||^2`` and the semantic gap ``cos_1 - cos_2``
of its first two neighbours. ``rerank="introspective"`` takes a shortlist from faiss and
orders it by the ISM.

An index folder holds ``index.faiss`` (``faiss.write_index``), ``embeddings.npz`` (semantic
and uncertainty arrays, for re-ranking) and ``meta.json`` (kind, parameters, the model
fingerprint, dimensions, count, paths, labels, class names, SHA-256 of the two other files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from idml import __version__
from idml.method.metric import RELEASE_A, RELEASE_B, introspective_distance, uncertainty_distance
from idml.serving.embedder import Embedder, EmbeddingSet, collect_images

INDEX_FORMAT = "idml-index"
INDEX_VERSION = 1
KINDS = ("exact", "ivf", "hnsw")
RERANKS = ("introspective",)
INDEX_FILE, ARRAYS_FILE, META_FILE = "index.faiss", "embeddings.npz", "meta.json"
_FAISS_TYPES = {"exact": "IndexFlatIP", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}


class IndexFormatError(ValueError):
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
        raise ValueError("cannot index an empty embedding set")
    params: dict[str, Any]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
        params = {}
    elif kind == "ivf":
        defaulted, nlist = nlist is None, default_nlist(n) if nlist is None else nlist
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}] (the number of items), got {nlist}")
        nprobe = default_nprobe(nlist) if nprobe is None else nprobe
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"nprobe must be in [1, nlist={nlist}], got {nprobe}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        if defaulted:  # fewer than 39 items: one cell, without faiss's warning about it
            index.cp.min_points_per_centroid = 1
        index.train(semantic)
        index.nprobe = nprobe
        params = {"nlist": nlist, "nprobe": nprobe, "seed": seed}
    elif kind == "hnsw":
        if hnsw_m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError(f"hnsw needs m >= 2 and positive ef values, got m={hnsw_m}, "
                             f"ef_construction={ef_construction}, ef_search={ef_search}")
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    else:
        raise ValueError(f"unknown index kind {kind!r}; use {', '.join(KINDS)}")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_index(index: RetrievalIndex, directory: str | os.PathLike) -> Path:
    """Write ``index`` into ``directory`` (created): index.faiss, embeddings.npz, meta.json."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / INDEX_FILE, lambda tmp: faiss.write_index(index.index, tmp))

    def write_arrays(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, semantic=index.semantic, uncertainty=index.uncertainty)

    _write_atomic(folder / ARRAYS_FILE, write_arrays)
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
        "sha256": {name: _sha256(folder / name) for name in (INDEX_FILE, ARRAYS_FILE)},
    }

    def write_meta(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(meta, indent=1))

    _write_atomic(folder / META_FILE, write_meta)
    index.location = str(folder)
    return folder


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
    required = ("kind", "params", "semantic_dim", "uncertainty_dim", "count", "paths",
                "labels", "sha256")
    missing = [k for k in required if k not in meta]
    if missing:
        raise IndexFormatError(f"{meta_path} lacks {', '.join(missing)}")
    kind = meta["kind"]
    if kind not in KINDS:
        raise IndexFormatError(f"{meta_path}: unknown index kind {kind!r}")
    for name in (INDEX_FILE, ARRAYS_FILE):
        expected = (meta["sha256"] or {}).get(name)
        if expected is not None and _sha256(folder / name) != expected:
            raise IndexFormatError(f"{folder / name} is damaged or was replaced: its SHA-256 "
                                   f"differs from the one recorded in {meta_path}")
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as exc:
        raise IndexFormatError(f"cannot read faiss index {folder / INDEX_FILE} ({exc})") from exc
    try:
        with np.load(folder / ARRAYS_FILE, allow_pickle=False) as data:
            semantic, uncertainty = data["semantic"], data["uncertainty"]
    except Exception as exc:
        raise IndexFormatError(f"cannot read {folder / ARRAYS_FILE} ({type(exc).__name__}: "
                               f"{exc})") from exc
    count, paths = meta["count"], meta["paths"]
    labels = np.asarray(meta["labels"], dtype=np.int64)
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
    if problems:
        raise IndexFormatError(f"index folder {folder} is inconsistent: {'; '.join(problems)}")
    keep = {k: v for k, v in meta.items() if k not in (*required, "format", "version")}
    return RetrievalIndex(
        index=index, kind=kind, params=dict(meta["params"]), semantic=semantic,
        uncertainty=uncertainty, paths=[str(p) for p in paths], labels=labels, meta=keep,
        location=str(folder),
    )


# ----------------------------------------------------------------------------------------------
# Search


@dataclasses.dataclass
class Hit:
    """One retrieved item."""

    rank: int  #: 1-based
    id: int  #: row of the item in the index
    path: str
    label: int  #: -1 = unknown
    cosine: float  #: cosine similarity of the semantic embeddings
    distance: float  #: Euclidean distance on the unit sphere, sqrt(2 - 2 cos)
    introspective: float  #: introspective similarity 1 - D_IN (larger = closer)
    introspective_distance: float  #: D_IN (smaller = closer; full float32 resolution)
    label_name: str | None = None


@dataclasses.dataclass
class QueryResult:
    """The hits of one query with its confidence."""

    query: str | None  #: the query's path, where known
    uncertainty: float  #: ||u||^2 of the query (larger = less trustworthy)
    semantic_gap: float | None  #: cos of 1st minus 2nd semantic neighbour (None: < 2 items)
    hits: list[Hit]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SearchResult:
    """Results of :func:`search`, one :class:`QueryResult` per query, in query order."""

    queries: list[QueryResult]
    k: int
    rerank: str | None
    shortlist: int | None
    ism: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ids(self) -> list[list[int]]:
        """Row ids of the hits, per query."""
        return [[h.id for h in q.hits] for q in self.queries]


def ism_distances(
    query_semantic: np.ndarray,
    query_uncertainty: np.ndarray,
    semantic: np.ndarray,
    uncertainty: np.ndarray,
    *,
    a: float = RELEASE_A,
    b: float = RELEASE_B,
    beta: str = "difference",
) -> np.ndarray:
    """Introspective distance ``D_IN`` (cosine form) of one query with ``[M]`` items.

    ``D_IN = (1 - cos) * exp(-(beta_ij + b) / (a * ||s_i - s_j||^2))``; the introspective
    similarity is ``1 - D_IN``. Ranking by ``D_IN`` (ascending) keeps the resolution that
    ``1 - D_IN`` loses in float32 near 1 (with the release's constants, close neighbours
    have ``D_IN`` around 1e-9).
    """
    s = torch.from_numpy(np.asarray(query_semantic, np.float32).reshape(1, -1))
    u = torch.from_numpy(np.asarray(query_uncertainty, np.float32).reshape(1, -1))
    t = torch.from_numpy(np.asarray(semantic, np.float32))
    v = torch.from_numpy(np.asarray(uncertainty, np.float32))
    cos = s @ t.T
    sq = (2.0 - 2.0 * cos).clamp_min(0.0)
    bet = uncertainty_distance(u, v, beta)  # type: ignore[arg-type]
    return introspective_distance(1.0 - cos, bet, sq, a=a, b=b)[0].numpy()


def _set_search_width(index: RetrievalIndex, fetch: int) -> None:
    if index.kind == "ivf":
        faiss.extract_index_ivf(index.index).nprobe = int(index.params["nprobe"])
    elif index.kind == "hnsw":
        index.index.hnsw.efSearch = max(int(index.params["ef_search"]), fetch)


def search(
    index: RetrievalIndex,
    query_semantic: np.ndarray,
    query_uncertainty: np.ndarray,
    k: int = 10,
    *,
    rerank: str | None = None,
    shortlist: int = 100,
    ism: dict[str, Any] | None = None,
    query_paths: list[str] | None = None,
) -> SearchResult:
    """The top-``k`` items of ``index`` for each query (rows of ``query_semantic`` [Q, D]).

    Without ``rerank`` the hits are faiss's nearest neighbours by cosine. With
    ``rerank="introspective"`` faiss returns ``shortlist`` candidates (at least ``k``) and
    the ``k`` with the highest introspective similarity (lowest ``D_IN``) are kept, in that
    order (ties by cosine). ``ism``: ``{"a", "b", "beta"}`` of the ISM (default: those
    recorded with the embeddings, else the release's ``a=5, b=4, difference``). The semantic
    gap uses the candidates faiss returned.
    """
    q_sem = np.ascontiguousarray(query_semantic, dtype=np.float32)
    q_unc = np.asarray(query_uncertainty, dtype=np.float32)
    if q_sem.ndim != 2 or q_sem.shape[1] != index.semantic_dim:
        raise ValueError(f"query semantic embeddings must be [Q, {index.semantic_dim}] for this "
                         f"index, got {q_sem.shape}")
    if q_unc.shape != (len(q_sem), index.uncertainty_dim):
        raise ValueError(f"query uncertainty embeddings must be [{len(q_sem)}, "
                         f"{index.uncertainty_dim}] for this index, got {q_unc.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rerank not in (None, *RERANKS):
        raise ValueError(f"unknown rerank {rerank!r}; use {', '.join(RERANKS)} or none")
    if rerank is not None and shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    if query_paths is not None and len(query_paths) != len(q_sem):
        raise ValueError(f"{len(query_paths)} query paths for {len(q_sem)} queries")
    params = {"a": RELEASE_A, "b": RELEASE_B, "beta": "difference",
              **(index.meta.get("ism") or {}), **(ism or {})}
    fetch = min(len(index), max(k, 2, shortlist if rerank else 0))
    _set_search_width(index, fetch)
    _, found = index.index.search(q_sem, fetch)
    results = []
    for i, row in enumerate(found):
        ids = row[row >= 0]
        cos = index.semantic[ids] @ q_sem[i]
        by_cos = np.argsort(-cos, kind="stable")
        ids, cos = ids[by_cos], cos[by_cos]
        gap = float(cos[0] - cos[1]) if len(cos) >= 2 else None
        if rerank is None:
            ids, cos = ids[:k], cos[:k]
        d_in = ism_distances(q_sem[i], q_unc[i], index.semantic[ids], index.uncertainty[ids],
                             a=params["a"], b=params["b"], beta=params["beta"])
        if rerank is not None:
            order = np.argsort(d_in, kind="stable")[:k]
            ids, cos, d_in = ids[order], cos[order], d_in[order]
        hits = [
            Hit(rank=r + 1, id=int(j), path=index.paths[j], label=int(index.labels[j]),
                cosine=float(c), distance=math.sqrt(max(0.0, 2.0 - 2.0 * float(c))),
                introspective=1.0 - float(d), introspective_distance=float(d),
                label_name=index.label_name(int(index.labels[j])))
            for r, (j, c, d) in enumerate(zip(ids, cos, d_in, strict=True))
        ]
        results.append(QueryResult(
            query=None if query_paths is None else str(query_paths[i]),
            uncertainty=float(np.square(q_unc[i], dtype=np.float64).sum()),
            semantic_gap=gap, hits=hits,
        ))
    return SearchResult(results, k, rerank, shortlist if rerank else None, params)


def check_compatible(index: RetrievalIndex, fingerprint: str, semantic_dim: int,
                     uncertainty_dim: int, model: str = "the model") -> None:
    """Raise ``ValueError`` unless ``model`` (fingerprint and sizes) made the index's items."""
    where = index.location or "the index"
    built_by = index.meta.get("checkpoint") or "an unknown checkpoint"
    if (semantic_dim, uncertainty_dim) != (index.semantic_dim, index.uncertainty_dim):
        raise ValueError(
            f"embedding size mismatch: index {where} holds {index.semantic_dim}-d semantic / "
            f"{index.uncertainty_dim}-d uncertainty embeddings (built by {built_by}), but "
            f"{model} produces {semantic_dim}-d / {uncertainty_dim}-d"
        )
    if index.fingerprint != fingerprint:
        raise ValueError(
            f"model mismatch: index {where} was built by model {index.fingerprint} "
            f"({built_by}), but {model} is model {fingerprint}; embed and index the gallery "
            "with this checkpoint, or search with the checkpoint that built the index"
        )


def search_images(
    index: RetrievalIndex,
    embedder: Embedder,
    queries: list[str | os.PathLike],
    k: int = 10,
    *,
    rerank: str | None = None,
    shortlist: int = 100,
) -> SearchResult:
    """Embed query images (files and/or folders) with ``embedder`` and :func:`search` them.

    The embedder must be the model that built the index (same fingerprint and sizes,
    :func:`check_compatible`); the ISM uses the constants it was trained with.
    """
    check_compatible(index, embedder.fingerprint, embedder.semantic_dim,
                     embedder.uncertainty_dim, model=f"checkpoint {embedder.checkpoint}")
    paths = collect_images(queries)
    semantic, uncertainty = embedder.embed(paths)
    return search(index, semantic, uncertainty, k, rerank=rerank, shortlist=shortlist,
                  ism=embedder.ism_params, query_paths=paths)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_results(result: SearchResult) -> str:
    """Plain-text tables of a :class:`SearchResult`, one block per query."""
    blocks = []
    for n, q in enumerate(result.queries, 1):
        head = (f"query {n}: {q.query or '(array)'}  uncertainty ||u||^2 {q.uncertainty:.4g}  "
                f"semantic gap {_fmt(q.semantic_gap)}")
        rows = [f"{'rank':>4}  {'cosine':>7}  {'distance':>8}  {'ISM sim':>8}  {'ISM D_IN':>9}  "
                f"{'label':<12}  path"]
        for h in q.hits:
            label = "-" if h.label < 0 else (h.label_name or str(h.label))
            rows.append(f"{h.rank:>4}  {h.cosine:>7.4f}  {h.distance:>8.4f}  "
                        f"{h.introspective:>8.4f}  {h.introspective_distance:>9.3g}  "
                        f"{label:<12}  {h.path}")
        blocks.append("\n".join([head, *rows]))
    return "\n\n".join(blocks)
