"""Images/s of the training loader (decoded cache vs plain PIL decoding) and of a training step.

Competitor: the same transforms over PIL decodes of the JPEG files every epoch (what a
torchvision ImageFolder pipeline does). Example (the numbers in BENCHMARKS.md):

    IDML_DATA_ROOT=../shared/datasets python benchmarks/loader_speed.py
"""

from __future__ import annotations

import argparse
import time

import torch

from idml.core.config import resolve_config
from idml.data.cache import cache_root
from idml.data.images import CachedImageDataset, ImageDataset, cache_images, loader_throughput
from idml.data.registry import read_dataset, resolve_data_root
from idml.data.splits import LabeledTensors, RetrievalSplits, labels_of, remap_labels
from idml.data.transforms import build_transforms, test_crop_fraction
from idml.method.model import model_from_config
from idml.training.factories import build_loss_for
from idml.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="Flowers-102 [$IDML_DATA_ROOT/flowers102]")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cfg = resolve_config("flowers-cpu")
    root = resolve_data_root(cfg.dataset, args.data_root)
    torch.manual_seed(0)
    model = model_from_config(cfg, in_chans=3)
    train = read_dataset(cfg.dataset, root).train
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

    # The library's training step of the CPU recipe (clean + mixup images in one forward).
    images = torch.stack([cached[i][0] for i in range(bs)])
    labels = torch.as_tensor(remap_labels(labels_of(cached)[:bs]))
    splits = RetrievalSplits(train=LabeledTensors(images, labels), test=None,
                             num_train_classes=int(labels.max()) + 1)
    trainer = Trainer(cfg, model, build_loss_for(cfg, splits.num_train_classes), splits,
                      torch.device("cpu"))
    times = []
    for step in range(args.steps):
        t = time.perf_counter()
        trainer.train_step(images, labels)
        if step > 0:  # the first step pays one-time allocation costs
            times.append(time.perf_counter() - t)
    step_rate = bs / (sum(times) / len(times))
    print(f"training step (batch {bs} + its mixup, {cfg.image_size} px): {step_rate:.0f} img/s; "
          f"the cached loader is {fast / step_rate:.1f}x faster than the model consumes")


if __name__ == "__main__":
    main()
