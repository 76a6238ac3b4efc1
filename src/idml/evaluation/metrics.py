"""Zero-shot retrieval evaluation as pure functions (the protocol of ``docs/method.md``).

Two protocols:

* :func:`retrieval_metrics` -- leave-one-out on one set (CUB-200-2011, Cars196, SOP): every
  test image is a query against all *other* test images; the query itself is removed by index.
* :func:`query_gallery_metrics` -- a query set against a separate gallery (In-Shop); nothing is
  excluded.

Metrics: Recall@K, R-Precision and MAP@R (Musgrave et al., "A Metric Learning Reality Check",
2020), and for the one-set protocol NMI and pairwise F1 of a k-means clustering. The kNN depth
is always large enough that neither Recall@K nor MAP@R is truncated (a defect of the reference
release). All values are plain Python floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from idml.core.errors import IdmlError
from idml.evaluation.knn import knn

#: Recall@K depths of the CUB-200-2011 / Cars196 protocol (SOP uses 1, 10, 100, 1000).
DEFAULT_KS = (1, 2, 4, 8)
#: Recall@K depths of the In-Shop protocol.
INSHOP_KS = (1, 10, 20, 30, 40, 50)
#: Lloyd iterations of the k-means behind NMI / F1 (faiss' own default is 25; 20 as in
#: pytorch-metric-learning's ``AccuracyCalculator``).
KMEANS_NITER = 20


def recall_at_k(
    neighbour_labels: torch.Tensor, query_labels: torch.Tensor, ks: Sequence[int]
) -> dict[int, float]:
    """Recall@K: fraction of queries with at least one of their first K neighbours in their class.

    ``neighbour_labels`` is ``[Q, depth]`` (labels of the ranked neighbours) and must have at
    least ``max(ks)`` columns. Every query counts, including one whose class has no other
    member in the reference (it is a miss).
    """
    depth = neighbour_labels.shape[1]
    if max(ks) > depth:
        raise IdmlError(f"recall@{max(ks)} needs {max(ks)} neighbours, got {depth}")
    hits = neighbour_labels == query_labels[:, None]
    return {k: hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def r_precision_and_map_at_r(
    neighbour_labels: torch.Tensor, query_labels: torch.Tensor, num_relevant: torch.Tensor
) -> tuple[float, float]:
    """R-Precision and MAP@R averaged over queries (Musgrave et al. 2020).

    ``num_relevant[q]`` = R, the number of items of the query's class in the reference (the
    query itself excluded). ``RP = (#relevant in top R) / R`` and
    ``MAP@R = (1/R) * sum_{i<=R} P@i * rel_i``. Queries with ``R = 0`` are skipped (as in
    pytorch-metric-learning); if every query has ``R = 0`` both values are ``nan``.
    ``neighbour_labels`` ``[Q, depth]`` must have at least ``max(R)`` columns.
    """
    r = num_relevant.to(neighbour_labels.device).long()
    keep = r > 0
    if not bool(keep.any()):
        return float("nan"), float("nan")
    neighbour_labels, query_labels, r = neighbour_labels[keep], query_labels[keep], r[keep]
    max_r = int(r.max())
    if max_r > neighbour_labels.shape[1]:
        raise IdmlError(f"MAP@R needs {max_r} neighbours, got {neighbour_labels.shape[1]}")

    ranks = torch.arange(1, max_r + 1, device=r.device)
    within_r = ranks[None, :] <= r[:, None]
    rel = (neighbour_labels[:, :max_r] == query_labels[:, None]) & within_r
    rel_f = rel.double()
    r_f = r.double()
    rp = rel_f.sum(dim=1) / r_f
    precision_at_i = rel_f.cumsum(dim=1) / ranks.double()
    map_r = (precision_at_i * rel_f).sum(dim=1) / r_f
    return rp.mean().item(), map_r.mean().item()


def pairwise_f1(cluster_ids: np.ndarray, labels: np.ndarray) -> float:
    """Pairwise F1 of a clustering (as in DML papers), from contingency counts.

    Over unordered pairs of items: precision = pairs sharing a cluster *and* a label / pairs
    sharing a cluster; recall = the same / pairs sharing a label. ``O(n log n)`` via the
    non-zero cells of the contingency table; never enumerates pairs.
    """
    cluster_ids = np.asarray(cluster_ids).ravel()
    labels = np.asarray(labels).ravel()
    _, cluster_codes = np.unique(cluster_ids, return_inverse=True)
    _, label_codes = np.unique(labels, return_inverse=True)
    joint = cluster_codes.astype(np.int64) * (int(label_codes.max()) + 1) + label_codes

    def pairs(codes: np.ndarray) -> int:
        counts = np.unique(codes, return_counts=True)[1].astype(np.int64)
        return int((counts * (counts - 1) // 2).sum())

    true_pos = pairs(joint)
    same_cluster, same_label = pairs(cluster_codes), pairs(label_codes)
    if true_pos == 0:
        return 0.0
    precision = true_pos / same_cluster
    recall = true_pos / same_label
    return 2.0 * precision * recall / (precision + recall)


def cluster_nmi_f1(
    embeddings: torch.Tensor, labels: torch.Tensor, *, seed: int = 0
) -> tuple[float, float]:
    """NMI and pairwise F1 of a k-means clustering against the labels.

    k = number of distinct labels. faiss ``Kmeans`` (plain Euclidean, not spherical: the
    embeddings are expected L2-normalised already, as in :func:`retrieval_metrics`),
    ``KMEANS_NITER`` iterations, fixed ``seed``. NMI is sklearn's
    ``normalized_mutual_info_score`` (arithmetic normalisation); F1 is :func:`pairwise_f1`.
    """
    x = np.ascontiguousarray(embeddings.detach().float().cpu().numpy())
    y = labels.detach().cpu().numpy().ravel()
    num_clusters = len(np.unique(y))
    if num_clusters > x.shape[0]:
        raise IdmlError("more classes than points")
    kmeans = faiss.Kmeans(
        x.shape[1], num_clusters, niter=KMEANS_NITER, seed=seed, spherical=False, verbose=False
    )
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    clusters = assignment.ravel()
    return float(normalized_mutual_info_score(y, clusters)), pairwise_f1(clusters, y)


def _label_counts(labels: torch.Tensor, reference_labels: torch.Tensor) -> torch.Tensor:
    """For each entry of ``labels``, how many times it occurs in ``reference_labels``."""
    ref_values, ref_counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(ref_values, labels).clamp(max=len(ref_values) - 1)
    found = ref_values[pos] == labels
    return torch.where(found, ref_counts[pos], torch.zeros_like(ref_counts[pos]))


def _ranked_metrics(
    neighbour_labels: torch.Tensor,
    query_labels: torch.Tensor,
    num_relevant: torch.Tensor,
    ks: Sequence[int],
) -> dict[str, float]:
    """Recall@K, RP and MAP@R. A K beyond the depth (= every candidate) uses the full list."""
    depth = neighbour_labels.shape[1]
    effective = {k: min(k, depth) for k in ks}
    recalls = recall_at_k(neighbour_labels, query_labels, sorted(set(effective.values())))
    metrics = {f"recall@{k}": recalls[effective[k]] for k in ks}
    rp, map_r = r_precision_and_map_at_r(neighbour_labels, query_labels, num_relevant)
    metrics["r_precision"] = rp
    metrics["map@r"] = map_r
    return metrics


def evaluation_depth(query_labels: torch.Tensor, ks: Sequence[int],
                     reference_labels: torch.Tensor | None = None) -> int:
    """The kNN depth at which neither Recall@K nor MAP@R is truncated: ``max(max(ks), R_max)``
    (``R`` = same-label items in the reference, the query itself excluded when
    ``reference_labels`` is ``None``), capped at the number of candidates."""
    return _depth(_num_relevant(query_labels, reference_labels), ks,
                  len(query_labels) - 1 if reference_labels is None else len(reference_labels))


def _num_relevant(query_labels: torch.Tensor,
                  reference_labels: torch.Tensor | None = None) -> torch.Tensor:
    """R per query: same-label items in the reference (leave-one-out: the others of the set)."""
    if reference_labels is None:
        return _label_counts(query_labels, query_labels) - 1
    return _label_counts(query_labels, reference_labels.to(query_labels.device))


def _depth(num_relevant: torch.Tensor, ks: Sequence[int], available: int) -> int:
    return min(max(max(ks), int(num_relevant.max())), available)


def _given_neighbours(neighbours: tuple[torch.Tensor, torch.Tensor], depth: int,
                      device: torch.device) -> torch.Tensor:
    indices = neighbours[1]
    if indices.shape[1] < depth:
        raise IdmlError(f"the neighbours given have {indices.shape[1]} columns; the metrics "
                        f"need {depth}")
    return indices[:, :depth].to(device)


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    clustering: bool = True,
    seed: int = 0,
    chunk_size: int = 1024,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Leave-one-out zero-shot evaluation on one set (query = gallery, self excluded by index).

    L2-normalises ``embeddings`` ``[N, D]``. Returns ``recall@K`` for each K in ``ks``,
    ``r_precision``, ``map@r`` and, with ``clustering=True``, ``nmi`` and ``f1``. The kNN depth
    is ``max(max(ks), largest class - 1)`` (capped at ``N - 1``), so neither Recall@K nor MAP@R
    is truncated. ``neighbours``: a ``knn`` result of at least that depth, if already computed.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise IdmlError("embeddings must be [N, D] with one label per row")
    n = embeddings.shape[0]
    if n < 2:
        raise IdmlError("need at least two items")
    x = F.normalize(embeddings.detach().float(), dim=1)
    labels = labels.detach().to(x.device).reshape(-1)

    num_relevant = _num_relevant(labels)
    depth = _depth(num_relevant, ks, n - 1)
    if neighbours is None:
        _, indices = knn(x, x, depth, exclude_self=True, chunk_size=chunk_size)
    else:
        indices = _given_neighbours(neighbours, depth, x.device)
    metrics = _ranked_metrics(labels[indices], labels, num_relevant, ks)
    if clustering:
        metrics["nmi"], metrics["f1"] = cluster_nmi_f1(x, labels, seed=seed)
    return metrics


def query_gallery_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    ks: Sequence[int] = INSHOP_KS,
    chunk_size: int = 1024,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Query-vs-gallery evaluation (In-Shop protocol); nothing is excluded.

    L2-normalises both sets. Returns ``recall@K`` for each K in ``ks``, ``r_precision`` and
    ``map@r`` with R = number of gallery items with the query's label (queries with R = 0 count
    as misses for Recall@K and are skipped for RP / MAP@R).
    """
    if query.shape[0] != query_labels.shape[0] or gallery.shape[0] != gallery_labels.shape[0]:
        raise IdmlError("one label per embedding is required")
    q = F.normalize(query.detach().float(), dim=1)
    g = F.normalize(gallery.detach().float(), dim=1).to(q.device)
    query_labels = query_labels.detach().to(q.device).reshape(-1)
    gallery_labels = gallery_labels.detach().to(q.device).reshape(-1)

    num_relevant = _num_relevant(query_labels, gallery_labels)
    depth = _depth(num_relevant, ks, g.shape[0])
    if neighbours is None:
        _, indices = knn(q, g, depth, exclude_self=False, chunk_size=chunk_size)
    else:
        indices = _given_neighbours(neighbours, depth, q.device)
    return _ranked_metrics(gallery_labels[indices], query_labels, num_relevant, ks)
