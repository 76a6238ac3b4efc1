"""The evaluator: embed a split with a model and compute every evaluation of it in one pass
(retrieval metrics, the uncertainty summary and risk-coverage report, the mixup ambiguity
check)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from idml.core.config import RunConfig
from idml.core.errors import IdmlError
from idml.core.runtime import autocast
from idml.data.splits import RetrievalSplits, labels_of
from idml.evaluation.knn import knn
from idml.evaluation.metrics import evaluation_depth, query_gallery_metrics, retrieval_metrics
from idml.evaluation.uncertainty import (
    GapCombination,
    mislabel_scores,
    mixup_ambiguity_auroc,
    query_correct,
    semantic_confidence,
    uncertainty_report,
)
from idml.method.metric import uncertainty_score
from idml.method.model import IntrospectiveNet


@torch.no_grad()
def compute_embeddings(
    model: IntrospectiveNet,
    data: Dataset,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantic and uncertainty embeddings (float32, CPU) and labels of a whole set."""
    was_training = model.training
    model.eval()
    sem, unc = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, _ in loader:
        with autocast(device, precision):
            s, u = model(images.to(device))
        sem.append(s.float().cpu())
        unc.append(u.float().cpu())
    model.train(was_training)
    return torch.cat(sem), torch.cat(unc), labels_of(data)


def cutmix(images: torch.Tensor, partner: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image with a box of half its area (position drawn from ``gen``) pasted from its
    partner (CutMix, Yun et al. 2019): an ambiguity that IDML's mixup training never shows."""
    h, w = images.shape[-2:]
    bh, bw = max(1, round(h / 2**0.5)), max(1, round(w / 2**0.5))
    top = int(torch.randint(0, h - bh + 1, (), generator=gen))
    left = int(torch.randint(0, w - bw + 1, (), generator=gen))
    out = images.clone()
    out[..., top:top + bh, left:left + bw] = images[partner][..., top:top + bh, left:left + bw]
    return out


@torch.no_grad()
def ambiguity_probe(
    model: IntrospectiveNet, data: Dataset, cfg: RunConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """``||u||^2`` of every image clean, blended 50/50 with another image of its batch
    (``mixup``) and with half its area pasted from another (``cutmix``), and the norm of its
    pooled feature (``feature_norm``, a reference confidence).

    Deliberately ambiguous inputs: a useful uncertainty scores them above the clean images
    (:func:`idml.evaluation.uncertainty.mixup_ambiguity_auroc`). Partners and boxes come
    from a generator seeded with ``cfg.seed``, so the check is reproducible.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, list[torch.Tensor]] = {"clean": [], "mixup": [], "cutmix": [],
                                          "feature_norm": []}
    loader = DataLoader(data, batch_size=cfg.eval_batch_size, shuffle=False,
                        num_workers=cfg.num_workers)
    for images, _ in loader:
        images = images.to(device)
        partner = torch.randperm(len(images), generator=gen).to(device)
        probes = {"mixup": 0.5 * images + 0.5 * images[partner],
                  "cutmix": cutmix(images, partner, gen)}
        with autocast(device, cfg.precision):
            f = model.forward_features(images)
            out["clean"].append(uncertainty_score(model.heads(f)[1]).cpu())
            out["feature_norm"].append(f.float().norm(dim=1).cpu())
            for name, probe in probes.items():
                out[name].append(uncertainty_score(model(probe)[1]).cpu())
    model.train(was_training)
    return {name: torch.cat(parts) for name, parts in out.items()}


def uncertainty_summary(
    semantic: torch.Tensor,
    uncertainty: torch.Tensor,
    labels: torch.Tensor,
    gallery: tuple[torch.Tensor, torch.Tensor] | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean ``||u||^2`` overall and on queries whose nearest neighbour is right / wrong.

    Leave-one-out within the set, or against ``gallery = (semantic, labels)`` when given;
    ``neighbours``: the queries' ``knn`` result, if already computed.
    """
    score = uncertainty_score(uncertainty)
    if gallery is None:
        correct = query_correct(semantic, labels, neighbours=neighbours)
    else:
        correct = query_correct(semantic, labels, gallery=gallery[0], gallery_labels=gallery[1],
                                neighbours=neighbours)
    correct = correct.to(score.device)
    nan = float("nan")
    return {
        "mean": score.mean().item(),
        "correct_mean": score[correct].mean().item() if correct.any() else nan,
        "wrong_mean": score[~correct].mean().item() if (~correct).any() else nan,
    }


def evaluate_model(
    model: IntrospectiveNet,
    splits: RetrievalSplits,
    cfg: RunConfig,
    device: torch.device,
    part: str = "test",
    ambiguity: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Retrieval metrics on the semantic embedding, and the uncertainty summary.

    ``part`` is ``test`` or ``val`` (leave-one-out); a data set with a query/gallery split
    (In-Shop) is evaluated query against gallery for ``test``. ``ambiguity`` adds the AUROC
    of telling mixup-blended query images from clean ones by ``||u||^2`` (one more pass).
    """
    if part not in ("test", "val"):
        raise IdmlError(f"unknown split {part!r}; use 'test' or 'val'")
    if part == "val" and splits.val is None:
        raise IdmlError("no validation split: set val_fraction > 0")
    queries = splits.val if part == "val" else splits.test
    gallery = None
    if queries is None:
        if splits.query is None or splits.gallery is None:
            raise IdmlError(f"the data set has no {part} split")
        queries, gallery = splits.query, splits.gallery
    s, u, y = _embed_on(model, queries, cfg, device)
    extra: dict[str, Any] = {}
    if ambiguity:
        probe = ambiguity_probe(model, queries, cfg, device)
        extra["feature_norm"] = probe["feature_norm"].numpy()
        combo = _combination(model, splits.val, cfg, device) if part == "test" and \
            splits.val is not None else None
        if combo is not None:
            extra["combined"] = combo
    if gallery is None:
        metrics, summary, report = _leave_one_out(s, u, y, cfg, extra)
    else:
        metrics, summary, report = _against_gallery(s, u, y, _embed_on(model, gallery, cfg,
                                                                       device), cfg, extra)
    if ambiguity:
        for name in ("mixup", "cutmix"):
            summary[f"{name}_auroc"] = mixup_ambiguity_auroc(probe["clean"], probe[name])
    return metrics, {**summary, "design": cfg.design, "risk_coverage": report}


def _combination(model: IntrospectiveNet, val: Dataset, cfg: RunConfig,
                 device: torch.device) -> GapCombination | None:
    """The gap + ``||u||^2`` combination fitted on the validation classes (leave-one-out);
    ``None`` when every validation query is right (or every one wrong): nothing to fit."""
    s, u, y = _embed_on(model, val, cfg, device)
    correct = query_correct(s, y).cpu().numpy()
    if len(np.unique(correct)) < 2:
        return None
    gap = semantic_confidence(s).cpu().numpy()
    return GapCombination(gap, uncertainty_score(u).cpu().numpy(), correct)


def training_suspicion(
    model: IntrospectiveNet, train: Dataset, cfg: RunConfig, device: torch.device
) -> dict[str, np.ndarray]:
    """:func:`~idml.evaluation.uncertainty.mislabel_scores` of every training image, under the
    labels training saw (``train`` should use the test-time transform)."""
    s, u, y = _embed_on(model, train, cfg, device)
    return mislabel_scores(s, u, y)


def _embed_on(model: IntrospectiveNet, data: Dataset, cfg: RunConfig,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, u, y = compute_embeddings(model, data, cfg.eval_batch_size, device, cfg.precision,
                                 cfg.num_workers)
    return s.to(device), u.to(device), y.to(device)  # exact kNN runs on the device


def _extra_rows(extra: dict[str, Any], s: torch.Tensor, u: torch.Tensor,
                nb: tuple[torch.Tensor, torch.Tensor], gallery: torch.Tensor | None = None
                ) -> dict[str, np.ndarray]:
    """Reference confidences as arrays; a fitted combination is applied to these queries."""
    rows = {k: v for k, v in extra.items() if not isinstance(v, GapCombination)}
    for name, combo in extra.items():
        if isinstance(combo, GapCombination):
            gap = semantic_confidence(s, gallery=gallery, neighbours=nb).cpu().numpy()
            rows[name] = combo(gap, uncertainty_score(u).cpu().numpy())
    return rows


def _leave_one_out(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, cfg: RunConfig,
                   extra: dict[str, Any]
                   ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Every query against the rest of its set: one kNN pass serves the metrics, the
    uncertainty summary and the semantic gap."""
    ks = tuple(cfg.eval_ks)
    unit = F.normalize(s.float(), dim=1)
    nb = knn(unit, unit, min(max(2, evaluation_depth(y, ks)), len(y) - 1), exclude_self=True)
    return (retrieval_metrics(s, y, ks=ks, seed=cfg.seed, neighbours=nb),
            uncertainty_summary(s, u, y, neighbours=nb),
            uncertainty_report(s, u, y, neighbours=nb, extra=_extra_rows(extra, s, u, nb)))


def _against_gallery(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor,
                     gallery: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     cfg: RunConfig, extra: dict[str, Any]
                     ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Queries against a separate gallery (In-Shop), one kNN pass for all of it."""
    ks = tuple(cfg.eval_ks)
    gs, _, gy = gallery
    depth = min(max(2, evaluation_depth(y, ks, gy)), len(gy))
    nb = knn(F.normalize(s.float(), dim=1), F.normalize(gs.float(), dim=1), depth,
             exclude_self=False)
    return (query_gallery_metrics(s, y, gs, gy, ks=ks, neighbours=nb),
            uncertainty_summary(s, u, y, gallery=(gs, gy), neighbours=nb),
            uncertainty_report(s, u, y, gallery=gs, gallery_labels=gy, neighbours=nb,
                               extra=_extra_rows(extra, s, u, nb, gs)))


def format_metrics_table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per entry of ``columns``."""
    names = list(next(iter(columns.values())))
    head = f"{'metric':<12}" + "".join(f"{c:>10}" for c in columns)
    rows = [
        f"{n:<12}" + "".join(f"{100 * columns[c][n]:>10.2f}" for c in columns) for n in names
    ]
    return "\n".join([head, *rows])
