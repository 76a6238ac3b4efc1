"""Command-line interface: a thin layer over :mod:`idml.train` and :mod:`idml.evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from idml import __version__
from idml.config import PRESETS, RunConfig, resolve_config
from idml.download import DATASETS

# Fields whose default is None still need a type on the command line.
_NONE_DEFAULT_TYPES: dict[str, type] = {
    "uncertainty_dim": int, "data_root": str, "out": str, "train_classes": str, "csv": str,
}
_HELP: dict[str, str] = {
    "metric": "semantic (plain baseline) or introspective (IDML)",
    "mode": "default, or reference to reproduce the authors' release numerics",
    "out": "run folder (default: runs/<time>-<dataset>-<metric>)",
    "pretrained": "none, timm (needs network), package (efficientnet_lite0), or a weights file",
    "val_fraction": "fraction of training classes held out to pick the best epoch (0: last)",
    "device": "auto, cpu, cuda, cuda:N or mps",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`RunConfig` field; unset flags stay ``None`` (not overrides)."""
    defaults = RunConfig()
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, "") + f" [digits default: {default}]"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", type=int, default=None, help=help_text)
        else:
            kind = _NONE_DEFAULT_TYPES.get(f.name, type(default))
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idml", description="Introspective Deep Metric Learning: train and evaluate."
    )
    parser.add_argument("--version", action="version", version=f"idml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a model (default: IDML-Proxy-Anchor on the embedded digits)"
    )
    train.add_argument("--preset", choices=sorted(PRESETS),
                       help="named settings applied first [the --dataset's own preset; digits]")
    train.add_argument("--config", metavar="YAML", help="YAML file of config fields")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue an interrupted run from its last completed epoch, with "
                            "its saved config (other flags are ignored)")
    _add_config_flags(train)

    ev = sub.add_parser("eval", help="recompute the test metrics of a saved checkpoint")
    ev.add_argument("checkpoint", help="checkpoint.pt written by `idml train`")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    data = sub.add_parser("data", help="data set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dl = data_sub.add_parser(
        "download", help="download and unpack an official data set (resumable, verified)"
    )
    dl.add_argument("name", choices=sorted(DATASETS))
    dl.add_argument("--root", required=True, help="folder to download and unpack into")
    dl.add_argument("--base-url", help="mirror folder holding the archives under their names")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from idml.train import resume_config, train

    if args.resume is not None:
        train(resume_config(args.resume), resume=args.resume)
        return 0
    names = {f.name for f in fields(RunConfig)}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    cfg = resolve_config(args.preset, args.config, overrides)
    train(cfg)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from idml.train import evaluate_checkpoint, format_metrics_table
    from idml.uncertainty import format_uncertainty_table

    metrics, recorded, unc = evaluate_checkpoint(args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    columns = {"eval": metrics}
    if recorded is not None:
        columns["recorded"] = recorded
    print(format_metrics_table(columns))
    if recorded is not None:
        diff = max(abs(metrics[k] - recorded[k]) for k in metrics if k in recorded)
        print(f"largest difference from the metrics recorded at training: {diff:.3g}")
    print("\nqueries ranked by confidence (risk = 1 - recall@1; lower AURC is better):")
    print(format_uncertainty_table(unc["risk_coverage"]))
    print(f"mixup ambiguity check: AUROC {unc['mixup_auroc']:.3f} (blended vs clean test images "
          "by ||u||^2; 0.5 = chance)")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from idml.download import download_dataset

    folder = download_dataset(
        args.name, args.root, base_url=args.base_url, progress=not args.no_progress
    )
    print(f"{args.name} is ready in {folder}; train with: "
          f"idml train --preset {args.name} --data-root {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``idml`` console script."""
    args = build_parser().parse_args(argv)
    try:
        command = {"train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data}[args.command]
        return command(args)
    except (ValueError, OSError) as exc:  # our errors name the file, flag or field
        print(f"idml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
