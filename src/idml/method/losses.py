"""Losses on the semantic or the introspective metric, and the mixup scheme.

Every loss is an ``nn.Module`` called as ``loss(semantic, uncertainty, labels)``; build one by
name with :func:`build_loss` (the registry is :data:`LOSSES`). Proxy-Anchor is written out
here (:class:`ProxyAnchorLoss`); every other loss is pytorch-metric-learning's, given
:class:`idml.method.distances.IntrospectiveDistance` in place of its usual distance and wrapped by
:class:`PMLLoss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity, LpDistance
from torch import nn

from idml.core.errors import IdmlError
from idml.method.distances import IntrospectiveDistance
from idml.method.metric import (
    RELEASE_A,
    RELEASE_B,
    RELEASE_ISM,
    ISMParams,
    float32_region,
    proxy_introspective_similarity,
)

Metric = Literal["semantic", "introspective"]


def _log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per column ``log(1 + sum_{i in mask} exp(logits_i))``, stable, 0 for empty columns."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zero = torch.zeros_like(masked[:1])
    return torch.logsumexp(torch.cat([zero, masked], dim=0), dim=0)


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020) on the semantic or introspective similarity.

    ``metric="semantic"`` is the plain baseline (cosine similarity to proxies);
    ``metric="introspective"`` replaces it by the ISM of :mod:`idml.method.metric`, everything else
    identical. ``reference=True`` reproduces the authors' release numerics (see
    :func:`idml.method.metric.proxy_introspective_similarity`).

    Call as ``loss(semantic, uncertainty, labels)``; labels are class indices in
    ``[0, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.1,
        scale: float = 32.0,
        metric: Metric = "introspective",
        a: float = RELEASE_A,
        b: float = RELEASE_B,
        reference: bool = False,
    ) -> None:
        super().__init__()
        if metric not in ("semantic", "introspective"):
            raise IdmlError(f"unknown metric {metric!r}; use 'semantic' or 'introspective'")
        self.num_classes, self.margin, self.scale = num_classes, margin, scale
        self.metric, self.a, self.b, self.reference = metric, a, b, reference
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def similarity(self, semantic: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        """Similarity of every sample to every proxy ([B, C], float32)."""
        if self.metric == "semantic":
            with float32_region(semantic.device):  # as the ISM: float32 under autocast
                return semantic.float() @ F.normalize(self.proxies.float(), dim=1).T
        return proxy_introspective_similarity(
            semantic, uncertainty, self.proxies, a=self.a, b=self.b, reference=self.reference
        )

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The parameters that train at the proxy learning rate."""
        return [self.proxies]

    def forward(
        self, semantic: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        sim = self.similarity(semantic, uncertainty)
        pos = F.one_hot(labels, self.num_classes).bool()
        pos_term = _log1p_sum_exp(-self.scale * (sim - self.margin), pos)
        neg_term = _log1p_sum_exp(self.scale * (sim + self.margin), ~pos)
        with_pos = pos.any(dim=0)
        return pos_term[with_pos].sum() / with_pos.sum().clamp_min(1) + neg_term.sum() / (
            self.num_classes
        )


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mixup_batch(
    images: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Blend each image with a random partner: ``lam * x + (1 - lam) * x[perm]``.

    ``lam ~ Beta(1, 1)`` (uniform). The permutation is drawn on the CPU generator and moved
    to the images' device (the release drew it on the wrong device, defect 5e). Returns
    ``(mixed, perm, lam)``.
    """
    lam = float(torch.rand((), generator=generator))
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    return lam * images + (1.0 - lam) * images[perm], perm, lam


def mixup_loss(
    loss_fn: LossFn,
    clean: tuple[torch.Tensor, torch.Tensor],
    mixed: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    perm: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """The paper's objective ``L(x, y) + lam L(x_mix, y) + (1 - lam) L(x_mix, y[perm])``.

    ``clean`` and ``mixed`` are ``(semantic, uncertainty)`` of the clean and mixed images.
    An objective with a ``blend_loss`` (an uncertainty design's, ``idml.method.designs``)
    applies that to the blends instead of itself.
    """
    blend = getattr(loss_fn, "blend_loss", loss_fn)
    return (
        loss_fn(*clean, labels)
        + lam * blend(*mixed, labels)
        + (1.0 - lam) * blend(*mixed, labels[perm])
    )


# --- pytorch-metric-learning losses on either metric ------------------------------------


class PMLLoss(nn.Module):
    """A pytorch-metric-learning loss (and miner) called as ``loss(semantic, uncertainty, labels)``.

    ``metric="semantic"``: the PML modules see the semantic embeddings only.
    ``metric="introspective"``: they see ``cat([semantic, uncertainty], 1)`` and compare it
    through an :class:`~idml.method.distances.IntrospectiveDistance`.

    The miner sees the same embeddings and (by construction in :func:`build_loss`) the same
    distance object as the loss, unless ``mine_semantic=True``: then it sees the semantic
    embeddings alone (for a miner whose rule only holds for the semantic geometry).

    Everything runs in float32 with autocast off: the ISM needs it, and PML proxy losses cast
    their weights *in place* to the embeddings' dtype, which would leave half-precision
    parameters behind under mixed precision.
    """

    def __init__(
        self,
        loss: pml_losses.BaseMetricLossFunction,
        metric: Metric,
        *,
        miner: pml_miners.BaseMiner | None = None,
        mine_semantic: bool = False,
        proxy_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.loss, self.miner, self.metric = loss, miner, metric
        self.mine_semantic = mine_semantic
        self.proxy_names = tuple(proxy_names)

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The loss's class weights (proxies, centres) that train at the proxy learning rate.

        Empty for pair losses. Other loss parameters (e.g. a learned margin ``beta``) are not
        proxies and are not listed.
        """
        return [getattr(self.loss, name) for name in self.proxy_names]

    def forward(
        self, semantic: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        with float32_region(semantic.device):
            semantic = semantic.float()
            if self.metric == "semantic":
                embeddings = semantic
            else:
                embeddings = torch.cat([semantic, uncertainty.float()], dim=1)
            tuples = None
            if self.miner is not None:
                tuples = self.miner(semantic if self.mine_semantic else embeddings, labels)
            return self.loss(embeddings, labels, tuples)


@dataclass(frozen=True)
class LossSetup:
    """What every loss builder needs: the sizes, and the metric that compares embeddings."""

    num_classes: int
    embedding_dim: int
    uncertainty_dim: int
    metric: Metric
    ism: ISMParams = RELEASE_ISM

    def distance(self, semantic: BaseDistance) -> BaseDistance:
        """``semantic`` itself, or under the ISM its introspective counterpart.

        The counterpart lives on the same scale: cosine form for a similarity, ``sqrt(D_IN)``
        for ``LpDistance`` (whose values are not squared) and the same ``power``, so a
        loss's usual margins keep their meaning and, with zero uncertainty and ``b = 0``,
        the introspective loss *is* the baseline.
        """
        if self.metric == "semantic":
            return semantic
        if not isinstance(semantic, (CosineSimilarity, LpDistance)) or semantic.p != 2:
            raise IdmlError(f"no introspective counterpart for {semantic!r}")
        return IntrospectiveDistance(
            self.embedding_dim,
            form="cosine" if semantic.is_inverted else "euclidean",
            a=self.ism.a,
            b=self.ism.b,
            beta=self.ism.beta,
            squared=False,
            power=semantic.power,
        )

    def proxy_width(self, learn_proxy_uncertainty: bool) -> int:
        """Columns of a proxy: semantic only (zero uncertainty), or with a learned half."""
        if learn_proxy_uncertainty and self.metric == "introspective":
            return self.embedding_dim + self.uncertainty_dim
        return self.embedding_dim


def _zero_proxy_uncertainty(weight: torch.Tensor, setup: LossSetup, dim: int) -> None:
    """Start a learned proxy uncertainty at 0 (PML initialises the whole weight at random)."""
    extra = weight.size(dim) - setup.embedding_dim
    if extra > 0:
        with torch.no_grad():
            weight.narrow(dim, setup.embedding_dim, extra).zero_()


def _swap_distance(
    loss: pml_losses.BaseMetricLossFunction, distance: BaseDistance
) -> pml_losses.BaseMetricLossFunction:
    """Give ``loss`` a distance that its constructor's type assertion would refuse.

    Some PML losses assert ``CosineSimilarity``/``LpDistance`` to guarantee a value range;
    the caller states why the introspective counterpart keeps that range.
    """
    loss.distance = distance
    return loss


def _proxy_anchor(
    setup: LossSetup, *, margin: float = 0.1, scale: float = 32.0, reference: bool = False
) -> nn.Module:
    """Proxy-Anchor (Kim et al. 2020): margin 0.1, scale 32, as in the paper and release."""
    return ProxyAnchorLoss(
        setup.num_classes,
        setup.embedding_dim,
        margin=margin,
        scale=scale,
        metric=setup.metric,
        a=setup.ism.a,
        b=setup.ism.b,
        reference=reference,
    )


def _triplet(setup: LossSetup, *, margin: float = 0.1) -> nn.Module:
    """Triplet, semi-hard mining (Schroff et al. 2015): L2 distance, margin 0.1 for loss and
    miner (the Proxy-Anchor code the paper builds on)."""
    distance = setup.distance(LpDistance())
    miner = pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets="semihard", distance=distance
    )
    return PMLLoss(
        pml_losses.TripletMarginLoss(margin=margin, distance=distance), setup.metric, miner=miner
    )


def _proxy_nca(
    setup: LossSetup, *, softmax_scale: float = 32.0, learn_proxy_uncertainty: bool = False
) -> nn.Module:
    """ProxyNCA (Movshovitz-Attias et al. 2017): squared L2 to normalised proxies, softmax
    scale 32 (the Proxy-Anchor code)."""
    loss = pml_losses.ProxyNCALoss(
        setup.num_classes,
        setup.proxy_width(learn_proxy_uncertainty),
        softmax_scale=softmax_scale,
        distance=setup.distance(LpDistance(power=2)),
    )
    _zero_proxy_uncertainty(loss.proxies, setup, dim=1)
    return PMLLoss(loss, setup.metric, proxy_names=["proxies"])


def _fastap(setup: LossSetup, *, num_bins: int = 10) -> nn.Module:
    """FastAP (Cakir et al. 2019): 10 bins over the squared L2 distance in [0, 4].

    PML asserts ``LpDistance`` because it bins on ``[0, 2**power]``; the introspective
    counterpart (``sqrt(D_IN)`` squared by ``power=2``) never exceeds the squared semantic
    distance, so it stays in that range.
    """
    semantic = LpDistance(power=2)
    loss = pml_losses.FastAPLoss(num_bins=num_bins, distance=semantic)
    return PMLLoss(_swap_distance(loss, setup.distance(semantic)), setup.metric)


def _contrastive(
    setup: LossSetup, *, pos_margin: float = 0.0, neg_margin: float = 0.5
) -> nn.Module:
    """Contrastive (Hadsell et al. 2006): L2 distance, margins 0 / 0.5 (Proxy-Anchor code)."""
    loss = pml_losses.ContrastiveLoss(
        pos_margin=pos_margin, neg_margin=neg_margin, distance=setup.distance(LpDistance())
    )
    return PMLLoss(loss, setup.metric)


def _margin(
    setup: LossSetup,
    *,
    margin: float = 0.2,
    beta: float = 1.2,
    nu: float = 0.0,
    learn_beta: bool = False,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> nn.Module:
    """Margin loss with distance-weighted sampling (Wu et al. 2017): L2 distance, margin 0.2,
    beta 1.2 (per class and learned if ``learn_beta``), sampling cut-offs 0.5 / 1.4.

    The miner always samples on the *semantic* L2 distance: its weights ``1/q(d)`` undo the
    density of distances between points spread uniformly on the unit sphere, a law that holds
    for ``||s_i - s_j||`` and not for the ISM. The loss then scores the sampled triplets with
    the metric chosen.
    """
    semantic = LpDistance()
    loss = pml_losses.MarginLoss(
        margin=margin,
        beta=beta,
        nu=nu,
        learn_beta=learn_beta,
        num_classes=setup.num_classes if learn_beta else None,
        distance=setup.distance(semantic),
    )
    miner = pml_miners.DistanceWeightedMiner(
        cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff, distance=semantic
    )
    return PMLLoss(loss, setup.metric, miner=miner, mine_semantic=True)


def _multi_similarity(
    setup: LossSetup,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
) -> nn.Module:
    """Multi-Similarity with its miner (Wang et al. 2019): cosine, alpha 2, beta 50, base 0.5,
    epsilon 0.1."""
    distance = setup.distance(CosineSimilarity())
    loss = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, distance=distance)
    miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon, distance=distance)
    return PMLLoss(loss, setup.metric, miner=miner)


def _n_pairs(setup: LossSetup) -> nn.Module:
    """N-pairs (Sohn 2016): softmax over cosine similarities of one positive pair per class."""
    loss = pml_losses.NPairsLoss(distance=setup.distance(CosineSimilarity()))
    return PMLLoss(loss, setup.metric)


def _lifted_structure(
    setup: LossSetup, *, neg_margin: float = 1.0, pos_margin: float = 0.0
) -> nn.Module:
    """Lifted structure (Song et al. 2016): L2 distance, negative margin 1."""
    loss = pml_losses.LiftedStructureLoss(
        neg_margin=neg_margin, pos_margin=pos_margin, distance=setup.distance(LpDistance())
    )
    return PMLLoss(loss, setup.metric)


def _circle(setup: LossSetup, *, m: float = 0.4, gamma: float = 80.0) -> nn.Module:
    """Circle loss (Sun et al. 2020): cosine, m 0.4, gamma 80 (its fine-grained setting).

    PML asserts ``CosineSimilarity`` because the optima ``1 + m`` and ``-m`` assume a
    similarity in [-1, 1]; the introspective similarity lies in ``[cos, 1]``.
    """
    semantic = CosineSimilarity()
    loss = pml_losses.CircleLoss(m=m, gamma=gamma, distance=semantic)
    return PMLLoss(_swap_distance(loss, setup.distance(semantic)), setup.metric)


def _soft_triple(
    setup: LossSetup,
    *,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    learn_proxy_uncertainty: bool = False,
) -> nn.Module:
    """SoftTriple (Qian et al. 2019): cosine to 10 centres per class, lambda 20, gamma 0.1,
    margin 0.01 (the centre-merging regulariser is left out, as in PML's default)."""
    loss = pml_losses.SoftTripleLoss(
        setup.num_classes,
        setup.proxy_width(learn_proxy_uncertainty),
        centers_per_class=centers_per_class,
        la=la,
        gamma=gamma,
        margin=margin,
        distance=setup.distance(CosineSimilarity()),
    )
    _zero_proxy_uncertainty(loss.fc, setup, dim=0)
    return PMLLoss(loss, setup.metric, proxy_names=["fc"])


def _normsoftmax(
    setup: LossSetup, *, temperature: float = 0.05, learn_proxy_uncertainty: bool = False
) -> nn.Module:
    """Normalised softmax (Zhai & Wu 2019): cosine to class weights, temperature 0.05."""
    loss = pml_losses.NormalizedSoftmaxLoss(
        setup.num_classes,
        setup.proxy_width(learn_proxy_uncertainty),
        temperature=temperature,
        distance=setup.distance(CosineSimilarity()),
    )
    _zero_proxy_uncertainty(loss.W, setup, dim=0)
    return PMLLoss(loss, setup.metric, proxy_names=["W"])


def _arcface(
    setup: LossSetup,
    *,
    margin: float = 28.6,
    scale: float = 64.0,
    learn_proxy_uncertainty: bool = False,
) -> nn.Module:
    """ArcFace (Deng et al. 2019): angular margin 28.6 degrees (0.5 rad), scale 64.

    PML asserts ``CosineSimilarity`` because the loss takes ``arccos`` of it; the
    introspective similarity lies in [-1, 1] too, so under the ISM the margin is added to
    ``arccos(S_IN)``, an angle the uncertainty shrinks.
    """
    semantic = CosineSimilarity()
    loss = pml_losses.ArcFaceLoss(
        setup.num_classes,
        setup.proxy_width(learn_proxy_uncertainty),
        margin=margin,
        scale=scale,
        distance=semantic,
    )
    _zero_proxy_uncertainty(loss.W, setup, dim=0)
    return PMLLoss(_swap_distance(loss, setup.distance(semantic)), setup.metric, proxy_names=["W"])


def _angular(setup: LossSetup, *, alpha: float = 40.0) -> nn.Module:
    """Angular loss (Wang et al. 2017): angle bound 40 degrees. Semantic metric only."""
    return PMLLoss(pml_losses.AngularLoss(alpha=alpha, distance=LpDistance()), setup.metric)


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: its builder and, if it cannot take the ISM, the reason why."""

    build: Callable[..., nn.Module]
    semantic_only: str | None = None


LOSSES: dict[str, LossEntry] = {
    # the paper's losses (``docs/method.md`` section 7)
    "proxy_anchor": LossEntry(_proxy_anchor),
    "triplet": LossEntry(_triplet),
    "proxy_nca": LossEntry(_proxy_nca),
    "fastap": LossEntry(_fastap),
    "contrastive": LossEntry(_contrastive),
    "margin": LossEntry(_margin),
    "multi_similarity": LossEntry(_multi_similarity),
    # further losses of the field
    "n_pairs": LossEntry(_n_pairs),
    "lifted_structure": LossEntry(_lifted_structure),
    "circle": LossEntry(_circle),
    "soft_triple": LossEntry(_soft_triple),
    "normsoftmax": LossEntry(_normsoftmax),
    "arcface": LossEntry(_arcface),
    "angular": LossEntry(
        _angular,
        semantic_only=(
            "the angular loss never reads a distance matrix: it compares each negative with "
            "the centre (s_a + s_p) / 2 of an anchor-positive pair through dot products of "
            "the vectors themselves, and the ISM defines no such centre or its uncertainty"
        ),
    ),
}


def build_loss(
    name: str,
    *,
    num_classes: int,
    embedding_dim: int,
    uncertainty_dim: int,
    metric: Metric = "introspective",
    ism: ISMParams = RELEASE_ISM,
    **overrides,
) -> nn.Module:
    """The loss ``name`` of :data:`LOSSES` on ``metric``, called as ``loss(s, u, labels)``.

    ``ism``: the ISM's constants (used under ``metric="introspective"``). ``overrides`` are
    that loss's hyperparameters (the keyword arguments of its builder, whose
    docstring gives the defaults and their source); proxy losses of PML also take
    ``learn_proxy_uncertainty`` (proxies with a learned uncertainty half, starting at 0;
    ignored under the semantic metric). Every returned module has ``proxy_parameters()``.
    """
    if name not in LOSSES:
        raise IdmlError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    if metric not in ("semantic", "introspective"):
        raise IdmlError(f"unknown metric {metric!r}; use 'semantic' or 'introspective'")
    entry = LOSSES[name]
    if metric == "introspective" and entry.semantic_only is not None:
        raise IdmlError(f"{name} cannot use the introspective metric: {entry.semantic_only}")
    setup = LossSetup(num_classes, embedding_dim, uncertainty_dim, metric, ism)
    return entry.build(setup, **overrides)


__all__ = [
    "LOSSES",
    "LossEntry",
    "LossSetup",
    "Metric",
    "PMLLoss",
    "ProxyAnchorLoss",
    "build_loss",
    "mixup_batch",
    "mixup_loss",
]
