"""Losses: Proxy-Anchor with the semantic or the introspective metric, and the mixup scheme."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from idml.metric import RELEASE_A, RELEASE_B, proxy_introspective_similarity

Metric = Literal["semantic", "introspective"]


def _log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per column ``log(1 + sum_{i in mask} exp(logits_i))``, stable, 0 for empty columns."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zero = torch.zeros_like(masked[:1])
    return torch.logsumexp(torch.cat([zero, masked], dim=0), dim=0)


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020) on the semantic or introspective similarity.

    ``metric="semantic"`` is the plain baseline (cosine similarity to proxies);
    ``metric="introspective"`` replaces it by the ISM of :mod:`idml.metric`, everything else
    identical. ``reference=True`` reproduces the authors' release numerics (see
    :func:`idml.metric.proxy_introspective_similarity`).

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
            raise ValueError(f"unknown metric {metric!r}; use 'semantic' or 'introspective'")
        self.num_classes, self.margin, self.scale = num_classes, margin, scale
        self.metric, self.a, self.b, self.reference = metric, a, b, reference
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def similarity(self, semantic: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        """Similarity of every sample to every proxy ([B, C], float32)."""
        if self.metric == "semantic":
            return semantic.float() @ F.normalize(self.proxies.float(), dim=1).T
        return proxy_introspective_similarity(
            semantic, uncertainty, self.proxies, a=self.a, b=self.b, reference=self.reference
        )

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
    """
    return (
        loss_fn(*clean, labels)
        + lam * loss_fn(*mixed, labels)
        + (1.0 - lam) * loss_fn(*mixed, labels[perm])
    )


__all__ = ["Metric", "ProxyAnchorLoss", "mixup_batch", "mixup_loss"]
