"""The parts of a run, built from its config: model and data, loss, optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from idml.core.config import RunConfig
from idml.core.errors import ConfigError
from idml.data.build import splits_from_config
from idml.data.registry import get_dataset
from idml.data.splits import RetrievalSplits
from idml.method.designs import get_design
from idml.method.losses import build_loss
from idml.method.metric import ISMParams
from idml.method.model import IntrospectiveNet, model_from_config


def check_config(cfg: RunConfig) -> RunConfig:
    """Validate ``cfg`` and the names it takes from the registries (data set, loss with its
    metric and design), so a bad choice fails before any work."""
    cfg.validate()
    get_dataset(cfg.dataset)
    build_loss_for(cfg, num_classes=2)
    return cfg


def build(
    cfg: RunConfig, device: torch.device, log: Callable[[str], None] = print
) -> tuple[IntrospectiveNet, RetrievalSplits]:
    """The model and the data splits (normalised for that model) a config describes."""
    model = model_from_config(cfg, get_dataset(cfg.dataset).in_chans)
    splits = splits_from_config(cfg, model.input_spec, log)
    return model.to(device), splits


def build_loss_for(cfg: RunConfig, num_classes: int) -> torch.nn.Module:
    """The loss a config names, called as ``loss(semantic, uncertainty, labels)``."""
    design = get_design(cfg.design)
    overrides: dict[str, Any] = {}
    if cfg.loss == "proxy_anchor":
        overrides = {"margin": cfg.margin, "scale": cfg.scale,
                     "reference": design.reference_numerics}
    elif (cfg.margin, cfg.scale) != (RunConfig.margin, RunConfig.scale):
        raise ConfigError(
            f"margin/scale are Proxy-Anchor's; loss={cfg.loss!r} uses its own defaults "
            "(see idml.method.losses), so leave margin and scale unset"
        )
    elif design.reference_numerics:
        raise ConfigError(
            f"design={cfg.design!r} reproduces the release's Proxy-Anchor numerics; use "
            f"loss='proxy_anchor', or another design with loss={cfg.loss!r}"
        )

    def factory(metric: str) -> torch.nn.Module:
        return build_loss(
            cfg.loss,
            num_classes=num_classes,
            embedding_dim=cfg.embedding_dim,
            uncertainty_dim=cfg.uncertainty_dim or cfg.embedding_dim,
            metric=metric,  # type: ignore[arg-type]
            ism=ISMParams.from_config(cfg),
            **overrides,
        )

    # The semantic baseline is one loss on the semantic embedding whatever the design.
    return factory("semantic") if cfg.metric == "semantic" else design.objective(factory)


def make_optimizer(
    cfg: RunConfig,
    model: IntrospectiveNet,
    loss_fn: torch.nn.Module,
    device: torch.device,
) -> torch.optim.AdamW:
    """The recipe's AdamW: the trainable backbone, the semantic head and the loss's other
    parameters at ``cfg.lr``, the uncertainty head at ``cfg.lr * cfg.uncertainty_lr_mult``
    (default: the design's ``head_lr_mult``),
    the proxies at ``cfg.lr * cfg.proxy_lr_mult``; weight decay ``cfg.weight_decay``."""
    head_mult = cfg.uncertainty_lr_mult
    if head_mult is None:
        head_mult = get_design(cfg.design).head_lr_mult
    proxies = list(loss_fn.proxy_parameters())
    proxy_ids = {id(p) for p in proxies}
    return torch.optim.AdamW(
        [
            {"params": model.backbone_parameters(), "lr": cfg.lr},
            {"params": list(model.semantic_head.parameters()), "lr": cfg.lr},
            {"params": list(model.uncertainty_head.parameters()),
             "lr": cfg.lr * head_mult},
            {"params": proxies, "lr": cfg.lr * cfg.proxy_lr_mult},
            {"params": [p for p in loss_fn.parameters() if id(p) not in proxy_ids], "lr": cfg.lr},
        ],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        # One fused kernel over all tensors instead of a Python loop over ~300 of them.
        fused=device.type in ("cpu", "cuda"),
    )
