"""Tests of ``idml.evaluation.metrics`` against independent computations (NumPy brute force,
pytorch-metric-learning's ``AccuracyCalculator``, hand-counted pairs)."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from idml.evaluation.metrics import (
    cluster_nmi_f1,
    evaluation_depth,
    knn,
    pairwise_f1,
    query_gallery_metrics,
    r_precision_and_map_at_r,
    recall_at_k,
    retrieval_metrics,
)


def _normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = _normalised(rng, 300, 16)
    # Unequal class sizes (22..38) so R varies across queries.
    sizes = [22, 38, 30, 25, 35, 28, 32, 27, 33, 30]
    y = np.repeat(np.arange(10), sizes)
    rng.shuffle(y)
    return x, y


def _brute_ranking(q: np.ndarray, g: np.ndarray, exclude_self: bool) -> np.ndarray:
    """Full similarity matrix, diagonal excluded when asked, stable descending argsort."""
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    return order[:, : g.shape[0] - int(exclude_self)]


def _brute_metrics(order: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray, ks, r):
    rel = g_labels[order] == q_labels[:, None]
    out = {f"recall@{k}": float(np.mean(rel[:, :k].any(axis=1))) for k in ks}
    rps, maps = [], []
    for row, big_r in zip(rel, r, strict=True):
        if big_r == 0:
            continue
        top = row[:big_r]
        rps.append(top.sum() / big_r)
        precision_at_i = np.cumsum(top) / np.arange(1, big_r + 1)
        maps.append((precision_at_i * top).sum() / big_r)
    out["r_precision"] = float(np.mean(rps))
    out["map@r"] = float(np.mean(maps))
    return out


def test_matches_accuracy_calculator(data):
    x, y = data
    ours = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), clustering=False)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    # reference omitted -> pml sets ref_includes_query=True: it searches k + 1 neighbours and
    # drops each query's own index, and uses R = class count - 1.
    theirs = calc.get_accuracy(x, y)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_leave_one_out_matches_numpy(data):
    x, y = data
    ks = (1, 2, 4, 8)
    ours = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), ks=ks, clustering=False)
    r = np.array([np.sum(y == label) - 1 for label in y])
    expected = _brute_metrics(_brute_ranking(x, x, exclude_self=True), y, y, ks, r)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(ours[key], float)


def test_retrieval_metrics_keys_and_range(data):
    x, y = data
    m = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y))
    assert set(m) == {
        "recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r", "nmi", "f1"
    }  # fmt: skip
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())


def test_duplicates_find_each_other_and_never_self():
    rng = np.random.default_rng(1)
    x = _normalised(rng, 50, 8)
    x[7] = x[3]  # two identical images
    x[20] = x[21] = x[22]  # and three
    t = torch.from_numpy(x)
    sims, idx = knn(t, t, 5, exclude_self=True, chunk_size=16)
    assert idx.dtype == torch.int64 and sims.dtype == torch.float32
    assert not (idx == torch.arange(50)[:, None]).any()
    assert idx[3, 0] == 7 and idx[7, 0] == 3
    assert set(idx[20, :2].tolist()) == {21, 22}
    assert set(idx[21, :2].tolist()) == {20, 22}
    assert sims[3, 0] == pytest.approx(1.0, abs=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_duplicates_count_as_hits():
    # Each class = two identical embeddings; every query's nearest neighbour is its twin.
    rng = np.random.default_rng(2)
    base = _normalised(rng, 10, 8)
    x = torch.from_numpy(np.repeat(base, 2, axis=0))
    y = torch.arange(10).repeat_interleave(2)
    m = retrieval_metrics(x, y, ks=(1,), clustering=False)
    assert m["recall@1"] == m["r_precision"] == m["map@r"] == 1.0


def test_knn_chunks_match_one_chunk(data):
    x, _ = data
    t = torch.from_numpy(x)
    for exclude_self in (True, False):
        s_one, i_one = knn(t, t, 12, exclude_self=exclude_self, chunk_size=10_000)
        s_chk, i_chk = knn(t, t, 12, exclude_self=exclude_self, chunk_size=7)
        assert torch.equal(i_one, i_chk)
        torch.testing.assert_close(s_one, s_chk)
    # and against the brute-force ranking
    order = _brute_ranking(x, x, exclude_self=True)[:, :12]
    np.testing.assert_array_equal(knn(t, t, 12, exclude_self=True)[1].numpy(), order)


def test_knn_rejects_depth_beyond_reference():
    t = torch.eye(4)
    with pytest.raises(ValueError):
        knn(t, t, 4, exclude_self=True)


def test_recall_and_map_by_hand():
    # query label 0; neighbours: 1, 0, 0, 1 -> R@1 = 0, R@2 = 1; with R = 3:
    # RP = 2/3; MAP@R = (1/3) * (1/2 + 2/3).
    nl = torch.tensor([[1, 0, 0, 1]])
    ql = torch.tensor([0])
    assert recall_at_k(nl, ql, (1, 2)) == {1: 0.0, 2: 1.0}
    rp, map_r = r_precision_and_map_at_r(nl, ql, torch.tensor([3]))
    assert rp == pytest.approx(2 / 3)
    assert map_r == pytest.approx((1 / 2 + 2 / 3) / 3)
    # R = 0 queries are skipped, not counted as zero.
    nl2 = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]])
    rp2, map2 = r_precision_and_map_at_r(nl2, torch.tensor([0, 2]), torch.tensor([3, 0]))
    assert (rp2, map2) == pytest.approx((rp, map_r))
    with pytest.raises(ValueError):
        r_precision_and_map_at_r(nl, ql, torch.tensor([5]))


def test_clustering_perfectly_separated():
    rng = np.random.default_rng(3)
    centres = np.eye(4, 8, dtype=np.float32) * 10
    y = np.repeat(np.arange(4), 25)
    x = centres[y] + 0.01 * rng.standard_normal((100, 8)).astype(np.float32)
    nmi, f1 = cluster_nmi_f1(torch.from_numpy(x), torch.from_numpy(y), seed=0)
    assert nmi == pytest.approx(1.0, abs=1e-9)
    assert f1 == pytest.approx(1.0, abs=1e-9)


def test_pairwise_f1_against_explicit_pair_loop():
    clusters = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 5])
    labels = np.array([7, 7, 3, 3, 3, 7, 9, 9, 9, 9])
    tp = fp = fn = 0
    for i, j in combinations(range(len(labels)), 2):
        same_c, same_l = clusters[i] == clusters[j], labels[i] == labels[j]
        tp += same_c and same_l
        fp += same_c and not same_l
        fn += same_l and not same_c
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    expected = 2 * precision * recall / (precision + recall)
    # By hand: same-cluster pairs 3 + 6 + 1 = 10, same-label pairs 3 + 3 + 6 = 12, both 1+1+1 = 3.
    assert (tp, tp + fp, tp + fn) == (3, 10, 12)
    assert pairwise_f1(clusters, labels) == pytest.approx(expected)
    assert pairwise_f1(clusters, labels) == pytest.approx(2 * 0.3 * 0.25 / 0.55)


def test_query_gallery_matches_numpy():
    rng = np.random.default_rng(4)
    q = _normalised(rng, 60, 12)
    g = _normalised(rng, 140, 12)
    g_labels = rng.integers(0, 8, size=140)
    q_labels = rng.integers(0, 9, size=60)  # label 8 is absent from the gallery: R = 0
    ks = (1, 5, 10)
    ours = query_gallery_metrics(
        torch.from_numpy(q * 3.0),  # not normalised on purpose: the function normalises
        torch.from_numpy(q_labels),
        torch.from_numpy(g),
        torch.from_numpy(g_labels),
        ks=ks,
        chunk_size=16,
    )
    r = np.array([np.sum(g_labels == label) for label in q_labels])
    assert (r == 0).any() and r.max() > max(ks)
    expected = _brute_metrics(_brute_ranking(q, g, exclude_self=False), q_labels, g_labels, ks, r)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_precomputed_neighbours_give_the_same_metrics(data):
    from idml.evaluation.knn import knn
    from idml.evaluation.uncertainty import uncertainty_report

    x, y = (torch.as_tensor(a) for a in data)
    x = torch.nn.functional.normalize(x.float(), dim=1)
    depth = evaluation_depth(y, (1, 2, 4, 8))
    nb = knn(x, x, max(depth, 2), exclude_self=True)
    assert retrieval_metrics(x, y, neighbours=nb) == retrieval_metrics(x, y)
    u = torch.rand(len(x), 4)
    assert uncertainty_report(x, u, y, neighbours=nb) == uncertainty_report(x, u, y)
    with pytest.raises(ValueError, match="columns"):
        retrieval_metrics(x, y, neighbours=knn(x, x, 1, exclude_self=True), ks=(1, 2))
    q, g = x[:30], x[30:]
    qy, gy = y[:30], y[30:]
    nb = knn(q, g, evaluation_depth(qy, (1, 10), gy), exclude_self=False)
    assert query_gallery_metrics(q, qy, g, gy, ks=(1, 10), neighbours=nb) == \
        query_gallery_metrics(q, qy, g, gy, ks=(1, 10))
