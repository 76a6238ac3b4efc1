"""Proxy-Anchor vs IDML-Proxy-Anchor (and the release's reference numerics), several seeds.

Trains every variant with the same preset and seeds and prints mean +- std of recall@1,
recall@2, nmi and map@r plus wall time per run. Example (the numbers in BENCHMARKS.md):

    python benchmarks/idml_vs_baseline.py --preset flowers-cpu --seeds 0 1 2
    python benchmarks/idml_vs_baseline.py --preset omniglot-cpu --seeds 0 1 2
    python benchmarks/idml_vs_baseline.py --preset flowers-cpu --variants mixup_only metric_only

Results of every run are appended as JSON lines to ``--results`` so an interrupted sweep
keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from idml.core.config import resolve_config
from idml.training.run import train

#: What each row changes on top of the preset (everything else identical).
VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {"metric": "semantic", "mixup": False},  # plain Proxy-Anchor
    "idml": {"metric": "introspective", "mixup": True, "design": "paper"},
    "reference": {"metric": "introspective", "mixup": True, "design": "release"},
    "mixup_only": {"metric": "semantic", "mixup": True},
    "metric_only": {"metric": "introspective", "mixup": False, "design": "paper"},
    # the paper's form of the ISM, alpha * exp(-beta / alpha), without the release's constant
    # warp b = 4 (cosine form: a = 1/2, b = 0)
    "idml_paper": {"metric": "introspective", "mixup": True, "design": "paper",
                   "ism_a": 0.5, "ism_b": 0.0},
}
COLUMNS = ("recall@1", "recall@2", "nmi", "map@r")


def run_one(preset: str, variant: str, seed: int, overrides: dict, out_root: Path) -> dict:
    out = out_root / f"{preset}-{variant}-seed{seed}"
    cfg = resolve_config(
        preset,
        overrides={**overrides, **VARIANTS[variant], "seed": seed, "out": str(out),
                   "progress": False},
    )
    start = time.perf_counter()
    result = train(cfg)
    return {
        "preset": preset, "variant": variant, "seed": seed,
        "wall_s": time.perf_counter() - start, "final": result.final,
        "initial": result.initial, "uncertainty": result.uncertainty,
    }


def summarise(rows: list[dict], variants: list[str]) -> str:
    head = f"{'variant':<12}" + "".join(f"{c:>16}" for c in (*COLUMNS, "wall s/run"))
    lines = [head]
    for v in variants:
        runs = [r for r in rows if r["variant"] == v]
        if not runs:
            continue
        cells = []
        for c in COLUMNS:
            vals = [100 * r["final"][c] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):7.2f} +- {sd:4.2f}")
        cells.append(f"{statistics.mean(r['wall_s'] for r in runs):10.0f}")
        lines.append(f"{v:<12}" + "".join(f"{c:>16}" for c in cells) + f"   (n={len(runs)})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["baseline", "idml", "reference"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--data-root", help="override the preset's data root")
    parser.add_argument("--results", type=Path, help="JSON-lines file to append runs to")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="further RunConfig overrides, e.g. num_workers=8 device=cuda")
    args = parser.parse_args()
    overrides = {"epochs": args.epochs, "data_root": args.data_root}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                row = run_one(args.preset, variant, seed, overrides, Path(tmp))
                rows.append(row)
                print(f"{variant:<12} seed {seed}: " + "  ".join(
                    f"{c} {100 * row['final'][c]:.2f}" for c in COLUMNS
                ) + f"  ({row['wall_s']:.0f} s)", flush=True)
                if args.results:
                    with args.results.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print()
    print(f"preset {args.preset}, seeds {args.seeds}, final test metrics (mean +- std):")
    print(summarise(rows, args.variants))


if __name__ == "__main__":
    main()
