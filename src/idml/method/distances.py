"""The introspective similarity metric behind pytorch-metric-learning's distance contract.

PML losses and miners take ``(embeddings, labels)`` and compare embeddings through a
*distance* object (``BaseDistance``: ``compute_mat`` builds the matrix, ``is_inverted`` says
whether larger means closer). :class:`IntrospectiveDistance` honours that contract for
embeddings that carry both heads side by side, ``x = cat([semantic, uncertainty], dim=1)``,
so every PML loss and miner that only reads the matrix can use the ISM unchanged.

The formulas themselves live in :mod:`idml.method.metric`; this module only splits, normalises and
delegates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance

from idml.core.errors import IdmlError
from idml.method.metric import (
    RELEASE_A,
    RELEASE_B,
    BetaVariant,
    Form,
    float32_region,
    pairwise_introspective,
)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` with value 0 and gradient 0 where ``x`` is 0 (or subnormal).

    The plain square root has an infinite slope at 0, and ``D_IN`` is exactly 0 not only on
    duplicates: with the release's constants the ``exp`` underflows for every pair closer
    than about 0.008 in squared distance. The inner ``where`` keeps ``inf * 0`` out of the
    backward pass.
    """
    positive = x > torch.finfo(x.dtype).tiny
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


class IntrospectiveDistance(BaseDistance):
    """ISM between rows of ``cat([semantic, uncertainty], 1)``; a PML ``BaseDistance``.

    Args:
        semantic_dim: width of the semantic half; the remaining columns are the uncertainty.
        form: ``"cosine"`` -- the matrix is the introspective *similarity* ``1 - D_IN``
            (``is_inverted=True``, a drop-in for ``CosineSimilarity``); ``"euclidean"`` -- the
            introspective *distance* (``is_inverted=False``, a drop-in for ``LpDistance``).
        a, b: the ISM constants (the release's 5 and 4 by default).
        beta: uncertainty distance, ``"difference"`` (``||u - v||^2``) or ``"sum"``.
        squared: Euclidean form only. ``True`` (default) returns ``D_IN`` itself, on the
            scale of the *squared* distance (the paper's definition, ``alpha = ||s - t||^2``).
            ``False`` returns ``sqrt(D_IN)``, on the scale of PML's ``LpDistance`` (which is
            not squared), so that a loss's margins keep their meaning; ``sqrt`` is monotone,
            so the ranking is the same. With zero uncertainty and ``b = 0`` it *is*
            ``||s - t||``. ``sqrt(D_IN)`` is 0, with gradient 0, where ``D_IN`` is 0.
        power: PML's ``power``, applied to the matrix after :meth:`compute_mat`;
            ``squared=False, power=2`` mirrors ``LpDistance(power=2)`` (FastAP reads
            ``power`` to size its histogram).
        normalize_embeddings: L2-normalise the semantic half (only) before comparing.

    Only the semantic half is normalised (:meth:`normalize`); the uncertainty half must keep
    its norm or ``beta`` would be constant (``docs/method.md`` section 9, defect 5a).

    A reference (e.g. a proxy) that has only ``semantic_dim`` columns has zero uncertainty;
    one with ``semantic_dim + uncertainty_dim`` columns carries a (learned) uncertainty.
    """

    def __init__(
        self,
        semantic_dim: int,
        *,
        form: Form = "cosine",
        a: float = RELEASE_A,
        b: float = RELEASE_B,
        beta: BetaVariant = "difference",
        squared: bool = True,
        power: float = 1,
        normalize_embeddings: bool = True,
    ) -> None:
        if form not in ("cosine", "euclidean"):
            raise IdmlError(f"unknown form {form!r}; use 'cosine' or 'euclidean'")
        if beta not in ("difference", "sum"):
            raise IdmlError(f"unknown uncertainty distance {beta!r}; use 'difference' or 'sum'")
        super().__init__(
            normalize_embeddings=normalize_embeddings,
            p=2,
            power=power,
            is_inverted=form == "cosine",
        )
        self.semantic_dim, self.form = int(semantic_dim), form
        self.a, self.b, self.beta, self.squared = float(a), float(b), beta, squared

    def split(self, embeddings: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(semantic, uncertainty)`` halves along ``dim`` (the uncertainty may be empty)."""
        width = embeddings.size(dim)
        if width < self.semantic_dim:
            raise IdmlError(
                f"embeddings have {width} columns, fewer than semantic_dim={self.semantic_dim}"
            )
        return (
            embeddings.narrow(dim, 0, self.semantic_dim),
            embeddings.narrow(dim, self.semantic_dim, width - self.semantic_dim),
        )

    def normalize(self, embeddings: torch.Tensor, dim: int = 1, **kwargs) -> torch.Tensor:
        """L2-normalise the semantic half along ``dim``; leave the uncertainty untouched."""
        semantic, uncertainty = self.split(embeddings, dim)
        semantic = F.normalize(semantic, p=self.p, dim=dim, **kwargs)
        if uncertainty.size(dim) == 0:
            return semantic
        return torch.cat([semantic, uncertainty], dim=dim)

    def get_norm(self, embeddings: torch.Tensor, dim: int = 1, **kwargs) -> torch.Tensor:
        """Norm of the semantic half (what normalisation acts on)."""
        return torch.norm(self.split(embeddings, dim)[0], p=self.p, dim=dim, **kwargs)

    def halves(
        self, query_emb: torch.Tensor, ref_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s, u, t, v)``; a side without uncertainty columns gets zero uncertainty."""
        s, u = self.split(query_emb)
        t, v = self.split(ref_emb)
        if v.size(1) == 0 and u.size(1) > 0:
            v = v.new_zeros(v.size(0), u.size(1))
        elif u.size(1) == 0 and v.size(1) > 0:
            u = u.new_zeros(u.size(0), v.size(1))
        if u.size(1) != v.size(1):
            raise IdmlError(f"uncertainty widths differ: query {u.size(1)}, reference {v.size(1)}")
        return s, u, t, v

    def _ism(self, s, u, t, v) -> torch.Tensor:
        mat = pairwise_introspective(s, u, t, v, form=self.form, a=self.a, b=self.b, beta=self.beta)
        if self.form == "euclidean" and not self.squared:
            with float32_region(mat.device):
                return _safe_sqrt(mat)
        return mat

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """[N, M] ISM of every query row with every reference row (float32)."""
        return self._ism(*self.halves(query_emb, ref_emb))

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """[N] ISM of row ``i`` of ``query_emb`` with row ``i`` of ``ref_emb``."""
        if query_emb.size(0) != ref_emb.size(0):
            raise IdmlError("pairwise_distance compares paired rows: give equal row counts")

        def one_pair(s, u, t, v):  # the pairwise formula on a 1 x 1 problem, vectorised
            return self._ism(s[None], u[None], t[None], v[None])[0, 0]

        return torch.vmap(one_pair)(*self.halves(query_emb, ref_emb))


__all__ = ["IntrospectiveDistance"]
