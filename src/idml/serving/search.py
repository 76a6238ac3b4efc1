"""Search an index with introspective re-ranking and a confidence per query.

Each result carries its cosine similarity, its Euclidean distance on the unit sphere
``sqrt(2 - 2 cos)`` and its introspective similarity with the query (the ISM of
:mod:`idml.method.metric`, cosine form, with the model's ``a``, ``b`` and uncertainty
distance), and each query its confidence: its uncertainty ``||u||^2`` and the semantic gap
``cos_1 - cos_2`` of its first two neighbours. ``rerank="introspective"`` takes a shortlist
from faiss and orders it by the ISM.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch

from idml.core.errors import IdmlError
from idml.data.sources import collect_images
from idml.method.metric import (
    RELEASE_ISM,
    ISMParams,
    introspective_distance,
    uncertainty_distance,
    uncertainty_score,
)
from idml.serving.embedder import Embedder
from idml.serving.index import RetrievalIndex, check_nprobe

RERANKS = ("introspective",)


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
    ism: ISMParams

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
    ism: ISMParams = RELEASE_ISM,
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
    bet = uncertainty_distance(u, v, ism.beta)  # type: ignore[arg-type]
    return introspective_distance(1.0 - cos, bet, sq, a=ism.a, b=ism.b)[0].numpy()


def search_parameters(index: RetrievalIndex, fetch: int, *, nprobe: int | None = None,
                      ef_search: int | None = None) -> Any:
    """faiss ``SearchParameters`` for one call: ``nprobe`` (ivf) or ``ef_search`` (hnsw, at
    least ``fetch``), default the index's own. Passed to ``index.search(..., params=)``, they
    never touch the shared index, so concurrent searches with different widths do not race
    (setting ``index.nprobe`` / ``hnsw.efSearch`` would)."""
    if nprobe is not None and index.kind != "ivf":
        raise IdmlError(f"nprobe applies to ivf indexes; this one is {index.kind}")
    if ef_search is not None and index.kind != "hnsw":
        raise IdmlError(f"ef_search applies to hnsw indexes; this one is {index.kind}")
    if index.kind == "ivf":
        nprobe = int(index.params["nprobe"]) if nprobe is None else nprobe
        return faiss.SearchParametersIVF(nprobe=check_nprobe(nprobe, int(index.params["nlist"])))
    if index.kind == "hnsw":
        ef_search = int(index.params["ef_search"]) if ef_search is None else ef_search
        if not 1 <= ef_search < 2**31:  # faiss keeps it in a C int
            raise IdmlError(f"ef_search must be in [1, 2^31), got {ef_search}")
        return faiss.SearchParametersHNSW(efSearch=max(ef_search, fetch))
    return None


def _faiss_search(index: Any, queries: np.ndarray, k: int, params: Any) -> np.ndarray:
    """Row ids ``[Q, k]`` of ``index.search(queries, k, params=params)``, by faiss's low-level
    ``search_c``: pytorch-metric-learning imports ``faiss.contrib.torch_utils``, which replaces
    ``Index.search`` with a version that has no ``params`` argument."""
    n = len(queries)
    distances = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    index.search_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(distances),
                   faiss.swig_ptr(ids), params)
    return ids


def search(
    index: RetrievalIndex,
    query_semantic: np.ndarray,
    query_uncertainty: np.ndarray,
    k: int = 10,
    *,
    rerank: str | None = None,
    shortlist: int = 100,
    ism: ISMParams | None = None,
    query_paths: list[str] | None = None,
    exclude: Sequence[int] | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> SearchResult:
    """The top-``k`` items of ``index`` for each query (rows of ``query_semantic`` [Q, D]).

    Without ``rerank`` the hits are faiss's nearest neighbours by cosine. With
    ``rerank="introspective"`` faiss returns ``shortlist`` candidates (at least ``k``) and
    the ``k`` with the highest introspective similarity (lowest ``D_IN``) are kept, in that
    order (ties by cosine). ``ism``: the ISM's constants (default: those recorded with the
    embeddings, else the release's ``a=5, b=4, difference``). The semantic
    gap uses the candidates faiss returned. ``exclude``: per query, a row left out of its
    results (an indexed item searched for itself; -1: none). ``nprobe`` / ``ef_search``: this
    call's search width (:func:`search_parameters`; the index is not changed).
    """
    q_sem = np.ascontiguousarray(query_semantic, dtype=np.float32)
    q_unc = np.asarray(query_uncertainty, dtype=np.float32)
    _check_query(index, q_sem, q_unc, k, rerank, shortlist, query_paths)
    if ism is None:
        recorded = index.meta.get("ism")
        ism = ISMParams.from_dict(recorded) if recorded else RELEASE_ISM
    skip = np.full(len(q_sem), -1, np.int64) if exclude is None else np.asarray(exclude)
    if skip.shape != (len(q_sem),):
        raise IdmlError(f"exclude must name one row per query ({len(q_sem)}), got {skip.shape}")
    fetch = min(len(index), max(k, 2, shortlist if rerank else 0) + int((skip >= 0).any()))
    params = search_parameters(index, fetch, nprobe=nprobe, ef_search=ef_search)
    found = _faiss_search(index.index, q_sem, fetch, params)
    scores = uncertainty_score(torch.from_numpy(q_unc)).numpy()
    results = [
        QueryResult(query=None if query_paths is None else str(query_paths[i]),
                    uncertainty=float(scores[i]),
                    **_ranked_hits(index, q_sem[i], q_unc[i], row[row != skip[i]], k, rerank,
                                   ism))
        for i, row in enumerate(found)
    ]
    return SearchResult(results, k, rerank, shortlist if rerank else None, ism)


def _check_query(index: RetrievalIndex, q_sem: np.ndarray, q_unc: np.ndarray, k: int,
                 rerank: str | None, shortlist: int, query_paths: list[str] | None) -> None:
    """Raise :class:`IdmlError` naming the argument that does not fit ``index``."""
    if q_sem.ndim != 2 or q_sem.shape[1] != index.semantic_dim:
        raise IdmlError(f"query semantic embeddings must be [Q, {index.semantic_dim}] for this "
                        f"index, got {q_sem.shape}")
    if q_unc.shape != (len(q_sem), index.uncertainty_dim):
        raise IdmlError(f"query uncertainty embeddings must be [{len(q_sem)}, "
                        f"{index.uncertainty_dim}] for this index, got {q_unc.shape}")
    if k < 1:
        raise IdmlError(f"k must be >= 1, got {k}")
    if rerank not in (None, *RERANKS):
        raise IdmlError(f"unknown rerank {rerank!r}; use {', '.join(RERANKS)} or none")
    if rerank is not None and shortlist < 1:
        raise IdmlError(f"shortlist must be >= 1, got {shortlist}")
    if query_paths is not None and len(query_paths) != len(q_sem):
        raise IdmlError(f"{len(query_paths)} query paths for {len(q_sem)} queries")


def _ranked_hits(index: RetrievalIndex, q_sem: np.ndarray, q_unc: np.ndarray,
                 found: np.ndarray, k: int, rerank: str | None,
                 ism: ISMParams) -> dict[str, Any]:
    """The hits of one query among faiss's candidates ``found`` and its semantic gap."""
    ids = found[found >= 0]
    cos = index.semantic[ids] @ q_sem
    by_cos = np.argsort(-cos, kind="stable")
    ids, cos = ids[by_cos], cos[by_cos]
    gap = float(cos[0] - cos[1]) if len(cos) >= 2 else None
    if rerank is None:
        ids, cos = ids[:k], cos[:k]
    d_in = ism_distances(q_sem, q_unc, index.semantic[ids], index.uncertainty[ids], ism)
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
    return {"semantic_gap": gap, "hits": hits}


def check_compatible(index: RetrievalIndex, fingerprint: str, semantic_dim: int,
                     uncertainty_dim: int, model: str = "the model") -> None:
    """Raise ``ValueError`` unless ``model`` (fingerprint and sizes) made the index's items."""
    where = index.location or "the index"
    built_by = index.meta.get("checkpoint") or "an unknown checkpoint"
    if (semantic_dim, uncertainty_dim) != (index.semantic_dim, index.uncertainty_dim):
        raise IdmlError(
            f"embedding size mismatch: index {where} holds {index.semantic_dim}-d semantic / "
            f"{index.uncertainty_dim}-d uncertainty embeddings (built by {built_by}), but "
            f"{model} produces {semantic_dim}-d / {uncertainty_dim}-d"
        )
    if index.fingerprint != fingerprint:
        raise IdmlError(
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
                  ism=embedder.ism, query_paths=paths)


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
