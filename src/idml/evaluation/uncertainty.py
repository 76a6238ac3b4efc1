"""How well the uncertainty embedding ranks retrieval queries by trust, as pure functions.

``docs/method.md`` section 8: drop the most uncertain queries and Recall@1 of the rest
should rise. The per-image uncertainty is ``||u||^2`` (:func:`uncertainty_score`); a query
*fails* when its nearest neighbour (leave-one-out, or against a gallery) has another label
(:func:`query_correct`). From a confidence and the failures, :func:`risk_coverage` gives the
risk-coverage curve, AURC and E-AURC (Geifman et al., "Bias-Reduced Uncertainty Estimation for
Deep Neural Classifiers", ICLR 2019; Ding et al., "Revisiting the Evaluation of Uncertainty
Estimation and Its Application to Explore Model Complexity-Uncertainty Trade-Off", CVPRW
2020) and Recall@1 of the most confident fraction. :func:`uncertainty_report` compares the
uncertainty with two references: the semantic embedding's own nearest-neighbour margin
(:func:`semantic_confidence`, the one to beat) and a random order. All values are plain floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from idml.core.errors import IdmlError
from idml.evaluation.knn import knn
from idml.method.metric import uncertainty_score

#: Coverages at which Recall@1 of the most confident queries is reported.
DEFAULT_COVERAGES = (0.5, 0.8, 0.9, 1.0)


def _check_gallery(
    semantic: torch.Tensor, gallery: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(query, reference)``; the reference is the query set itself if no gallery."""
    if semantic.ndim != 2:
        raise IdmlError(f"expected [N, D] semantic embeddings, got {tuple(semantic.shape)}")
    q = F.normalize(semantic.detach().float(), dim=1)
    if gallery is None:
        return q, q
    if gallery.ndim != 2 or gallery.shape[1] != semantic.shape[1]:
        raise IdmlError(f"gallery must be [M, {semantic.shape[1]}], got {tuple(gallery.shape)}")
    return q, F.normalize(gallery.detach().float(), dim=1).to(q.device)


def query_correct(
    semantic: torch.Tensor,
    labels: torch.Tensor,
    *,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Bool ``[N]``: whether each query's nearest neighbour (cosine) has the query's label.

    Without a gallery, leave-one-out on ``semantic`` (the query is excluded by index, so an
    exact duplicate of it is still a valid neighbour); with one, against ``gallery`` /
    ``gallery_labels`` (both or neither). The mean is Recall@1.
    """
    if (gallery is None) != (gallery_labels is None):
        raise IdmlError("pass gallery and gallery_labels together")
    if labels.shape[0] != semantic.shape[0]:
        raise IdmlError("one label per query is required")
    q, ref = _check_gallery(semantic, gallery)
    labels = labels.detach().reshape(-1).to(q.device)
    if gallery_labels is None:
        ref_labels = labels
    else:
        ref_labels = gallery_labels.detach().reshape(-1).to(q.device)
        if ref_labels.shape[0] != ref.shape[0]:
            raise IdmlError("one label per gallery item is required")
    _, idx = neighbours if neighbours is not None else knn(q, ref, 1,
                                                           exclude_self=gallery is None)
    return ref_labels[idx[:, 0].to(q.device)] == labels


def semantic_confidence(
    semantic: torch.Tensor,
    *,
    gallery: torch.Tensor | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Float32 ``[N]`` confidence from the semantic embedding alone: ``cos_1 - cos_2``.

    ``cos_1``, ``cos_2`` are the cosine similarities of the first and second nearest
    neighbour (leave-one-out, or in ``gallery``). A query far closer to one item than to
    the next is unambiguous; the reference an uncertainty embedding must beat.
    """
    if neighbours is None:
        q, ref = _check_gallery(semantic, gallery)
        neighbours = knn(q, ref, 2, exclude_self=gallery is None)
    sims = neighbours[0]
    return sims[:, 0] - sims[:, 1]


def _as_numpy(x: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).astype(dtype)


def _expected_cumulative_errors(confidence: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """``E[#errors among the k most confident]`` for k = 1..N, ties broken uniformly at random.

    Inside a group of equal confidences every order is equally likely, so taking ``m`` of the
    group's ``n_g`` items adds ``m * e_g / n_g`` expected errors (``e_g`` = errors in the
    group): the cumulative error count is interpolated linearly across each tie group. This
    is exact (no sampling) and does not depend on the input order.
    """
    order = np.argsort(-confidence, kind="stable")
    c, e = confidence[order], errors[order]
    n = len(c)
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_errors = np.add.reduceat(e, starts)
    errors_before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    group = np.repeat(np.arange(len(starts)), sizes)
    taken = np.arange(1, n + 1) - starts[group]
    return errors_before[group] + taken * (group_errors[group] / sizes[group])


def _coverage_key(coverage: float) -> str:
    return f"recall@1@{100 * coverage:g}%"


def risk_coverage(
    confidence: torch.Tensor | np.ndarray,
    correct: torch.Tensor | np.ndarray,
    *,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
) -> dict[str, np.ndarray | float]:
    """Risk-coverage curve of ``N`` queries ranked by decreasing ``confidence``.

    For ``k = 1..N``: ``coverage[k-1] = k / N`` and ``risk[k-1] = 1 - mean(correct)`` of the
    ``k`` most confident queries. Ties in ``confidence`` are averaged over all orders of the
    tied queries (:func:`_expected_cumulative_errors`), so all-equal confidence gives
    ``risk = 1 - accuracy`` at every ``k``.

    Returns ``coverage`` and ``risk`` (float64 arrays), ``aurc`` = mean of ``risk`` over
    ``k = 1..N`` (Geifman et al. 2019), ``e_aurc`` = ``aurc`` minus the AURC of a perfect
    ranking (every correct query before every failure) with the same accuracy, and for each
    ``c`` in ``coverages`` ``"recall@1@{100c}%"`` = ``1 - risk`` at ``k = ceil(c * N)``.
    """
    conf = _as_numpy(confidence, np.float64)
    ok = _as_numpy(correct, bool)
    n = len(conf)
    if n == 0 or len(ok) != n:
        raise IdmlError(f"need one correctness flag per confidence, got {n} and {len(ok)}")
    if np.isnan(conf).any():
        raise IdmlError("confidence contains NaN")
    errors = (~ok).astype(np.float64)
    k = np.arange(1, n + 1, dtype=np.float64)
    risk = _expected_cumulative_errors(conf, errors) / k
    # Same code path as ``risk`` so that a perfect ranking gives e_aurc == 0 exactly.
    optimal = _expected_cumulative_errors(ok.astype(np.float64), errors) / k
    aurc = float(risk.mean())
    out: dict[str, np.ndarray | float] = {
        "coverage": k / n,
        "risk": risk,
        "aurc": aurc,
        "e_aurc": aurc - float(optimal.mean()),
    }
    for c in coverages:
        if not 0.0 < c <= 1.0:
            raise IdmlError(f"coverage must be in (0, 1], got {c}")
        # The small tolerance keeps e.g. 0.7 * 10 = 7.000000000000001 at k = 7.
        top = min(max(math.ceil(c * n - 1e-9), 1), n)
        out[_coverage_key(c)] = float(1.0 - risk[top - 1])
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; ``nan`` (no warning) when either side is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def _row(
    confidence: np.ndarray, correct: np.ndarray, coverages: Sequence[float]
) -> dict[str, float]:
    """Scalar metrics of one confidence; ``spearman`` is of ``-confidence`` vs failure."""
    curve = risk_coverage(confidence, correct, coverages=coverages)
    row = {key: float(v) for key, v in curve.items() if key not in ("coverage", "risk")}
    row["spearman"] = _spearman(-confidence, (~correct).astype(np.float64))
    return row


def random_reference(correct: np.ndarray, coverages: Sequence[float]) -> dict[str, float]:
    """The ``random`` row: the exact expectation over uniformly random query orders.

    A constant confidence puts every query in one tie group, and :func:`risk_coverage`
    averages a tie group over all its orders, so AURC, E-AURC and Recall@1 at each coverage
    are their expectations under a random order, without sampling. Spearman's rho of a random
    order with failure has expectation 0 (every order and its reverse are equally likely).
    This is the one definition of the random reference: ``metrics.json``, the report's plot
    and its table all use it.
    """
    curve = risk_coverage(np.zeros(len(correct)), correct, coverages=coverages)
    row = {key: float(v) for key, v in curve.items() if key not in ("coverage", "risk")}
    row["spearman"] = 0.0
    return row


def uncertainty_report(
    semantic: torch.Tensor,
    uncertainty: torch.Tensor,
    labels: torch.Tensor,
    *,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Compare confidences for ranking retrieval queries, one row each.

    Rows: ``uncertainty`` (confidence ``-||u||^2``), ``semantic_gap``
    (:func:`semantic_confidence`) and ``random`` (:func:`random_reference`, the exact
    expectation over random orders). Each row has ``aurc``, ``e_aurc``, ``recall@1@{c}%`` for
    ``c`` in ``coverages`` and ``spearman``: Spearman's rho between the row's risk score
    (``-confidence``; for ``uncertainty`` that is ``||u||^2``) and per-query failure
    (1 = nearest neighbour has another label). Positive = the score flags failures; ``nan``
    when all queries succeed or all fail. Queries are leave-one-out on ``semantic`` or
    against ``gallery`` / ``gallery_labels``; ``uncertainty`` belongs to the queries.
    ``neighbours``: the queries' ``knn`` result (at least 2 columns), if already computed.
    ``extra``: further confidences (one per query, larger = more confident), one row each
    after ``semantic_gap`` (e.g. ``feature_norm``, ``combined``).
    """
    if uncertainty.shape[0] != semantic.shape[0]:
        raise IdmlError("one uncertainty embedding per query is required")
    correct = _as_numpy(
        query_correct(semantic, labels, gallery=gallery, gallery_labels=gallery_labels,
                      neighbours=neighbours), bool
    )
    scores = _as_numpy(uncertainty_score(uncertainty), np.float64)
    gap = _as_numpy(semantic_confidence(semantic, gallery=gallery, neighbours=neighbours),
                    np.float64)
    rows = {"uncertainty": _row(-scores, correct, coverages),
            "semantic_gap": _row(gap, correct, coverages)}
    for name, confidence in (extra or {}).items():
        rows[name] = _row(_as_numpy(confidence, np.float64), correct, coverages)
    rows["random"] = random_reference(correct, coverages)
    return rows


class GapCombination:
    """A confidence that combines the semantic gap with ``-||u||^2``, fitted on other data.

    Logistic regression of "the nearest neighbour is right" on the two standardised scores
    (scikit-learn), fitted on validation classes (never the test classes). Whether it ranks
    test queries better than the gap alone says whether ``u`` adds information to the gap.
    """

    def __init__(self, gap: np.ndarray, score: np.ndarray, correct: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        x = np.c_[gap, -score]
        self.mean, self.std = x.mean(0), x.std(0) + 1e-12
        if len(np.unique(correct)) < 2:
            raise IdmlError("the fitting queries must contain both hits and misses")
        self.model = LogisticRegression().fit((x - self.mean) / self.std, correct)

    @property
    def weights(self) -> tuple[float, float]:
        """Standardised weights of (gap, -||u||^2)."""
        w = self.model.coef_[0]
        return float(w[0]), float(w[1])

    def __call__(self, gap: np.ndarray, score: np.ndarray) -> np.ndarray:
        """The combined confidence (log-odds of a hit) of queries."""
        x = (np.c_[gap, -score] - self.mean) / self.std
        return self.model.decision_function(x)


def mislabel_scores(
    semantic: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor, k: int = 10
) -> dict[str, np.ndarray]:
    """Scores of how likely each training image's label is wrong (larger = more suspect).

    ``uncertainty``: ``||u||^2``. Two trivial references: ``knn_disagreement``, the fraction
    of the image's ``k`` nearest other training images (cosine) whose label differs, and
    ``centroid_distance``, ``1 - cos`` to the mean embedding of its own label's images (the
    per-image loss of a nearest-class-mean classifier).
    """
    s = F.normalize(semantic.float(), dim=1)
    y = torch.as_tensor(labels, device=s.device)
    k = min(k, len(y) - 1)
    if k < 1:
        raise IdmlError("need at least two training images")
    _, idx = knn(s, s, k, exclude_self=True)
    disagree = (y[idx] != y[:, None]).float().mean(1)
    classes, inverse = torch.unique(y, return_inverse=True)
    centres = torch.zeros(len(classes), s.shape[1], device=s.device).index_add_(0, inverse, s)
    centroid = 1.0 - (s * F.normalize(centres, dim=1)[inverse]).sum(1)
    return {"uncertainty": _as_numpy(uncertainty_score(uncertainty), np.float64),
            "knn_disagreement": _as_numpy(disagree, np.float64),
            "centroid_distance": _as_numpy(centroid, np.float64)}


def mislabel_auroc(scores: dict[str, np.ndarray], flipped: np.ndarray) -> dict[str, float]:
    """AUROC of each score for finding the images whose label is wrong (0.5 = chance)."""
    flipped = _as_numpy(flipped, bool)
    if flipped.all() or not flipped.any():
        raise IdmlError("need both mislabelled and correctly labelled images")
    return {name: float(roc_auc_score(flipped, score)) for name, score in scores.items()}


def mixup_ambiguity_auroc(
    clean_scores: torch.Tensor | np.ndarray, mixed_scores: torch.Tensor | np.ndarray
) -> float:
    """AUROC of telling mixup-blended images (positives) from clean ones by uncertainty score.

    1 = every blend scores above every clean image, 0.5 = no better than chance; ties count
    half (sklearn's ``roc_auc_score``).
    """
    clean = _as_numpy(clean_scores, np.float64)
    mixed = _as_numpy(mixed_scores, np.float64)
    if len(clean) == 0 or len(mixed) == 0:
        raise IdmlError("need at least one clean and one mixed score")
    y = np.r_[np.zeros(len(clean)), np.ones(len(mixed))]
    return float(roc_auc_score(y, np.r_[clean, mixed]))


def format_uncertainty_table(report: dict[str, dict[str, float]]) -> str:
    """Plain-text table of :func:`uncertainty_report`: one line per row, one column per metric."""
    if not report:
        return ""
    columns = list(next(iter(report.values())))
    name_width = max(len("confidence"), *(len(name) for name in report))
    widths = [max(len(c), 7) for c in columns]

    def line(name: str, cells: list[str]) -> str:
        padded = [cell.rjust(w) for cell, w in zip(cells, widths, strict=True)]
        return "  ".join([name.ljust(name_width), *padded])

    header = line("confidence", columns)
    lines = [header, "-" * len(header)]
    for name, row in report.items():
        lines.append(line(name, [f"{row.get(c, float('nan')):.4f}" for c in columns]))
    return "\n".join(lines)
