"""The introspective similarity metric (ISM) as pure functions.

Notation follows ``docs/method.md`` (section 3). For a pair (i, j):

* ``alpha`` -- semantic distance: ``1 - cos(s_i, s_j)`` (cosine form) or
  ``||s_i - s_j||^2`` (Euclidean form);
* ``beta`` -- uncertainty distance: ``||u_i - u_j||^2`` (``"difference"``, the release's
  form) or ``||u_i||^2 + ||u_j||^2`` (``"sum"``); against a proxy, whose uncertainty is
  zero, both are ``||u_i||^2``;
* ``d`` -- squared Euclidean distance of the semantic embeddings (``2 * alpha`` for
  unit vectors in the cosine form, ``alpha`` in the Euclidean form).

The introspective distance is ``D_IN = alpha * exp(-(beta + b) / (a * d))``. With
``a = 1, b = 0`` in the Euclidean form this is the paper's ``alpha * exp(-beta / alpha)``;
with the release's constants ``a = 5, b = 4`` in the cosine form it is the release's
``S_IN = 1 - (1 - S) * exp(-(beta + b) / (a * d))``.

The introspective functions (``introspective_distance``, ``pairwise_introspective``,
``proxy_introspective_similarity``) compute in float32 with autocast disabled (``exp`` of a
ratio of small numbers is not safe in half precision) and are finite, with finite gradients,
where the semantic distance is exactly zero (an image compared with itself or a duplicate):
there ``D_IN = 0``. The paper's ``alpha * exp(-beta / alpha)`` is ``a = 1, b = 0`` in the
Euclidean form and ``a = 1/2, b = 0`` in the cosine form (where ``d = 2 alpha``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from idml.core.errors import IdmlError

Form = Literal["cosine", "euclidean"]
BetaVariant = Literal["difference", "sum"]

RELEASE_A = 5.0
RELEASE_B = 4.0


@dataclass(frozen=True)
class ISMParams:
    """The constants of the ISM, ``D_IN = alpha * exp(-(beta + b) / (a * d))``, and the
    uncertainty distance ``beta`` (``"difference"`` or ``"sum"``). The one vocabulary of
    them: losses, distances, embeddings files and search all take ``a``, ``b``, ``beta``;
    a run config spells them ``ism_a``, ``ism_b``, ``ism_beta`` (:meth:`from_config`)."""

    a: float = RELEASE_A
    b: float = RELEASE_B
    beta: BetaVariant = "difference"

    @classmethod
    def from_config(cls, cfg: Any) -> ISMParams:
        """The ISM of a :class:`~idml.core.config.RunConfig`."""
        return cls(float(cfg.ism_a), float(cfg.ism_b), cfg.ism_beta)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ISMParams:
        """Inverse of :meth:`as_dict` (e.g. from an embeddings file's metadata)."""
        return cls(float(values["a"]), float(values["b"]), values["beta"])

    def as_dict(self) -> dict[str, Any]:
        """``{"a", "b", "beta"}`` as plain values (JSON metadata)."""
        return {"a": self.a, "b": self.b, "beta": self.beta}


#: The authors' release: ``a = 5``, ``b = 4``, ``beta = ||u_i - u_j||^2``.
RELEASE_ISM = ISMParams()
#: Lower clamp of ``d`` in the exponent; keeps ``beta / d`` finite where ``d == 0``.
EPS = 1e-8


@contextlib.contextmanager
def float32_region(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` so the metric runs in float32 under mixed precision."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def uncertainty_score(uncertainty: torch.Tensor) -> torch.Tensor:
    """Per-image uncertainty ``||u||^2`` of ``[N, Du]`` uncertainty embeddings, float32 ``[N]``.

    The one definition in idml: the ``beta`` of an image against a proxy (whose uncertainty
    is zero), the confidence that evaluation ranks queries by, and the score search reports.
    Larger means more ambiguous. ``u`` is not normalised (it must not be: ``docs/method.md``
    section 9, defect 5a). Differentiable; callers that report it detach it.
    """
    if uncertainty.ndim != 2:
        raise IdmlError(f"expected [N, D], got {tuple(uncertainty.shape)}")
    return uncertainty.float().pow(2).sum(dim=1)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise ``||x_i - y_j||^2`` ([N, M]), clamped at 0 against rounding.

    Written as the expansion ``|x|^2 + |y|^2 - 2 x.y`` instead of ``torch.cdist`` because the
    square root inside ``cdist`` has an infinite gradient at 0 (duplicates).
    """
    x, y = x.float(), y.float()
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.T)
    return sq.clamp_min(0.0)


def uncertainty_distance(
    u: torch.Tensor, v: torch.Tensor | None = None, variant: BetaVariant = "difference"
) -> torch.Tensor:
    """Pairwise uncertainty distance ``beta`` ([N, M]); ``v=None`` means ``v = u``."""
    v = u if v is None else v
    if variant == "difference":
        return squared_distances(u, v)
    if variant == "sum":
        u, v = u.float(), v.float()
        return u.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1).unsqueeze(0)
    raise IdmlError(f"unknown uncertainty distance {variant!r}; use 'difference' or 'sum'")


def introspective_distance(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    sq_dist: torch.Tensor | None = None,
    *,
    a: float = RELEASE_A,
    b: float = RELEASE_B,
) -> torch.Tensor:
    """``D_IN = alpha * exp(-(beta + b) / (a * d))`` elementwise, with ``d = sq_dist``.

    ``sq_dist`` defaults to ``alpha`` (the Euclidean form). ``alpha`` is clamped at 0 and
    ``d`` at :data:`EPS`, so ``D_IN -> 0`` continuously as ``alpha -> 0`` and neither the value
    nor the gradient is ever NaN/Inf.
    """
    with float32_region(alpha.device):
        alpha = alpha.float().clamp_min(0.0)
        d = alpha if sq_dist is None else sq_dist.float()
        return alpha * torch.exp(-(beta.float() + b) / (a * d.clamp_min(EPS)))


def pairwise_introspective(
    s: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    form: Form = "cosine",
    a: float = RELEASE_A,
    b: float = RELEASE_B,
    beta: BetaVariant = "difference",
) -> torch.Tensor:
    """Introspective comparison of every row of ``(s, u)`` with every row of ``(t, v)``.

    ``s``/``t`` are L2-normalised semantic embeddings, ``u``/``v`` uncertainty embeddings;
    ``t, v = None`` compares the set with itself. Returns the introspective *similarity*
    ``1 - D_IN`` (cosine form, larger = closer) or the introspective *distance* ``D_IN``
    (Euclidean form, smaller = closer).
    """
    if (t is None) != (v is None):
        raise IdmlError("give both t and v, or neither")
    t, v = (s, u) if t is None else (t, v)
    with float32_region(s.device):
        cos = s.float() @ t.float().T
        sq = (2.0 - 2.0 * cos).clamp_min(0.0)  # ||s_i - t_j||^2 for unit vectors
        bet = uncertainty_distance(u, v, beta)
        if form == "cosine":
            return 1.0 - introspective_distance(1.0 - cos, bet, sq, a=a, b=b)
        if form == "euclidean":
            return introspective_distance(sq, bet, sq, a=a, b=b)
    raise IdmlError(f"unknown form {form!r}; use 'cosine' or 'euclidean'")


def proxy_introspective_similarity(
    s: torch.Tensor,
    u: torch.Tensor,
    proxies: torch.Tensor,
    *,
    a: float = RELEASE_A,
    b: float = RELEASE_B,
    reference: bool = False,
    proxy_uncertainty: torch.Tensor | None = None,
    beta: BetaVariant = "difference",
) -> torch.Tensor:
    """Introspective cosine similarity of samples to (raw, learnable) proxies ([B, C]).

    Default mode: ``S = cos(s, p)``, ``d = ||s - p/|p| ||^2 = 2(1 - S)``,
    ``beta = ||u||^2`` (proxies have zero uncertainty unless ``proxy_uncertainty`` is given).

    ``reference=True`` reproduces the authors' release exactly: the uncertainty is
    L2-normalised (so ``beta == 1`` and the uncertainty head learns nothing, defect 5a) and
    ``d`` uses the *un-normalised* proxies while ``S`` uses normalised ones (defect 5b).
    """
    with float32_region(s.device):
        s, u, proxies = s.float(), u.float(), proxies.float()
        cos = s @ F.normalize(proxies, dim=1).T
        if reference:
            u = F.normalize(u, dim=1)
            sq = squared_distances(s, proxies)
        else:
            sq = (2.0 - 2.0 * cos).clamp_min(0.0)
        if proxy_uncertainty is None:
            bet = uncertainty_score(u)[:, None]
        else:
            bet = uncertainty_distance(u, proxy_uncertainty, beta)
        return 1.0 - introspective_distance(1.0 - cos, bet, sq, a=a, b=b)
