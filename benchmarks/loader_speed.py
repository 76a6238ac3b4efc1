"""Images/s of the training loader (decoded cache vs plain PIL decoding) and of a training step.

Competitor: the same transforms over PIL decodes of the JPEG files every epoch (what a
torchvision ImageFolder pipeline does). Example (the numbers in BENCHMARKS.md):

    python benchmarks/loader_speed.py --data-root ../shared/datasets/flowers102/images
"""

from __future__ import annotations

import argparse
import time

import torch

from idml.core.config import resolve_config
from idml.data.cache import cache_root
from idml.data.images import CachedImageDataset, ImageDataset, cache_images, loader_throughput
from idml.data.registry import read_dataset
from idml.data.splits import labels_of
from idml.data.transforms import build_transforms, test_crop_fraction
from idml.method.losses import mixup_batch, mixup_loss
from idml.method.model import create_model
from idml.training.factories import build_loss_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/datasets/flowers102/images")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cfg = resolve_config("flowers-cpu", overrides={"data_root": args.data_root})
    torch.manual_seed(0)
    model = create_model(cfg.backbone, embedding_dim=cfg.embedding_dim,
                         pretrained=cfg.pretrained, freeze_bn=cfg.freeze_bn)
    train = read_dataset("folder", args.data_root, train_classes=cfg.train_classes).train
    transform = build_transforms(model.input_spec, cfg.image_size, train=True)
    short = round(cfg.image_size / test_crop_fraction(model.input_spec))
    start = time.perf_counter()
    decoded = cache_images(train, short, cache_dir=cache_root() / "decoded")
    print(f"cache ready in {time.perf_counter() - start:.1f} s ({decoded.nbytes / 2**20:.0f} MiB)")
    cached = CachedImageDataset(decoded, train.labels, transform)
    plain = ImageDataset(train, transform)
    bs = cfg.batch_size
    pil = loader_throughput(plain, bs, 0, args.batches)
    fast = loader_throughput(cached, bs, 0, args.batches)
    print(f"loader alone, batch {bs}, main process: PIL decode {pil:.0f} img/s, "
          f"decoded cache {fast:.0f} img/s, ratio {fast / pil:.2f}x")

    # One training step of the CPU recipe (clean + mixup images in one forward).
    loss_fn = build_loss_for(cfg, len(set(train.labels)))
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=cfg.lr)
    model = model.to(memory_format=torch.channels_last).train()
    images = torch.stack([cached[i][0] for i in range(bs)])
    labels = torch.remainder(labels_of(cached)[:bs], len(set(train.labels)))
    times = []
    for step in range(args.steps):
        t = time.perf_counter()
        mixed, perm, lam = mixup_batch(images)
        x = torch.cat([images, mixed]).contiguous(memory_format=torch.channels_last)
        s, u = model(x)
        loss = mixup_loss(loss_fn, (s[:bs], u[:bs]), (s[bs:], u[bs:]), labels, perm, lam)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step > 0:  # the first step pays one-time allocation costs
            times.append(time.perf_counter() - t)
    step_rate = bs / (sum(times) / len(times))
    print(f"training step (batch {bs} + its mixup, {cfg.image_size} px): {step_rate:.0f} img/s; "
          f"the cached loader is {fast / step_rate:.1f}x faster than the model consumes")


if __name__ == "__main__":
    main()
