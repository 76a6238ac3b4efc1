"""Tests of ``idml.evaluation.uncertainty`` against independent computations (hand-worked curves,
closed forms, brute force over tie orders, NumPy nearest neighbours, pair counting)."""

from __future__ import annotations

import math
import warnings
from itertools import permutations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_evaluate import _normalised

from idml.evaluation.uncertainty import (
    format_uncertainty_table,
    mixup_ambiguity_auroc,
    query_correct,
    risk_coverage,
    semantic_confidence,
    uncertainty_report,
    uncertainty_score,
)


def _brute_similarity(q: np.ndarray, g: np.ndarray, exclude_self: bool) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    return sim


# --- uncertainty_score ------------------------------------------------------------------------


def test_uncertainty_score_is_squared_norm_without_normalisation():
    u = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, -2.0]], dtype=np.float32)
    got = uncertainty_score(torch.from_numpy(u))
    np.testing.assert_allclose(got.numpy(), [25.0, 0.0, 5.0])
    with pytest.raises(ValueError):
        uncertainty_score(torch.zeros(3))


# --- risk_coverage ----------------------------------------------------------------------------


def test_risk_coverage_hand_worked_five_queries():
    # Decreasing confidence: 0.9 ok, 0.7 fail, 0.5 ok, 0.3 ok, 0.1 fail
    # -> cumulative errors 0, 1, 1, 1, 2 -> risk 0, 1/2, 1/3, 1/4, 2/5.
    conf = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3])
    correct = torch.tensor([True, False, True, False, True])
    out = risk_coverage(conf, correct)
    np.testing.assert_allclose(out["coverage"], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(out["risk"], [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5])
    aurc = (0 + 1 / 2 + 1 / 3 + 1 / 4 + 2 / 5) / 5
    optimal = (0 + 0 + 0 + 1 / 4 + 2 / 5) / 5  # 3 correct first, then 2 failures
    assert out["aurc"] == pytest.approx(aurc, abs=1e-12)
    assert out["e_aurc"] == pytest.approx(aurc - optimal, abs=1e-12)
    # k = ceil(c * 5): 3, 4, 5, 5.
    assert out["recall@1@50%"] == pytest.approx(2 / 3)
    assert out["recall@1@80%"] == pytest.approx(3 / 4)
    assert out["recall@1@90%"] == pytest.approx(3 / 5)
    assert out["recall@1@100%"] == pytest.approx(3 / 5)


def test_coverage_index_is_not_pushed_up_by_rounding():
    # 0.7 * 10 = 7.000000000000001 in floating point; k must be 7, not 8.
    correct = np.array([True] * 7 + [False] * 3)
    out = risk_coverage(-np.arange(10.0), correct, coverages=(0.7,))
    assert out["recall@1@70%"] == 1.0


def test_perfect_ranking_reaches_the_optimum():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.6
    conf = correct + rng.random(200) * 0.5  # every correct query above every failure
    out = risk_coverage(conf, correct)
    n, n_ok = len(correct), int(correct.sum())
    k = np.arange(1, n + 1)
    optimal = np.mean(np.where(k <= n_ok, 0.0, (k - n_ok) / k))
    assert out["aurc"] == pytest.approx(optimal, abs=1e-12)
    assert out["e_aurc"] == 0.0
    assert out["recall@1@50%"] == 1.0


def test_worst_ranking():
    rng = np.random.default_rng(1)
    correct = rng.random(150) < 0.7
    conf = (~correct) + rng.random(150) * 0.5  # every failure above every correct query
    out = risk_coverage(conf, correct)
    n, n_err = len(correct), int((~correct).sum())
    k = np.arange(1, n + 1)
    worst = np.mean(np.where(k <= n_err, 1.0, n_err / k))
    assert out["aurc"] == pytest.approx(worst, abs=1e-12)
    assert out["e_aurc"] > 0


def test_random_order_aurc_is_close_to_error_rate():
    rng = np.random.default_rng(2)
    correct = rng.random(20_000) < 0.7
    out = risk_coverage(rng.random(20_000), correct)
    assert out["aurc"] == pytest.approx(1 - correct.mean(), abs=0.01)
    assert out["recall@1@100%"] == pytest.approx(correct.mean(), abs=1e-12)


def test_all_equal_confidence_gives_error_rate_exactly():
    correct = np.array([True, False, True, True, False, True, True, True])  # error rate 1/4
    out = risk_coverage(np.full(8, 0.3), correct)
    assert np.all(out["risk"] == 0.25)
    assert out["aurc"] == 0.25
    for key in ("recall@1@50%", "recall@1@80%", "recall@1@90%", "recall@1@100%"):
        assert out[key] == 0.75
    rng = np.random.default_rng(3)
    correct = rng.random(997) < 0.63
    out = risk_coverage(torch.ones(997), torch.from_numpy(correct))
    assert out["aurc"] == pytest.approx(1 - correct.mean(), abs=1e-12)


def test_ties_are_averaged_over_all_orders_of_the_tied_queries():
    # Brute force: average the risk curve over every permutation that is sorted by
    # decreasing confidence (i.e. every way of breaking the ties).
    conf = np.array([0.5, 0.9, 0.5, 0.1, 0.5, 0.9])
    correct = np.array([True, False, False, True, True, True])
    curves = []
    for perm in permutations(range(len(conf))):
        p = np.array(perm)
        if np.all(np.diff(conf[p]) <= 0):
            errors = (~correct[p]).cumsum()
            curves.append(errors / np.arange(1, len(conf) + 1))
    expected = np.mean(curves, axis=0)
    out = risk_coverage(conf, correct)
    np.testing.assert_allclose(out["risk"], expected, atol=1e-12)
    # ... and the result does not depend on the input order.
    rng = np.random.default_rng(4)
    for _ in range(5):
        p = rng.permutation(len(conf))
        np.testing.assert_allclose(risk_coverage(conf[p], correct[p])["risk"], out["risk"])


def test_risk_coverage_rejects_bad_input():
    with pytest.raises(ValueError):
        risk_coverage(np.zeros(3), np.ones(2, dtype=bool))
    with pytest.raises(ValueError):
        risk_coverage(np.array([0.1, np.nan]), np.ones(2, dtype=bool))
    with pytest.raises(ValueError):
        risk_coverage(np.zeros(3), np.ones(3, dtype=bool), coverages=(0.0,))


# --- query_correct / semantic_confidence -----------------------------------------------------


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = _normalised(rng, 60, 8) * rng.uniform(0.5, 2.0, (60, 1)).astype(np.float32)
    y = rng.integers(0, 4, 60)
    x[17] = x[5]  # duplicate pair, same label
    y[17] = y[5]
    x[30] = x[20]  # duplicate pair, different labels
    y[20], y[30] = 1, 2
    return x, y


def test_query_correct_leave_one_out_matches_brute_force(data):
    x, y = data
    got = query_correct(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    sim = _brute_similarity(x, x, exclude_self=True)
    top2 = np.sort(sim, axis=1)[:, -2:]
    unique = top2[:, 1] - top2[:, 0] > 1e-6  # skip exact ties (the duplicates as neighbours)
    expected = y[sim.argmax(axis=1)] == y
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got[unique], expected[unique])
    # The query itself is removed by index: its duplicate is its neighbour.
    assert got[5] and got[17]
    assert not got[20] and not got[30]


def test_query_correct_against_gallery_matches_brute_force(data):
    x, y = data
    rng = np.random.default_rng(6)
    q = _normalised(rng, 25, 8)
    qy = rng.integers(0, 4, 25)
    got = query_correct(
        torch.from_numpy(q),
        torch.from_numpy(qy),
        gallery=torch.from_numpy(x),
        gallery_labels=torch.from_numpy(y),
    ).numpy()
    sim = _brute_similarity(q, x, exclude_self=False)
    np.testing.assert_array_equal(got, y[sim.argmax(axis=1)] == qy)
    with pytest.raises(ValueError):
        query_correct(torch.from_numpy(q), torch.from_numpy(qy), gallery=torch.from_numpy(x))


def test_semantic_confidence_matches_numpy(data):
    x, _ = data
    got = semantic_confidence(torch.from_numpy(x)).numpy()
    top2 = np.sort(_brute_similarity(x, x, exclude_self=True), axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(got, top2[:, 0] - top2[:, 1], atol=1e-5)
    assert got[5] > 0.0  # the duplicate is the first neighbour, at similarity 1

    rng = np.random.default_rng(7)
    q = _normalised(rng, 10, 8)
    got = semantic_confidence(torch.from_numpy(q), gallery=torch.from_numpy(x)).numpy()
    top2 = np.sort(_brute_similarity(q, x, exclude_self=False), axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(got, top2[:, 0] - top2[:, 1], atol=1e-5)


# --- uncertainty_report ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight classes with 12 labels flipped, so that some queries fail."""
    rng = np.random.default_rng(8)
    centres = _normalised(rng, 3, 6) * 4
    y = np.repeat(np.arange(3), 30)
    x = centres[y] + rng.standard_normal((90, 6)).astype(np.float32)
    flipped = rng.choice(90, 12, replace=False)
    y[flipped] = (y[flipped] + 1) % 3
    return torch.from_numpy(x), torch.from_numpy(y)


def test_report_uncertainty_that_flags_failures(clusters):
    x, y = clusters
    correct = query_correct(x, y).numpy()
    assert 0 < correct.sum() < len(correct)
    rng = np.random.default_rng(9)
    # High uncertainty exactly on the failed queries.
    u = (~correct)[:, None] * 2.0 + 0.01 * rng.standard_normal((90, 4))
    report = uncertainty_report(x, torch.from_numpy(u).float(), y)
    assert set(report) == {"uncertainty", "semantic_gap", "random"}
    unc = report["uncertainty"]
    assert unc["spearman"] > 0.5
    score = (u.astype(np.float32) ** 2).sum(axis=1)
    assert unc["spearman"] == pytest.approx(spearmanr(score, ~correct)[0], abs=1e-9)
    assert unc["e_aurc"] == pytest.approx(0.0, abs=1e-12)
    assert unc["aurc"] < report["random"]["aurc"]
    for row in report.values():
        assert row["recall@1@100%"] == pytest.approx(correct.mean())


def test_random_row_is_the_exact_expectation_over_random_orders(clusters):
    """Under a uniformly random order every prefix holds the overall error rate in
    expectation, so the random row has risk = 1 - accuracy at every coverage; checked
    against the mean over many sampled orders, and Spearman's rho against 0."""
    x, y = clusters
    correct = query_correct(x, y).numpy()
    row = uncertainty_report(x, torch.randn(90, 4), y)["random"]
    assert row["aurc"] == pytest.approx(1 - correct.mean(), abs=1e-12)
    for c in (50, 80, 90, 100):
        assert row[f"recall@1@{c}%"] == pytest.approx(correct.mean(), abs=1e-12)
    rng = np.random.default_rng(0)
    errors = (~correct).astype(float)
    sampled = [np.mean(np.cumsum(errors[rng.permutation(90)]) / np.arange(1, 91))
               for _ in range(4000)]
    assert row["aurc"] == pytest.approx(np.mean(sampled), abs=3e-3)
    assert row["spearman"] == 0.0


def test_report_spearman_is_nan_without_warning_when_constant(clusters):
    x, y = clusters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = uncertainty_report(x, torch.ones(90, 4), y)
    assert math.isnan(report["uncertainty"]["spearman"])
    assert report["uncertainty"]["aurc"] == pytest.approx(
        1 - report["uncertainty"]["recall@1@100%"], abs=1e-12
    )


def test_report_against_gallery(clusters):
    x, y = clusters
    report = uncertainty_report(
        x[:20], torch.randn(20, 4), y[:20], gallery=x[20:], gallery_labels=y[20:]
    )
    expected = query_correct(x[:20], y[:20], gallery=x[20:], gallery_labels=y[20:])
    assert report["semantic_gap"]["recall@1@100%"] == pytest.approx(expected.double().mean())


def test_format_uncertainty_table(clusters):
    x, y = clusters
    report = uncertainty_report(x, torch.randn(90, 4), y)
    table = format_uncertainty_table(report)
    lines = table.splitlines()
    assert len(lines) == 2 + len(report)
    assert "aurc" in lines[0] and "recall@1@50%" in lines[0] and "spearman" in lines[0]
    for name, line in zip(report, lines[2:], strict=True):
        assert line.startswith(name)
        assert f"{report[name]['aurc']:.4f}" in line


# --- mixup_ambiguity_auroc -------------------------------------------------------------------


def test_mixup_auroc_separable_and_against_pair_counting():
    assert mixup_ambiguity_auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])) == 1.0
    assert mixup_ambiguity_auroc(np.array([0.5, 0.9]), np.array([0.1, 0.2, 0.3])) == 0.0
    rng = np.random.default_rng(10)
    clean = rng.integers(0, 5, 40).astype(float)  # many ties
    mixed = rng.integers(1, 7, 30).astype(float)
    diff = mixed[:, None] - clean[None, :]
    expected = np.mean((diff > 0) + 0.5 * (diff == 0))
    assert mixup_ambiguity_auroc(clean, mixed) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        mixup_ambiguity_auroc(np.array([]), np.array([1.0]))
