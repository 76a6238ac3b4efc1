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

``--jobs N`` runs N at once in spawned processes (the data is decoded once before they
start); the fine-tuned budget of BENCHMARKS.md ran on one GPU with ``--jobs 9``. Rows record
the machine (GPU or processor name); tables group by preset, recipe and epochs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml
from losses import as_feature_maps, cached_features

from idml.core.config import RunConfig, resolve_config
from idml.core.rundir import quiet
from idml.core.runtime import seed_everything, select_device
from idml.data.build import splits_from_config
from idml.data.splits import LabeledTensors, NoisyLabels, RetrievalSplits, with_label_noise
from idml.evaluation.evaluator import evaluate_model, training_suspicion
from idml.evaluation.uncertainty import mislabel_auroc
from idml.method.designs import DESIGNS
from idml.method.metric import uncertainty_score
from idml.method.model import model_for_design
from idml.serving.trained import load_trained
from idml.training.factories import build, build_loss_for
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
    splits = with_label_noise(frozen_splits(feats, cfg.val_fraction), cfg.label_noise, cfg.seed)
    model = model_for_design(torch.nn.Identity(), feats["train"].shape[1], cfg.embedding_dim,
                             design=cfg.design, freeze_bn=False)
    trainer = Trainer(cfg, model, build_loss_for(cfg, splits.num_train_classes), splits,
                      torch.device("cpu"))
    start = time.perf_counter()
    betas, losses = beta_range(trainer, cfg.epochs)
    train_s = time.perf_counter() - start
    metrics, unc = evaluate_model(model, splits, cfg, torch.device("cpu"), ambiguity=True)
    unc.pop("cutmix_auroc", None)  # a 1x1 "image" has no patch to paste: not measured here
    row = {"train_s": train_s, "beta_first": betas, "epoch_losses": losses, "final": metrics,
           "uncertainty": unc, "label_noise": cfg.label_noise}
    if isinstance(splits.train, NoisyLabels):
        scores = training_suspicion(model, splits.train, cfg, torch.device("cpu"))
        row["mislabel_auroc"] = mislabel_auroc(scores, splits.train.flipped.numpy())
    return row


def run_finetune(cfg: RunConfig, out_root: Path) -> dict:
    design = cfg.design if cfg.metric != "semantic" else "baseline"
    out = out_root / (f"{cfg.dataset}-{design}-ep{cfg.epochs}-noise{cfg.label_noise:g}"
                      f"-seed{cfg.seed}")
    cfg = dataclasses.replace(cfg, out=str(out))
    start = time.perf_counter()
    result = train(cfg)
    row = {"train_s": time.perf_counter() - start, "final": result.final,
           "uncertainty": result.uncertainty, "run_dir": str(result.run_dir),
           "label_noise": cfg.label_noise}
    if cfg.label_noise > 0:  # the run's training images under the test transform
        device = select_device(cfg.device)
        model = load_trained(result.run_dir / "checkpoint.pt").model.to(device)
        clean = dataclasses.replace(cfg, augment=False)
        train_set = splits_from_config(clean, model.input_spec, log=quiet).train
        scores = training_suspicion(model, train_set, clean, device)
        row["mislabel_auroc"] = mislabel_auroc(scores, train_set.flipped.numpy())
    return row


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
    clean = [r for r in rows if not r.get("label_noise")]
    for key in dict.fromkeys((r["preset"], r["recipe"], r["epochs"]) for r in clean):
        group = [r for r in clean if (r["preset"], r["recipe"], r["epochs"]) == key]
        out += [f"\n{key[0]}, {key[1]}, {key[2]} epochs ({len({r['seed'] for r in group})} "
                f"seeds; {group[0].get('machine', 'CPU')})\n",
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
    noisy = [r for r in rows if r.get("mislabel_auroc")]
    if noisy:
        out += ["\ntraining labels with errors: accuracy and AUROC of finding the mislabelled "
                "training images\n",
                "| preset, recipe | noise | design | R@1 | MAP@R | AUROC u | kNN disagreement | "
                "centroid distance |", "|---|---|---|---|---|---|---|---|"]
        keys = dict.fromkeys((r["preset"], r["recipe"], r["label_noise"], r["design"])
                             for r in noisy)
        for preset, recipe, noise, design in keys:
            rs = [r for r in noisy if (r["preset"], r["recipe"], r["label_noise"], r["design"])
                  == (preset, recipe, noise, design)]
            au = {k: pm([r["mislabel_auroc"][k] for r in rs], 1, 3)
                  for k in ("uncertainty", "knn_disagreement", "centroid_distance")}
            out.append(f"| {preset}, {recipe} | {noise:.0%} | {design} | "
                       f"{pm([r['final']['recall@1'] for r in rs])} | "
                       f"{pm([r['final']['map@r'] for r in rs])} | {au['uncertainty']} | "
                       f"{au['knn_disagreement']} | {au['centroid_distance']} |")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("frozen", "finetune"), default="frozen")
    parser.add_argument("--preset", nargs="+", default=["flowers-cpu"])
    parser.add_argument("--designs", nargs="+", default=["baseline", *DESIGNS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="[frozen 4, finetune the preset's]")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--label-noise", nargs="+", type=float, default=[0.0],
                        help="fractions of training labels moved (seeded), e.g. 0 0.1 0.2 0.4")
    parser.add_argument("--results", default="benchmarks/results/introspection.jsonl")
    parser.add_argument("--out", default="runs/introspection", help="finetune run folders")
    parser.add_argument("--summary", action="store_true", help="only print --results' tables")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="further RunConfig overrides")
    parser.add_argument("--threads", type=int, help="torch threads (1: beside another job)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (e.g. several small runs sharing one GPU)")
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


def machine() -> str:
    """What ran it: the GPU's name, else the processor's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def run_one(preset: str, design: str, noise: float, seed: int,
            args: argparse.Namespace) -> dict:
    """One run of the recipe as a results row (in a worker process under ``--jobs``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    base = resolve_config(preset, overrides=recipe_overrides(args))
    cfg = dataclasses.replace(variant(base, design, seed), label_noise=noise)
    if args.recipe == "frozen":
        row = run_frozen(cfg, cached_features(dataclasses.replace(base, val_fraction=0.0)))
    else:
        row = run_finetune(cfg, Path(args.out))
    return {"preset": preset, "recipe": args.recipe, "design": design, "seed": seed,
            "epochs": cfg.epochs, "machine": machine(), **row}


def record(row: dict, results: Path) -> None:
    """Append ``row`` to ``results`` and print it on one line."""
    with results.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    rc = row["uncertainty"]["risk_coverage"]
    found = row.get("mislabel_auroc", {}).get("uncertainty", float("nan"))
    mixup = row["uncertainty"].get("mixup_auroc", float("nan"))
    print(f"{row['preset']} {row['design']:10s} noise {row['label_noise']:.0%} seed "
          f"{row['seed']} ({row['epochs']} ep): R@1 {100 * row['final']['recall@1']:.2f} MAP@R "
          f"{100 * row['final']['map@r']:.2f} AURC u/gap/random "
          f"{rc['uncertainty']['aurc']:.4f}/{rc['semantic_gap']['aurc']:.4f}/"
          f"{rc['random']['aurc']:.4f} mixup {mixup:.3f}"
          f" mislabel AUROC {found:.3f} ({row['train_s']:.0f} s)", flush=True)


def warm_caches(args: argparse.Namespace) -> None:
    """Extract and decode each preset's data (or pool its features) once, before parallel
    workers would each do it and race for the same cache entries."""
    for preset in args.preset:
        base = resolve_config(preset, overrides=recipe_overrides(args))
        if args.recipe == "frozen":
            cached_features(dataclasses.replace(base, val_fraction=0.0))
        else:
            build(base, torch.device("cpu"), log=quiet)


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every (preset, design, noise, seed), in order; ``--jobs`` runs that many at once
    (spawned processes: CUDA does not survive a fork), each row recorded as it ends."""
    tasks = list(itertools.product(args.preset, args.designs, args.label_noise, args.seeds))
    results, rows = Path(args.results), []
    if args.jobs == 1:
        for task in tasks:
            rows.append(run_one(*task, args))
            record(rows[-1], results)
        return rows
    warm_caches(args)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_one, *task, args): task for task in tasks}
        for done in concurrent.futures.as_completed(futures):
            try:
                rows.append(done.result())
            except Exception as err:  # one failed run is reported; the others go on
                print(f"{futures[done]} failed: {type(err).__name__}: {err}", flush=True)
                continue
            record(rows[-1], results)
    return rows


def main() -> None:
    args = parse_args()
    results = Path(args.results)
    if args.summary:
        print(summarise([json.loads(x) for x in results.read_text().splitlines() if x]))
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    elif args.threads:
        torch.set_num_threads(args.threads)
    print(summarise(run_all(args)))


if __name__ == "__main__":
    main()
