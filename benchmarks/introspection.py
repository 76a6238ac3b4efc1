"""Issue 10's benchmark: every uncertainty design against the baseline and the references.

For each design of ``idml.method.designs.DESIGNS`` (and ``baseline``: the plain loss on the
semantic metric, no mixup) it records accuracy (recall@1, MAP@R), how ``||u||^2`` ranks
queries (AURC beside a random order, the semantic gap, the pooled-feature norm and the gap +
``||u||^2`` combination fitted on the validation classes), the mixup (and, fine-tuned, CutMix)
ambiguity AUROC, and the range of ``beta = ||u||^2`` over the first 30 training steps.

Two recipes:

* ``frozen``: the loss sweep's (``benchmarks/losses.py``): cached pooled EfficientNet-Lite0
  features, the two heads and the proxies train through the library's ``Trainer``, lr 1e-3,
  4 epochs; seconds per run.
* ``finetune``: ``idml train`` with the data set's CPU preset (backbone fine-tuned).

Every run uses ``--val-fraction`` (classes held out of training, the same for every design;
the combination is fitted there) and is appended to ``--results`` (JSON lines); ``--summary``
prints the tables of a results file without training.

    IDML_DATA_ROOT=../shared/datasets python benchmarks/introspection.py --recipe frozen \\
        --preset flowers-cpu omniglot-cpu --seeds 0 1 2
    IDML_DATA_ROOT=../shared/datasets python benchmarks/introspection.py --recipe finetune \\
        --preset flowers-cpu --designs baseline stable --seeds 0 --epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from losses import as_feature_maps, cached_features

from idml.core.config import RunConfig, resolve_config
from idml.core.runtime import seed_everything
from idml.data.splits import LabeledTensors, RetrievalSplits
from idml.evaluation.evaluator import evaluate_model
from idml.method.designs import DESIGNS
from idml.method.metric import uncertainty_score
from idml.method.model import model_for_design
from idml.training.factories import build_loss_for
from idml.training.run import train
from idml.training.trainer import Trainer

TRACE_STEPS = 30


def variant(base: RunConfig, design: str, seed: int) -> RunConfig:
    """The baseline (semantic metric, no mixup) or IDML with ``design`` (ISM + mixup)."""
    if design == "baseline":
        return dataclasses.replace(base, metric="semantic", mixup=False, seed=seed)
    return dataclasses.replace(base, metric="introspective", mixup=True, design=design,
                               seed=seed)


def class_split(feats: dict, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the training features kept for training / held out as validation classes
    (the last ``fraction`` of the training classes, as ``--val-fraction`` does)."""
    y = feats["train_y"]
    classes = int(y.max()) + 1
    cut = classes - max(1, round(fraction * classes))
    return y < cut, y >= cut


def frozen_splits(feats: dict, fraction: float) -> RetrievalSplits:
    keep, held = class_split(feats, fraction)
    f, y = feats["train"], feats["train_y"]
    return RetrievalSplits(
        train=LabeledTensors(as_feature_maps(f[keep]), y[keep]),
        val=LabeledTensors(as_feature_maps(f[held]), y[held] - int(y[keep].max()) - 1),
        test=LabeledTensors(as_feature_maps(feats["test"]), feats["test_y"]),
        num_train_classes=int(y[keep].max()) + 1,
    )


def beta_range(trainer: Trainer, epochs: int) -> tuple[list[float], list[float]]:
    """Train ``epochs`` epochs; the batch-mean ``||u||^2`` of the first TRACE_STEPS forwards
    and the epochs' losses."""
    betas: list[float] = []

    def keep(_module, _inputs, output):
        if len(betas) < TRACE_STEPS:
            betas.append(float(uncertainty_score(output.detach()).mean()))

    hook = trainer.model.uncertainty_head.register_forward_hook(keep)
    try:
        losses = [trainer.run_epoch()["loss"] for _ in range(epochs)]
    finally:
        hook.remove()
    return betas, losses


def run_frozen(cfg: RunConfig, feats: dict) -> dict:
    seed_everything(cfg.seed)
    splits = frozen_splits(feats, cfg.val_fraction)
    model = model_for_design(torch.nn.Identity(), feats["train"].shape[1], cfg.embedding_dim,
                             design=cfg.design, freeze_bn=False)
    trainer = Trainer(cfg, model, build_loss_for(cfg, splits.num_train_classes), splits,
                      torch.device("cpu"))
    start = time.perf_counter()
    betas, losses = beta_range(trainer, cfg.epochs)
    train_s = time.perf_counter() - start
    metrics, unc = evaluate_model(model, splits, cfg, torch.device("cpu"), ambiguity=True)
    unc.pop("cutmix_auroc", None)  # a 1x1 "image" has no patch to paste: not measured here
    return {"train_s": train_s, "beta_first": betas, "epoch_losses": losses, "final": metrics,
            "uncertainty": unc}


def run_finetune(cfg: RunConfig, out_root: Path) -> dict:
    out = out_root / f"{cfg.dataset}-{cfg.design if cfg.metric != 'semantic' else 'baseline'}" \
                     f"-seed{cfg.seed}"
    cfg = dataclasses.replace(cfg, out=str(out))
    start = time.perf_counter()
    result = train(cfg)
    return {"train_s": time.perf_counter() - start, "final": result.final,
            "uncertainty": result.uncertainty, "run_dir": str(result.run_dir)}


def pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def summarise(rows: list[dict]) -> str:
    """Markdown tables (mean ± std over seeds) per preset and recipe."""
    out = []
    for key in dict.fromkeys((r["preset"], r["recipe"]) for r in rows):
        group = [r for r in rows if (r["preset"], r["recipe"]) == key]
        out += [f"\n{key[0]}, {key[1]} ({len({r['seed'] for r in group})} seeds)\n",
                "| design | R@1 | MAP@R | AURC u | gap | feature norm | combined | random | "
                "mixup AUROC | CutMix AUROC | mean u² | beta first 30 steps (min-max) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for design in dict.fromkeys(r["design"] for r in group):
            rs = [r for r in group if r["design"] == design]
            rc = [r["uncertainty"]["risk_coverage"] for r in rs]

            def aurc(name, rc=rc):
                return pm([c[name]["aurc"] if name in c else float("nan") for c in rc], 1, 4)

            betas = [b for r in rs for b in r.get("beta_first", [])]
            span = f"{min(betas):.3g}-{max(betas):.3g}" if betas else "-"
            out.append(
                f"| {design} | {pm([r['final']['recall@1'] for r in rs])} | "
                f"{pm([r['final']['map@r'] for r in rs])} | {aurc('uncertainty')} | "
                f"{aurc('semantic_gap')} | {aurc('feature_norm')} | {aurc('combined')} | "
                f"{aurc('random')} | "
                f"{pm([r['uncertainty'].get('mixup_auroc', float('nan')) for r in rs], 1, 3)}"
                f" | {pm([r['uncertainty'].get('cutmix_auroc', float('nan')) for r in rs], 1, 3)}"
                f" | {pm([r['uncertainty']['mean'] for r in rs], 1, 3)} | {span} |")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("frozen", "finetune"), default="frozen")
    parser.add_argument("--preset", nargs="+", default=["flowers-cpu"])
    parser.add_argument("--designs", nargs="+", default=["baseline", *DESIGNS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="[frozen 4, finetune the preset's]")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--results", default="benchmarks/results/introspection.jsonl")
    parser.add_argument("--out", default="runs/introspection", help="finetune run folders")
    parser.add_argument("--summary", action="store_true", help="only print --results' tables")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="further RunConfig overrides")
    parser.add_argument("--threads", type=int, help="torch threads (1: beside another job)")
    return parser.parse_args()


def recipe_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {"val_fraction": args.val_fraction, "progress": False}
    if args.recipe == "frozen":  # the loss sweep's recipe (benchmarks/losses.py)
        overrides.update(epochs=4, lr=1e-3, lr_step=2, warmup_epochs=0, m_per_class=4,
                         channels_last=False)
    if args.epochs:
        overrides["epochs"] = args.epochs
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)
    return overrides


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    if args.summary:
        print(summarise([json.loads(x) for x in results.read_text().splitlines() if x]))
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.preset:
        base = resolve_config(preset, overrides=recipe_overrides(args))
        feats = cached_features(dataclasses.replace(base, val_fraction=0.0)) \
            if args.recipe == "frozen" else None
        for design in args.designs:
            for seed in args.seeds:
                cfg = variant(base, design, seed)
                row = run_frozen(cfg, feats) if feats is not None else \
                    run_finetune(cfg, Path(args.out))
                row = {"preset": preset, "recipe": args.recipe, "design": design,
                       "seed": seed, "epochs": cfg.epochs, **row}
                rows.append(row)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rc = row["uncertainty"]["risk_coverage"]
                print(f"{preset} {design:10s} seed {seed}: R@1 "
                      f"{100 * row['final']['recall@1']:.2f} MAP@R "
                      f"{100 * row['final']['map@r']:.2f} AURC u/gap/random "
                      f"{rc['uncertainty']['aurc']:.4f}/{rc['semantic_gap']['aurc']:.4f}/"
                      f"{rc['random']['aurc']:.4f} mixup "
                      f"{row['uncertainty'].get('mixup_auroc', float('nan')):.3f} "
                      f"({row['train_s']:.0f} s)", flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main()
