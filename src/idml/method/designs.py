"""Uncertainty designs: how the uncertainty embedding ``u`` is made, trained and read.

One small contract (:class:`Design`) says everything that differs between designs:

* the **head** that maps the pooled feature ``f`` to ``u`` (:meth:`Design.make_head`), and
  whether it sees ``f`` detached from the backbone (``detach_input``);
* **beta**: every design's ``u`` is read through :func:`idml.method.metric.uncertainty_score`
  (``||u||^2``), so ``beta`` against a proxy is ``||u||^2`` and between two images the
  config's ``ism_beta`` (``||u_i - u_j||^2`` or ``||u_i||^2 + ||u_j||^2``), for all 14 losses
  through :class:`~idml.method.distances.IntrospectiveDistance`;
* the **objective** (:meth:`Design.objective`): the loss(es) on ``(s, u, labels)`` and any
  extra term, built from a factory ``metric -> loss`` so every loss of
  :data:`idml.method.losses.LOSSES` works under every design;
* the head's **learning rate** relative to the others (``head_lr_mult``; the optimiser's
  "uncertainty head" group);
* the **confidence** it exposes: ``-||u||^2`` (larger ``||u||^2`` = more doubt).

The registry :data:`DESIGNS` holds the forms compared in ``BENCHMARKS.md`` (issue 10):
``release`` and ``paper`` (kept selectable), ``stable`` (the paper's linear head at the learning
rate the first-step trace allows), ``expressive`` (a non-linear head, able to score a blend
above both of its parts), ``decoupled`` (semantics trained by the plain loss; the
uncertainty by the ISM on detached semantics), ``dul`` (a cost of doubt with a principled
prior: Data Uncertainty Learning, Chang et al. 2020), ``predictive`` (``||u||^2`` trained as
the odds of a retrieval failure) and ``guarded`` (``predictive`` whose embedding never sees a
mixup blend).

An objective may define ``blend_loss(s, u, labels)``: the loss that mixup applies to blends
(:func:`idml.method.losses.mixup_loss`; by default the objective itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from idml.core.errors import IdmlError

LossFactory = Callable[[str], nn.Module]  # metric ("semantic" | "introspective") -> loss

#: The design of a checkpoint or config that names none (everything made before designs).
LEGACY_DESIGN = "paper"
#: Initial ``E||u||^2`` of every trainable head: small next to the semantic distance
#: (``alpha`` in [0, 2]), so the ISM starts close to the plain metric.
INITIAL_BETA = 0.05


def _init_readout(layer: nn.Linear, fan_in_scale: float) -> None:
    """Normal weights with ``E||layer(x)||^2 ~= INITIAL_BETA * fan_in_scale``, zero bias.

    ``u`` must start non-zero (at ``u = 0`` the gradient of ``||u||^2`` vanishes) and small.
    ``fan_in_scale`` is the mean squared input component (e.g. 1 after LayerNorm).
    """
    du, fdim = layer.weight.shape
    std = math.sqrt(INITIAL_BETA / (du * fdim * max(fan_in_scale, 1e-12)))
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)


class LinearHead(nn.Linear):
    """``u = W f + c``: the paper's and the release's head.

    :meth:`init_weights` gives ``E||u||^2 = 0.01 * mean(f_j^2)`` (~0.03-0.1 on the
    pretrained and BN-normalised features measured here), as before designs existed.
    """

    def init_weights(self) -> None:
        """The head's initial state (called by the model after the semantic head's)."""
        nn.init.normal_(self.weight, std=0.1 / math.sqrt(self.out_features * self.in_features))
        nn.init.zeros_(self.bias)


class MLPHead(nn.Module):
    """``u = W2 gelu(W1 LayerNorm(f))``: a head that can represent ambiguity.

    A linear head cannot score a feature-space blend above both of its parts
    (``||u(lam f1 + (1 - lam) f2)||^2`` is the convex combination minus
    ``lam (1 - lam) ||W (f1 - f2)||^2``); a hidden non-linearity can. LayerNorm makes the
    input scale independent of the backbone (pooled features sum to ~1,700 on
    EfficientNet-Lite0). ``E||u||^2`` starts at :data:`INITIAL_BETA`.
    """

    def __init__(self, feature_dim: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.hidden = nn.Linear(feature_dim, hidden)
        self.out = nn.Linear(hidden, out_dim)
        self.out_features = out_dim

    def init_weights(self) -> None:
        """``E||u||^2 = INITIAL_BETA`` at the start."""
        _init_readout(self.out, fan_in_scale=0.4)  # E gelu(z)^2 ~ 0.4 for z ~ N(0, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(self.norm(f))))


class StdHead(MLPHead):
    """Per-dimension standard deviation ``u = sigma = exp(0.5 log sigma^2) > 0`` (DUL).

    ``||u||^2 = sum_k sigma_k^2`` is the total variance of the Gaussian embedding
    ``N(s, diag(sigma^2))``. Starts at ``sigma_k^2 = INITIAL_BETA / D`` for every ``k``.
    """

    def init_weights(self) -> None:
        """``sigma_k^2 = INITIAL_BETA / D`` for every image: zero weights, constant bias.
        The hidden layer still learns: the readout's gradient is not zero."""
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, math.log(INITIAL_BETA / self.out_features))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * super().forward(f))


class DecoupledLoss(nn.Module):
    """``L_semantic(s) + L_ISM(stop_grad(s), u)``: accuracy cannot be traded for doubt.

    The semantic head (and backbone) see only the plain loss, so the retrieval embedding is
    the baseline's; the uncertainty head sees only the ISM with the semantics held fixed.
    Each term has its own proxies (for proxy losses).
    """

    def __init__(self, factory: LossFactory) -> None:
        super().__init__()
        self.semantic = factory("semantic")
        self.introspective = factory("introspective")

    def proxy_parameters(self) -> list[nn.Parameter]:
        """Both terms' proxies."""
        return [*self.semantic.proxy_parameters(), *self.introspective.proxy_parameters()]

    def forward(self, s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.semantic(s, u, labels) + self.introspective(s.detach(), u, labels)


class DULLoss(nn.Module):
    """Data Uncertainty Learning (Chang et al., CVPR 2020) on any metric loss.

    Training embeds each image as ``N(s, diag(sigma^2))`` with ``sigma = u`` and feeds the
    loss a reparameterised sample ``normalize(s + sigma * eps)``: a large ``sigma`` blurs an
    image's position, which costs loss unless the image is ambiguous anyway. The cost of
    doubt is ``weight * KL(N(s, sigma^2) || N(0, tau^2 I))`` per image, with the prior's
    ``tau^2 = 1 / D`` (the per-component variance of a random unit vector), which keeps
    ``sigma`` from growing without bound. The loss itself is on the semantic metric (the
    variance enters through sampling, not through ``beta``); evaluation uses the mean ``s``.
    """

    def __init__(self, factory: LossFactory, weight: float = 0.01) -> None:
        super().__init__()
        self.inner = factory("semantic")
        self.weight = weight

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The inner loss's proxies."""
        return self.inner.proxy_parameters()

    def kl(self, sigma: torch.Tensor) -> torch.Tensor:
        """Mean over images of the variance part of ``KL(N(s, sigma^2) || N(0, tau^2 I))``
        (the mean part is a constant for unit ``s``)."""
        ratio = sigma.float().pow(2) * sigma.shape[1]  # sigma^2 / tau^2
        return 0.5 * (ratio - ratio.clamp_min(1e-30).log() - 1.0).sum(1).mean()

    def forward(self, s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.inner(s, u, labels)
        sample = F.normalize(s.float() + u.float() * torch.randn_like(u, dtype=torch.float32),
                             dim=1)
        return self.inner(sample, u, labels) + self.weight * self.kl(u)


class FailureOddsLoss(nn.Module):
    """The plain loss on the semantics, and ``||u||^2`` trained as the odds that the image's
    nearest neighbour in the batch has another label (learning to predict failure, in the
    spirit of ConfidNet, Corbiere et al. 2019, and "learning loss", Yoo & Kweon 2019).

    The target is computed from the detached semantic embeddings of the same batch, so it is
    the retrieval event that evaluation scores, seen on training classes; the head sees
    detached features, so doubt never moves the embedding. Under mixup the loss is called
    with the blend's two label sets weighted ``lam`` and ``1 - lam``; binary cross entropy is
    linear in its target, so a blend is trained towards ``lam * fail_y + (1 - lam) * fail_y2``.
    """

    def __init__(self, factory: LossFactory, weight: float = 1.0,
                 semantic_on_blends: bool = True) -> None:
        super().__init__()
        self.semantic = factory("semantic")
        self.weight = weight
        if not semantic_on_blends:  # mixup blends train the doubt alone (see mixup_loss)
            self.blend_loss = self.doubt

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The semantic loss's proxies."""
        return self.semantic.proxy_parameters()

    @staticmethod
    def batch_failure(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """1.0 where an image's nearest other image of the batch (cosine) has another label."""
        with torch.no_grad():
            s = s.detach().float()
            sim = s @ s.T
            sim.fill_diagonal_(float("-inf"))
            return (labels[sim.argmax(1)] != labels).float()

    def doubt(self, s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted cross entropy of the failure odds ``||u||^2`` alone."""
        # the logit of p = odds / (1 + odds), odds = ||u||^2 (the floor keeps log finite)
        logit = torch.log(u.float().pow(2).sum(1) + 1e-12)
        target = self.batch_failure(s, labels)
        return self.weight * F.binary_cross_entropy_with_logits(logit, target)

    def forward(self, s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.semantic(s, u, labels) + self.doubt(s, u, labels)


def _guarded(factory: LossFactory) -> nn.Module:
    return FailureOddsLoss(factory, semantic_on_blends=False)


def _joint(factory: LossFactory) -> nn.Module:
    return factory("introspective")


@dataclass(frozen=True)
class Design:
    """One way of making, training and reading the uncertainty embedding (see module doc)."""

    name: str
    summary: str
    head: type[nn.Module] = LinearHead
    head_lr_mult: float = 1.0
    detach_input: bool = False
    normalize: bool = False  # the release: u L2-normalised, so ||u||^2 = 1 (defect 5a)
    reference_numerics: bool = False  # the release's d with un-normalised proxies (5b)
    wrap: Callable[[LossFactory], nn.Module] = _joint

    def make_head(self, feature_dim: int, out_dim: int) -> nn.Module:
        """A fresh uncertainty head ``[B, feature_dim] -> [B, out_dim]``."""
        return self.head(feature_dim, out_dim)

    def objective(self, factory: LossFactory) -> nn.Module:
        """The training loss, called as ``loss(s, u, labels)``, with ``proxy_parameters()``."""
        return self.wrap(factory)


DESIGNS: dict[str, Design] = {d.name: d for d in (
    Design("release", "the authors' release: linear head, u L2-normalised (||u||^2 = 1, "
           "learns nothing), the release's d", normalize=True, reference_numerics=True),
    Design("paper", "the paper's form: linear head trained jointly at the common learning "
           "rate (idml's design before issue 10)"),
    Design("stable", "the paper's linear head at 1/100 of the learning rate, the step size "
           "the first-step trace allows (BENCHMARKS.md)", head_lr_mult=0.01),
    Design("expressive", "a non-linear head (LayerNorm, 256 GELU units) trained jointly by "
           "the ISM", head=MLPHead),
    Design("decoupled", "plain loss on the semantics; the ISM with detached semantics trains "
           "a non-linear head on detached features", head=MLPHead, detach_input=True,
           wrap=DecoupledLoss),
    Design("dul", "Data Uncertainty Learning: Gaussian embedding N(s, sigma^2), sampled in "
           "training, KL to N(0, I/D) as the cost of doubt; u = sigma", head=StdHead,
           wrap=DULLoss),
    Design("predictive", "plain loss on the semantics; ||u||^2 of a non-linear head on detached "
           "features trained as the odds that the image's nearest neighbour in the batch has "
           "another label", head=MLPHead, detach_input=True, wrap=FailureOddsLoss),
    Design("guarded", "predictive, with the embedding guarded from mixup: the semantics see "
           "the baseline's own objective (clean images only); blends train the failure odds "
           "alone", head=MLPHead, detach_input=True, wrap=_guarded),
)}


def get_design(name: str) -> Design:
    """The design registered as ``name`` (an :class:`IdmlError` naming the choices if none)."""
    if name not in DESIGNS:
        raise IdmlError(f"unknown design {name!r}; choose from {', '.join(DESIGNS)}")
    return DESIGNS[name]


__all__ = ["DESIGNS", "LEGACY_DESIGN", "DULLoss", "DecoupledLoss", "Design", "FailureOddsLoss",
           "LinearHead",
           "MLPHead", "StdHead", "get_design"]
