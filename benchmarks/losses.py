"""Every loss, baseline and introspective, on frozen EfficientNet-Lite0 features.

Fine-tuning the backbone for 15 losses x 2 metrics x 2 seeds x 2 data sets does not fit a
2-core CPU (one CPU-recipe run of Flowers-102 takes 2-4 minutes, Omniglot ~40). This sweep
keeps everything of the CPU recipe except that the backbone is frozen: its pooled
(GAP + GMP) ImageNet features are computed once per data set (test-time transform, cached),
and only the two heads (and the losses' proxies) train. Mixup then blends pooled features
instead of images. Rows: ``semantic`` = the loss on cosine / Euclidean distances without
mixup (the paper's baseline), ``introspective`` = the IDML version (ISM + mixup).

    python benchmarks/losses.py --preset flowers-cpu --seeds 0 1
    python benchmarks/losses.py --preset omniglot-cpu --seeds 0 1 --epochs 3

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
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from idml.core.config import RunConfig, resolve_config
from idml.data.images import make_train_loader
from idml.data.readers import cache_root
from idml.data.splits import labels_of
from idml.evaluation.metrics import retrieval_metrics
from idml.method.losses import LOSSES, mixup_batch, mixup_loss
from idml.method.model import IntrospectiveNet
from idml.training.run import build, build_loss_for, make_optimizer, seed_everything

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


def run_one(cfg: RunConfig, feats: dict[str, torch.Tensor], m_per_class: int) -> dict:
    seed_everything(cfg.seed)
    f_train, y_train = feats["train"], feats["train_y"]
    heads = IntrospectiveNet(torch.nn.Identity(), f_train.shape[1], cfg.embedding_dim,
                             freeze_bn=False)
    num_classes = int(y_train.max()) + 1
    loss_fn = build_loss_for(cfg, num_classes)
    optimizer = make_optimizer(cfg, [], heads.new_parameters(), loss_fn, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, gamma=cfg.lr_gamma)
    loader = make_train_loader(TensorDataset(f_train, y_train), y_train.tolist(),
                               cfg.batch_size, m_per_class, cfg.seed)
    mixup_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def embed(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(heads.semantic_head(f), dim=1), heads.uncertainty_head(f)

    start = time.perf_counter()
    losses = []
    for _ in range(cfg.epochs):
        total, seen = 0.0, 0
        for f, y in loader:
            if cfg.mixup:
                mixed, perm, lam = mixup_batch(f, mixup_gen)
                s, u = embed(torch.cat([f, mixed]))
                n = len(f)
                loss = mixup_loss(loss_fn, (s[:n], u[:n]), (s[n:], u[n:]), y, perm, lam)
            else:
                loss = loss_fn(*embed(f), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        scheduler.step()
        losses.append(total / max(seen, 1))
    train_s = time.perf_counter() - start
    with torch.no_grad():
        s, _ = embed(feats["test"])
    metrics = retrieval_metrics(s, feats["test_y"], ks=tuple(cfg.eval_ks), seed=cfg.seed)
    return {"loss": cfg.loss, "metric": cfg.metric, "seed": cfg.seed, "train_s": train_s,
            "mixup": cfg.mixup, "ism_a": cfg.ism_a, "ism_b": cfg.ism_b,
            "epoch_losses": losses, "final": metrics,
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
                 "lr_step": max(1, args.epochs // 2), "warmup_epochs": 0, "progress": False}
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
                row = {"preset": args.preset, "epochs": args.epochs, **run_one(
                    cfg, feats, args.m_per_class)}
                rows.append(row)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{loss:18s} {metric:13s} seed {seed}: recall@1 "
                      f"{100 * row['final']['recall@1']:.2f} map@r "
                      f"{100 * row['final']['map@r']:.2f} ({row['train_s']:.0f} s)", flush=True)
    print("\n" + summarise(rows))


if __name__ == "__main__":
    main()
