"""Every loss, baseline and introspective, on frozen EfficientNet-Lite0 features.

Fine-tuning the backbone for 15 losses x 2 metrics x 2 seeds x 2 data sets does not fit a
2-core CPU (one CPU-recipe run of Flowers-102 takes 2-4 minutes, Omniglot ~40). This sweep
keeps everything of the CPU recipe except that the backbone is frozen: its pooled
(GAP + GMP) ImageNet features are computed once per data set (test-time transform, cached),
and only the two heads (and the losses' proxies) train, through the library's own
``Trainer.train_step`` and the model's ``forward`` (the features enter as 1x1 maps that the
model's pooling returns unchanged). Mixup then blends pooled features instead of images.
Rows: ``semantic`` = the loss on cosine / Euclidean distances without mixup (the paper's
baseline), ``introspective`` = the IDML version (ISM + mixup).

    IDML_DATA_ROOT=../shared/datasets python benchmarks/losses.py --preset flowers-cpu --seeds 0 1
    IDML_DATA_ROOT=../shared/datasets python benchmarks/losses.py --preset omniglot-cpu \
        --seeds 0 1 --epochs 3

Every run is appended to ``--results`` (JSON lines); ``--summary`` prints the table of a
results file without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from idml.core.config import RunConfig, resolve_config
from idml.core.runtime import seed_everything
from idml.data.cache import cache_root
from idml.data.splits import LabeledTensors, RetrievalSplits, labels_of
from idml.evaluation.evaluator import evaluate_model
from idml.method.losses import LOSSES
from idml.method.model import IntrospectiveNet, model_for_design
from idml.training.factories import build, build_loss_for
from idml.training.trainer import Trainer

SEMANTIC_ONLY = {"angular"}  # no introspective version (see idml.method.losses)


@torch.no_grad()
def pooled_features(model: IntrospectiveNet, data, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for images, _ in loader:
        out.append(model.forward_features(images.contiguous(memory_format=torch.channels_last)))
    return torch.cat(out)


def cached_features(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Train/test pooled features of the preset's data set (computed once, then cached)."""
    key = hashlib.sha256(repr((cfg.dataset, cfg.data_root, cfg.train_classes, cfg.image_size,
                               cfg.backbone, cfg.pretrained)).encode()).hexdigest()[:12]
    path = cache_root() / "bench-features" / f"{cfg.dataset}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    model, splits = build(dataclasses.replace(cfg, augment=False), torch.device("cpu"))
    feats = {
        "train": pooled_features(model, splits.train), "train_y": labels_of(splits.train),
        "test": pooled_features(model, splits.test), "test_y": labels_of(splits.test),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    print(f"features of {len(feats['train_y'])} train / {len(feats['test_y'])} test images in "
          f"{time.perf_counter() - start:.0f} s -> {path}")
    return feats


def as_feature_maps(f: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[N, F]`` as 1x1 maps that the model pools back to exactly ``f``:
    GAP + GMP of a 1x1 map is twice its value, and halving is exact in floating point."""
    return (f / 2)[:, :, None, None]


def run_one(cfg: RunConfig, feats: dict[str, torch.Tensor]) -> dict:
    """Train the two heads (and the loss's proxies) on frozen features with the library's
    Trainer, then evaluate the test features with its evaluator."""
    seed_everything(cfg.seed)
    f_train, y_train = feats["train"], feats["train_y"]
    model = model_for_design(torch.nn.Identity(), f_train.shape[1], cfg.embedding_dim,
                             design=cfg.design, freeze_bn=False)
    splits = RetrievalSplits(
        train=LabeledTensors(as_feature_maps(f_train), y_train),
        test=LabeledTensors(as_feature_maps(feats["test"]), feats["test_y"]),
        num_train_classes=int(y_train.max()) + 1,
    )
    device = torch.device("cpu")
    trainer = Trainer(cfg, model, build_loss_for(cfg, splits.num_train_classes), splits, device)
    start = time.perf_counter()
    losses = [trainer.run_epoch()["loss"] for _ in range(cfg.epochs)]
    train_s = time.perf_counter() - start
    metrics, uncertainty = evaluate_model(model, splits, cfg, device)
    return {"loss": cfg.loss, "metric": cfg.metric, "seed": cfg.seed, "train_s": train_s,
            "mixup": cfg.mixup, "ism_a": cfg.ism_a, "ism_b": cfg.ism_b,
            "unc_lr_mult": cfg.uncertainty_lr_mult, "epoch_losses": losses, "final": metrics,
            "uncertainty": uncertainty,
            "finite": all(x == x and abs(x) != float("inf") for x in losses)}


def summarise(rows: list[dict]) -> str:
    """Markdown table: recall@1 and MAP@R (mean +- std over seeds) per loss and metric."""
    def stat(values: list[float]) -> str:
        if len(values) == 1:
            return f"{100 * values[0]:.2f}"
        return f"{100 * statistics.mean(values):.2f} +- {100 * statistics.stdev(values):.2f}"

    lines = ["| loss | R@1 semantic | R@1 introspective | MAP@R semantic | "
             "MAP@R introspective | train s/run (sem / intro) |", "|---|---|---|---|---|---|"]
    for loss in dict.fromkeys(r["loss"] for r in rows):
        cells: dict[str, dict[str, str]] = {"recall@1": {}, "map@r": {}, "time": {}}
        for metric in ("semantic", "introspective"):
            sel = [r for r in rows if r["loss"] == loss and r["metric"] == metric]
            if not sel:
                for c in cells.values():
                    c[metric] = "n/a"
                continue
            for key in ("recall@1", "map@r"):
                cells[key][metric] = stat([r["final"][key] for r in sel])
            cells["time"][metric] = f"{statistics.mean(r['train_s'] for r in sel):.0f}"
        lines.append(f"| {loss} | {cells['recall@1']['semantic']} | "
                     f"{cells['recall@1']['introspective']} | {cells['map@r']['semantic']} | "
                     f"{cells['map@r']['introspective']} | {cells['time']['semantic']} / "
                     f"{cells['time']['introspective']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flowers-cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--metrics", nargs="+", default=["semantic", "introspective"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="heads (proxies x100)")
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--m-per-class", type=int, default=4,
                        help="images per class in a batch (pair losses need positives)")
    parser.add_argument("--results", default="benchmarks/results/losses.jsonl")
    parser.add_argument("--summary", action="store_true", help="only print --results' table")
    parser.add_argument("--threads", type=int, help="torch threads (1: two sweeps side by side)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="further RunConfig overrides, e.g. ism_a=1 ism_b=0")
    parser.add_argument("--unc-lr-mult", type=float, default=1.0,
                        help="uncertainty_lr_mult: the uncertainty head's lr / lr (issue 10)")
    parser.add_argument("--mixup", choices=("paper", "on", "off"), default="paper",
                        help="paper: mixup with the introspective metric only (IDML); on/off: "
                             "for both metrics (ablations)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    if args.summary:
        rows = [json.loads(line) for line in results.read_text().splitlines() if line]
        for preset in dict.fromkeys(r["preset"] for r in rows):
            print(f"\n{preset}\n" + summarise([r for r in rows if r["preset"] == preset]))
        return

    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "lr_step": max(1, args.epochs // 2), "warmup_epochs": 0, "progress": False,
                 "m_per_class": args.m_per_class, "channels_last": False,
                 "uncertainty_lr_mult": args.unc_lr_mult}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)
    base = resolve_config(args.preset, overrides=overrides)
    feats = cached_features(base)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for loss in args.losses:
        for metric in args.metrics:
            if metric == "introspective" and loss in SEMANTIC_ONLY:
                continue
            for seed in args.seeds:
                cfg = dataclasses.replace(base, loss=loss, metric=metric, seed=seed,
                                          mixup={"paper": metric == "introspective",
                                                 "on": True, "off": False}[args.mixup])
                row = {"preset": args.preset, "epochs": args.epochs, **run_one(cfg, feats)}
                rows.append(row)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{loss:18s} {metric:13s} seed {seed}: recall@1 "
                      f"{100 * row['final']['recall@1']:.2f} map@r "
                      f"{100 * row['final']['map@r']:.2f} ({row['train_s']:.0f} s)", flush=True)
    print("\n" + summarise(rows))


if __name__ == "__main__":
    main()
