"""What the first optimiser steps do to the uncertainty: beta = ||u||^2, the introspective
similarity to the proxies and the gradients that reach the semantic head and the proxies.

Diagnostic for issue 10 (a stable uncertainty). Trains with the library's ``Trainer`` and
records, at every step, from a forward hook on the uncertainty head and the gradients left
by the step:

* ``beta``: mean and max of ``||u||^2`` over the batch (clean and mixed images);
* ``sat``: fraction of (sample, proxy) pairs whose introspective similarity is within 1e-6
  of 1 (the ``exp`` has underflowed: such a pair no longer depends on the semantic distance);
* ``g_sem`` / ``g_unc`` / ``g_proxy``: gradient norms of the semantic head, the uncertainty
  head and the proxies.

Two recipes: ``frozen`` (the loss sweep's: cached pooled EfficientNet-Lite0 features, heads
and proxies train, lr 1e-3) and ``finetune`` (the CPU recipe end to end, lr 1e-4, warm-up
epoch first: heads and proxies only).

    IDML_DATA_ROOT=../shared/datasets python benchmarks/beta_trace.py --recipe frozen
    IDML_DATA_ROOT=../shared/datasets python benchmarks/beta_trace.py --recipe finetune --steps 12
"""

from __future__ import annotations

import argparse

import torch
from losses import as_feature_maps, cached_features

from idml.core.config import RunConfig, resolve_config
from idml.core.rundir import quiet
from idml.core.runtime import seed_everything
from idml.data.splits import LabeledTensors, RetrievalSplits
from idml.method.metric import proxy_introspective_similarity, uncertainty_score
from idml.method.model import model_for_design
from idml.training.factories import build, build_loss_for
from idml.training.trainer import Trainer


def frozen_trainer(cfg: RunConfig) -> Trainer:
    """The loss sweep's setting: two heads and the proxies on cached pooled features."""
    feats = cached_features(cfg)
    seed_everything(cfg.seed)
    model = model_for_design(torch.nn.Identity(), feats["train"].shape[1], cfg.embedding_dim,
                             design=cfg.design, freeze_bn=False)
    splits = RetrievalSplits(train=LabeledTensors(as_feature_maps(feats["train"]),
                                                  feats["train_y"]),
                             test=None, num_train_classes=int(feats["train_y"].max()) + 1)
    loss_fn = build_loss_for(cfg, splits.num_train_classes)
    return Trainer(cfg, model, loss_fn, splits, torch.device("cpu"))


def finetune_trainer(cfg: RunConfig) -> Trainer:
    """The CPU recipe end to end (backbone frozen during the warm-up epoch)."""
    seed_everything(cfg.seed)
    model, splits = build(cfg, torch.device("cpu"), log=quiet)
    loss_fn = build_loss_for(cfg, splits.num_train_classes)
    return Trainer(cfg, model, loss_fn, splits, torch.device("cpu"))


def normalised_input(trainer: Trainer) -> None:
    """Feed the uncertainty head layer-normalised features (a candidate stabilisation: the
    update of ``u`` then no longer scales with the raw feature sum)."""
    head = trainer.model.uncertainty_head
    trainer.model.uncertainty_head = torch.nn.Sequential(
        torch.nn.LayerNorm(head.in_features, elementwise_affine=False), head)
    trainer.model.uncertainty_head.out_features = head.out_features


def grad_norm(params) -> float:
    grads = [p.grad.detach().float().reshape(-1) for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def trace(trainer: Trainer, steps: int) -> list[dict[str, float]]:
    """Run ``steps`` training steps, recording beta, saturation and gradients at each."""
    seen: dict[str, torch.Tensor] = {}
    model, loss_fn = trainer.model, trainer.loss_fn

    def keep(_module, _inputs, output):
        seen["u"] = output.detach()

    def keep_s(_module, _inputs, output):
        seen["s"] = torch.nn.functional.normalize(output.detach(), dim=1)

    hooks = [model.uncertainty_head.register_forward_hook(keep),
             model.semantic_head.register_forward_hook(keep_s)]
    for p in trainer.backbone_params:
        p.requires_grad_(trainer.cfg.warmup_epochs == 0)
    model.train()
    rows = []
    try:
        batches = iter(trainer.loader)
        for step in range(steps):
            try:
                images, labels = next(batches)
            except StopIteration:
                batches = iter(trainer.loader)
                images, labels = next(batches)
            proxies = getattr(loss_fn, "proxies", None)
            proxies = None if proxies is None else proxies.detach().clone()  # as seen
            loss, _ = trainer.train_step(images, labels)
            beta = uncertainty_score(seen["u"])
            sat = float("nan")  # saturation against proxies: Proxy-Anchor only
            if proxies is not None:
                with torch.no_grad():
                    sim = proxy_introspective_similarity(seen["s"], seen["u"], proxies,
                                                         a=loss_fn.a, b=loss_fn.b)
                sat = float((sim > 1 - 1e-6).float().mean())
            rows.append({
                "step": step + 1, "loss": float(loss), "beta_mean": float(beta.mean()),
                "beta_max": float(beta.max()), "sat": sat,
                "g_sem": grad_norm(model.semantic_head.parameters()),
                "g_unc": grad_norm(model.uncertainty_head.parameters()),
                "g_proxy": grad_norm(loss_fn.proxy_parameters()),
            })
    finally:
        for h in hooks:
            h.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("frozen", "finetune"), default="frozen")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", default="flowers-cpu")
    parser.add_argument("--lr", type=float, help="[frozen 1e-3, finetune the preset's]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", default="proxy_anchor")
    parser.add_argument("--unc-lr-mult", type=float, default=1.0,
                        help="uncertainty_lr_mult: the uncertainty head's lr / lr (candidate)")
    parser.add_argument("--normalised-input", action="store_true",
                        help="layer-normalise the features the uncertainty head sees (candidate)")
    args = parser.parse_args()
    overrides = {"seed": args.seed, "progress": False, "metric": "introspective", "mixup": True,
                 "loss": args.loss, "uncertainty_lr_mult": args.unc_lr_mult}
    if args.recipe == "frozen":
        overrides.update(lr=1e-3, warmup_epochs=0, m_per_class=4, channels_last=False,
                         epochs=4, lr_step=2)
    if args.lr is not None:
        overrides["lr"] = args.lr
    cfg = resolve_config(args.preset, overrides=overrides)
    trainer = (frozen_trainer if args.recipe == "frozen" else finetune_trainer)(cfg)
    if args.normalised_input:
        normalised_input(trainer)
    print(f"{args.recipe} recipe, {args.preset}, {cfg.loss}, lr {cfg.lr} (uncertainty head x"
          f"{args.unc_lr_mult}{', layer-normalised input' if args.normalised_input else ''}), "
          f"seed {cfg.seed}, ISM a={cfg.ism_a} b={cfg.ism_b}; beta = ||u||^2 at each forward")
    print(f"{'step':>4} {'loss':>9} {'beta mean':>10} {'beta max':>10} {'sat':>6} "
          f"{'g_sem':>9} {'g_unc':>9} {'g_proxy':>9}")
    for r in trace(trainer, args.steps):
        print(f"{r['step']:>4} {r['loss']:>9.4f} {r['beta_mean']:>10.4g} {r['beta_max']:>10.4g} "
              f"{r['sat']:>6.3f} {r['g_sem']:>9.3g} {r['g_unc']:>9.3g} {r['g_proxy']:>9.3g}")


if __name__ == "__main__":
    main()
