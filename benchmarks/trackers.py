"""What the experiment trackers cost: start-up, one epoch's logging and the end of a run, for
each backend of ``idml.training.tracking``, beside the time of one epoch of the digits default
measured in the same run (the logging overhead as a fraction of training).

    python benchmarks/trackers.py --repeats 3

MLflow writes to a fresh SQLite store in a temporary folder (its first start creates the
schema; a second run in the same store is timed separately as ``warm start``); W&B runs
offline. Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from idml.core.config import TRACKERS, RunConfig
from idml.core.rundir import quiet
from idml.core.runtime import seed_everything
from idml.training.factories import build, build_loss_for
from idml.training.tracking import PACKAGES, open_trackers
from idml.training.trainer import Trainer


def digits_epoch() -> tuple[float, dict]:
    """Seconds of the digits default's second epoch (no tracker) and its history record."""
    cfg = RunConfig(progress=False, device="cpu")
    seed_everything(cfg.seed)
    model, splits = build(cfg, torch.device("cpu"), log=quiet)
    trainer = Trainer(cfg, model, build_loss_for(cfg, splits.num_train_classes), splits,
                      torch.device("cpu"))
    trainer.run_epoch()  # the warm-up epoch
    start = time.perf_counter()
    record = trainer.run_epoch()
    return time.perf_counter() - start, record


def import_seconds(package: str) -> float:
    """Seconds a fresh interpreter spends importing ``package`` (beyond its own start)."""
    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t0

    return min(run(f"import {package}") for _ in range(3)) - min(run("pass") for _ in range(3))


def time_backend(name: str, record: dict, root: Path) -> dict[str, float]:
    """Start-up (fresh and warm store), one epoch's logging, and the end, in seconds."""
    cfg = RunConfig(log=[name], progress=False)
    out: dict[str, float] = {}
    for label in ("start", "warm start"):
        run_dir = root / f"{name}-{label.replace(' ', '-')}"
        run_dir.mkdir()
        t0 = time.perf_counter()
        trackers = open_trackers(cfg, run_dir)
        out[label] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trackers.log_epochs([record])
        out["epoch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trackers.finish({"test/recall_at_1": 0.99}, record["first_step"], [])
        out["end"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(TRACKERS))
    args = parser.parse_args()
    epoch_s, record = digits_epoch()
    steps = len(record["step_loss"])
    print(f"digits default: one epoch {epoch_s:.2f} s ({steps} steps)")
    print("| backend | import | start (fresh store) | start (warm) | one epoch's logging | "
          "end of run | logging / epoch |")
    print("|---|---|---|---|---|---|---|")
    for name in args.backends:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
                runs.append(time_backend(name, record, Path(tmp)))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {import_seconds(PACKAGES[name]):.2f} s | {med['start']:.2f} s | "
              f"{med['warm start']:.2f} s | "
              f"{1000 * med['epoch']:.0f} ms | {1000 * med['end']:.0f} ms | "
              f"{med['epoch'] / epoch_s:.1%} |")


if __name__ == "__main__":
    main()
