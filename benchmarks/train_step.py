"""Images/s of one training step of the CPU recipe, the naive way vs idml's, fp32 vs bf16.

The CPU recipe (``--preset flowers-cpu``): EfficientNet-Lite0, 128 px, batch 60 plus its 60
mixup images, IDML-Proxy-Anchor, AdamW, gradient clipping. Variants, each timed over the same
fixed batches after warm-up steps:

* ``naive``: what a straightforward port does -- clean and mixed images in two forward
  passes, NCHW activations, BatchNorm frozen the usual way (modules in eval mode), for-loop
  AdamW, ``loss.item()`` every step (a host sync);
* one forward of clean + mixed images (BatchNorm is frozen, so this equals two passes) and
  channels-last activations, BatchNorm still in eval mode;
* ``idml``: the library's own step, ``idml.training.trainer.Trainer.train_step`` -- the above
  with frozen BatchNorm *modules* (a per-channel affine map, timm's ``FrozenBatchNorm2d``) and
  fused AdamW, no host sync;
* ``idml bf16``: the same under ``--precision bf16`` autocast (the ISM stays float32).

Also prints where the time of an ``idml`` step goes (torch.profiler, top operators).

    python benchmarks/train_step.py
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from idml.core.config import RunConfig, resolve_config
from idml.core.runtime import autocast
from idml.data.splits import LabeledTensors, RetrievalSplits
from idml.method.losses import mixup_batch, mixup_loss
from idml.method.model import create_model, model_from_config
from idml.training.factories import build_loss_for
from idml.training.trainer import Trainer


def make_parts(cfg, channels_last: bool, fused: bool, frozen_modules: bool = True):
    torch.manual_seed(0)
    model = create_model(cfg.backbone, embedding_dim=cfg.embedding_dim,
                         pretrained=cfg.pretrained, freeze_bn=frozen_modules)
    model.train()
    if not frozen_modules:  # the usual way to freeze: BatchNorm modules in eval mode
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
                m.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss_for(cfg, num_classes=51)
    params = [
        {"params": model.backbone_parameters(), "lr": cfg.lr},
        {"params": model.new_parameters(), "lr": cfg.lr},
        {"params": list(loss_fn.proxy_parameters()), "lr": cfg.lr * cfg.proxy_lr_mult},
    ]
    kwargs = {"fused": True} if fused else {"foreach": False}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    return model, loss_fn, optimizer


def idml_trainer(cfg: RunConfig, precision: str, batches) -> Trainer:
    """The library's Trainer on the recipe's model and loss (its ``train_step`` is timed)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, precision=precision)
    model = model_from_config(cfg, in_chans=3)
    images, labels = batches[0]
    splits = RetrievalSplits(train=LabeledTensors(images, labels), test=None,
                             num_train_classes=51)
    return Trainer(cfg, model, build_loss_for(cfg, num_classes=51), splits,
                   torch.device("cpu"))


def step(model, loss_fn, optimizer, images, labels, gen, *, batched: bool, channels_last: bool,
         precision: str, sync: bool, clip: float) -> None:
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(torch.device("cpu"), precision):
        mixed, perm, lam = mixup_batch(images, gen)
        if batched:
            s, u = model(torch.cat([images, mixed]))
            n = len(images)
            clean_out, mixed_out = (s[:n], u[:n]), (s[n:], u[n:])
        else:
            clean_out, mixed_out = model(images), model(mixed)
        loss = mixup_loss(loss_fn, clean_out, mixed_out, labels, perm, lam)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_([p for g in optimizer.param_groups for p in g["params"]],
                                    clip)
    optimizer.step()
    if sync:
        loss.item()


def time_steps(run_step, batches, warmup: int) -> float:
    """Seconds for one pass over ``batches``, after ``warmup`` untimed steps."""
    for images, labels in batches[:warmup]:
        run_step(images, labels)
    start = time.perf_counter()
    for images, labels in batches:
        run_step(images, labels)
    return time.perf_counter() - start


def competitor(cfg: RunConfig, v: dict):
    """One step function of the hand-written variants (the naive step and its first fixes)."""
    model, loss_fn, optimizer = make_parts(cfg, v["channels_last"], v["fused"], v["frozen"])
    mix_gen = torch.Generator().manual_seed(1)
    run = dict(batched=v["batched"], channels_last=v["channels_last"], precision="fp32",
               sync=v["sync"], clip=cfg.grad_clip)
    return lambda images, labels: step(model, loss_fn, optimizer, images, labels, mix_gen,
                                       **run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    cfg = resolve_config("flowers-cpu")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g),
                torch.arange(cfg.batch_size // 4).repeat_interleave(4))
               for _ in range(args.steps)]
    variants = {
        "naive (2 forwards, NCHW, eval-mode BN, sync)": lambda: competitor(cfg, dict(
            batched=False, channels_last=False, fused=False, frozen=False, sync=True)),
        "1 forward, channels-last, eval-mode BN": lambda: competitor(cfg, dict(
            batched=True, channels_last=True, fused=False, frozen=False, sync=False)),
        "idml fp32 (Trainer.train_step)": lambda: idml_trainer(cfg, "fp32", batches).train_step,
        "idml bf16 (Trainer.train_step)": lambda: idml_trainer(cfg, "bf16", batches).train_step,
    }
    print(f"CPU recipe step: batch {cfg.batch_size} + {cfg.batch_size} mixup images at "
          f"{cfg.image_size} px, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rates = {}
    for name, make in variants.items():
        elapsed = time_steps(make(), batches, args.warmup)
        rates[name] = args.steps * cfg.batch_size / elapsed
        print(f"{name:46s} {rates[name]:7.1f} train images/s ({elapsed / args.steps:.2f} s/step)",
              flush=True)
    base = next(iter(rates.values()))
    for name, rate in list(rates.items())[1:]:
        print(f"{name:46s} {rate / base:5.2f}x the naive step")

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        train_step = idml_trainer(cfg, "fp32", batches).train_step
        train_step(*batches[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for images, labels in batches[:3]:
                train_step(images, labels)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
