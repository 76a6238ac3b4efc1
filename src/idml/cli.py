"""Command-line interface: a thin layer over the library; only this module speaks of flags."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from idml import __version__
from idml.core.config import (
    BETA_VARIANTS,
    METRICS,
    PRECISIONS,
    PRESETS,
    RunConfig,
    resolve_config,
)
from idml.core.errors import IdmlError
from idml.core.outputs import check_output
from idml.data.download import SOURCES
from idml.data.registry import DATASETS
from idml.method.designs import DESIGNS
from idml.method.losses import LOSSES

# Fields whose default is None still need a type on the command line.
_NONE_DEFAULT_TYPES: dict[str, type] = {
    "uncertainty_dim": int, "uncertainty_lr_mult": float, "data_root": str, "out": str,
    "train_classes": str, "csv": str, "mlflow_uri": str,
}
_HELP: dict[str, str] = {
    "metric": "semantic (plain baseline) or introspective (IDML)",
    "backbone": "digits_cnn, tv_resnet50, tv_googlenet, or any convolutional timm model "
                "(resnet*, efficientnet*, convnext*, regnet*, ...; list them with "
                "python -c \"import timm; print(timm.list_models('resnet*'))\")",
    "loss": "proxy_anchor is the paper's; angular is semantic-only",
    "dataset": "; ".join(f"{name}: {info.summary}" for name, info in DATASETS.items()),
    "data_root": "folder (or file) of the data set [$IDML_DATA_ROOT/<its usual name>]",
    "design": "how the uncertainty embedding is made and trained: "
              + "; ".join(f"{name}: {d.summary}" for name, d in DESIGNS.items()),
    "out": "run folder (default: runs/<time>-<dataset>-<metric>)",
    "pretrained": "none, timm (needs network), package (efficientnet_lite0), or a weights file",
    "val_fraction": "fraction of training classes held out to pick the best epoch (0: last)",
    "device": "auto, cpu, cuda, cuda:N or mps (under torchrun: auto/cuda -> cuda:LOCAL_RANK)",
    "batch_size": "the global batch, split over torchrun processes",
    "log": "experiment trackers, comma-separated: tensorboard,mlflow,wandb (W&B offline)",
    "mlflow_uri": "MLflow store [$MLFLOW_TRACKING_URI, else sqlite:///~/.idml/mlflow.db]",
}


def _parse(text: str, convert: Any, what: str) -> Any:
    """``convert(text)``, or the argparse error "expected ``what``"."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 is not "the default": leave the flag out)."""
    value = _parse(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value} (leave the flag "
                                         "out for the default)")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _parse(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    value = _parse(text, int, "a port number")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return value


def _comma_list(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]`` (``--log tensorboard,mlflow``; an empty string: none)."""
    return [part.strip() for part in text.split(",") if part.strip()]


#: The closed choices of config fields, read from the registries and the config itself.
_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": tuple(DATASETS), "loss": tuple(LOSSES), "metric": METRICS, "design": tuple(DESIGNS),
    "precision": PRECISIONS, "ism_beta": BETA_VARIANTS,
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`RunConfig` field; unset flags stay ``None`` (not overrides)."""
    defaults = RunConfig()
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, "") + f" [digits default: {default}]"
        if f.name in _CHOICES:
            parser.add_argument(flag, choices=_CHOICES[f.name], default=None,
                                help=help_text.lstrip())
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif f.name == "log":
            parser.add_argument(flag, type=_comma_list, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", type=int, default=None, help=help_text)
        else:
            kind = _NONE_DEFAULT_TYPES.get(f.name, type(default))
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idml",
        description="Introspective Deep Metric Learning: train, evaluate, embed, index, search, "
                    "report and export."
    )
    parser.add_argument("--version", action="version", version=f"idml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_parsers(sub)
    _add_artifact_parsers(sub)
    _add_retrieval_parsers(sub)
    _add_serve_parser(sub)
    return parser


def _add_training_parsers(sub: Any) -> None:
    """``idml train``, ``idml eval`` and ``idml data download``."""
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

    sus = sub.add_parser("suspicious", help="list a run's training images whose label is most "
                                             "likely wrong")
    sus.add_argument("checkpoint", help="checkpoint.pt written by `idml train`")
    sus.add_argument("--top", type=_positive_int, default=20, help="how many to list [20]")
    sus.add_argument("--by", default="knn_disagreement",
                     choices=("knn_disagreement", "centroid_distance", "uncertainty"),
                     help="ranking score [knn_disagreement: the one that finds flipped labels; "
                          "||u||^2 cannot see a label, BENCHMARKS.md]")
    sus.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sus.add_argument("--json", action="store_true", help="print the list as JSON")

    data = sub.add_parser("data", help="data set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dl = data_sub.add_parser(
        "download", help="download and unpack an official data set (resumable, verified)"
    )
    dl.add_argument("name", choices=sorted(SOURCES))
    dl.add_argument("--root", required=True, help="folder to download and unpack into")
    dl.add_argument("--base-url", help="mirror folder holding the archives under their names")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")
    chk = data_sub.add_parser(
        "check", help="images, classes, unreadable files, duplicates and near-duplicates "
                      "of a data set (report only)")
    chk.add_argument("name", choices=sorted(n for n, d in DATASETS.items() if d.reader),
                     help="data set")
    chk.add_argument("--data-root", help="its folder [$IDML_DATA_ROOT/<its usual name>]")
    chk.add_argument("--csv", help="manifest (csv data sets)")
    chk.add_argument("--near-bits", type=_positive_int, default=4, metavar="N",
                     help="near-duplicate: difference hashes at most N of 64 bits apart [4]")


def _add_artifact_parsers(sub: Any) -> None:
    """``idml export`` and ``idml report``."""
    exp = sub.add_parser(
        "export", help="export a checkpoint's two-head model to ONNX or TorchScript"
    )
    exp.add_argument("checkpoint", help="checkpoint.pt written by `idml train`")
    exp.add_argument("--format", required=True, choices=["onnx", "torchscript"],
                     help="onnx (input 'images', outputs 'semantic', 'uncertainty') or "
                          "torchscript (traced; returns (semantic, uncertainty))")
    exp.add_argument("--out", required=True, metavar="FILE", help="file to write")
    exp.add_argument("--image-size", type=_positive_int, metavar="N",
                     help="input side length [the run's: its image size, 8 for digits]")
    exp.add_argument("--opset", type=int, metavar="N", help="ONNX opset [the exporter's]")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that idml did not write")

    rep = sub.add_parser(
        "report", help="write a self-contained HTML report of a run folder"
    )
    rep.add_argument("run_dir", help="run folder written by `idml train`")
    rep.add_argument("--out", metavar="FILE", help="HTML file to write [RUN_DIR/report.html]")
    rep.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that idml did not write")
    rep.add_argument("--device", default="cpu",
                     help="device for recomputing the embeddings: cpu, auto, cuda, ... [cpu]")
    rep.add_argument("--examples", type=_positive_int, default=8, metavar="N",
                     help="retrieval examples and most/least uncertain thumbnails shown [8]")
    rep.add_argument("--suspicious", type=int, default=0, metavar="N",
                     help="also list the N training images whose label is most likely wrong "
                          "(embeds the training split) [0]")


def _cmd_train(args: argparse.Namespace) -> int:
    from idml.training.run import resume_config, train

    if args.resume is not None:
        train(resume_config(args.resume), resume=args.resume)
        return 0
    names = {f.name for f in fields(RunConfig)}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
    cfg = resolve_config(args.preset, args.config, overrides)
    train(cfg)
    return 0


def _cmd_suspicious(args: argparse.Namespace) -> int:
    import dataclasses

    from idml.serving.trained import suspicious_training_images

    suspects = suspicious_training_images(args.checkpoint, args.top, args.device, args.by)
    if args.json:
        print(json.dumps([dataclasses.asdict(x) for x in suspects], indent=2))
        return 0
    print(f"ranked by {args.by}")
    print(f"{'rank':>4}  {'knn disagree':>12}  {'centroid':>8}  {'||u||^2':>9}  {'label':>5}  "
          "image")
    for rank, x in enumerate(suspects, 1):
        where = x.path if x.path is not None else f"training item {x.index}"
        print(f"{rank:>4}  {x.knn_disagreement:>12.2f}  {x.centroid_distance:>8.4f}  "
              f"{x.uncertainty:>9.4g}  {x.label:>5}  {where}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from idml.evaluation.evaluator import format_metrics_table
    from idml.evaluation.uncertainty import format_uncertainty_table
    from idml.serving.trained import evaluate_checkpoint

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
    print("\nqueries ranked by confidence (risk = 1 - recall@1; lower AURC is better; "
          f"uncertainty = ||u||^2 of design {unc['design']}):")
    print(format_uncertainty_table(unc["risk_coverage"]))
    print(f"ambiguity check (||u||^2 of altered vs clean test images; 0.5 = chance): mixup "
          f"AUROC {unc['mixup_auroc']:.3f}, CutMix AUROC {unc['cutmix_auroc']:.3f}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from idml.data.download import download_dataset

    if args.data_command == "check":
        from idml.data.check import check_dataset, format_check

        checks, shared = check_dataset(args.name, args.data_root, args.csv, args.near_bits)
        print(format_check(checks, shared, args.near_bits))
        return 0

    folder = download_dataset(
        args.name, args.root, base_url=args.base_url, progress=not args.no_progress
    )
    print(f"{args.name} is ready in {folder}; train with: "
          f"idml train --preset {args.name} --data-root {folder}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from idml.serving.export import (
        MissingDependency,
        default_image_size,
        example_input,
        export_model,
        is_export_file,
        max_difference,
    )
    from idml.serving.trained import load_trained

    check_output(args.out, inputs=[args.checkpoint], kind="a model export",
                 is_own=is_export_file, overwrite=args.overwrite)
    trained = load_trained(args.checkpoint)
    model, cfg = trained.model, trained.config
    size = args.image_size or default_image_size(model, cfg)
    path = export_model(model, args.out, args.format, image_size=size, opset=args.opset)
    channels = model.input_spec["input_size"][0]
    print(f"wrote {path} ({args.format}): input [batch, {channels}, {size}, {size}] "
          f"-> (semantic, uncertainty of design {cfg.design}: confidence -||u||^2)")
    try:
        diff = max_difference(model, path, args.format, example_input(model, size, 3, seed=1))
        print(f"largest difference from PyTorch on 3 random inputs: {diff:.3g}")
    except MissingDependency as exc:  # no onnxruntime: the export stands, unchecked
        print(f"not checked against PyTorch: {exc}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from idml.core.rundir import RUN_FILES
    from idml.serving.report import is_report_file, write_report

    if args.suspicious < 0:
        raise ValueError(f"--suspicious must be >= 0, got {args.suspicious}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
    check_output(out, inputs=[Path(args.run_dir) / name for name in RUN_FILES],
                 kind="a report", is_own=is_report_file, overwrite=args.overwrite)
    path = write_report(args.run_dir, out, device=args.device, examples=args.examples,
                        suspicious=args.suspicious)
    print(f"wrote {path}")
    return 0


def _add_retrieval_parsers(sub: Any) -> None:
    """``idml embed``, ``idml index`` and ``idml search``."""
    emb = sub.add_parser("embed", help="embed images with a trained checkpoint into an .npz file")
    emb.add_argument("checkpoint", help="checkpoint.pt written by `idml train`")
    emb.add_argument("source", nargs="?",
                     help="folder of images (recursive; class subfolders give the labels) or a "
                          "CSV manifest path,label")
    emb.add_argument("--split", choices=["train", "test", "query", "gallery"],
                     help="embed this split of the checkpoint's own data set instead of SOURCE")
    emb.add_argument("--out", required=True, metavar="FILE.npz", help="embeddings file to write")
    emb.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that idml did not write")
    emb.add_argument("--batch-size", type=_positive_int, metavar="N",
                     help="[the run's eval batch size]")
    emb.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    idx = sub.add_parser("index", help="build a faiss index over an embeddings file")
    idx.add_argument("embeddings", help=".npz written by `idml embed`")
    idx.add_argument("--out", required=True, metavar="INDEX_DIR", help="folder to write")
    idx.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that idml did not write")
    idx.add_argument("--kind", choices=["exact", "ivf", "hnsw"], default="exact",
                     help="exact (flat), ivf (k-means cells) or hnsw (graph) [exact]")
    idx.add_argument("--nlist", type=_positive_int, metavar="N",
                     help="ivf: cells [about 4 sqrt(N)]")
    idx.add_argument("--nprobe", type=_positive_int, metavar="N",
                     help="ivf: cells searched per query [nlist/4, at least 8]")
    idx.add_argument("--hnsw-m", type=_positive_int, metavar="M", help="hnsw: links per node [32]")
    idx.add_argument("--ef-search", type=_positive_int, metavar="N",
                     help="hnsw: search beam width [128]")
    idx.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                     help="store no thumbnails of the items (`idml serve` then makes them from the "
                          "indexed image files when asked)")

    sea = sub.add_parser("search", help="search an index with query images")
    sea.add_argument("index", help="folder written by `idml index`")
    sea.add_argument("queries", nargs="+", metavar="QUERY", help="query images or folders")
    sea.add_argument("--checkpoint", required=True,
                     help="the checkpoint that embedded the indexed images")
    sea.add_argument("-k", type=_positive_int, default=10, help="results per query [10]")
    sea.add_argument("--rerank", choices=["none", "introspective"], default="none",
                     help="introspective: re-order a faiss shortlist by the ISM [none]")
    sea.add_argument("--shortlist", type=_positive_int, default=100, metavar="N",
                     help="candidates re-ranked with --rerank introspective [100]")
    sea.add_argument("--json", action="store_true", help="print the results as JSON")
    sea.add_argument("--batch-size", type=_positive_int, metavar="N",
                     help="[the run's eval batch size]")
    sea.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _add_serve_parser(sub: Any) -> None:
    """``idml serve``."""
    srv = sub.add_parser("serve", help="serve an index: a search page and a JSON API")
    srv.add_argument("index", help="folder written by `idml index`")
    srv.add_argument("--checkpoint", required=True,
                     help="the checkpoint that embedded the indexed images")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on [127.0.0.1: this machine only]")
    srv.add_argument("--port", type=_port, default=8000, help="[8000]")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    srv.add_argument("--max-upload-mb", type=_positive_float, default=16.0, metavar="MB",
                     help="largest request body [16]")
    srv.add_argument("--max-pixels", type=_positive_int, default=40_000_000, metavar="N",
                     help="largest image, width x height, checked before decoding [40000000]")
    srv.add_argument("--max-k", type=_positive_int, default=100, metavar="N",
                     help="largest k a request may ask for [100]")
    srv.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                     help="a search that takes longer is answered 503 [30]")
    srv.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                     help="model forwards at once [1]")
    srv.add_argument("--low-confidence", type=_fraction, default=0.9, metavar="Q",
                     help="flag queries whose ||u||^2 is above this quantile of the index's "
                          "[0.9]")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from idml.serving.app import is_loopback, run
    except ImportError as exc:
        raise IdmlError(f"idml serve needs FastAPI and uvicorn ({exc}): pip install "
                        "'idml[serve]'") from exc
    from idml.serving.embedder import load
    from idml.serving.index import load_index
    from idml.serving.service import SearchService, ServeLimits

    limits = ServeLimits(max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)),
                         max_pixels=args.max_pixels, max_k=args.max_k, timeout_s=args.timeout,
                         forward_workers=args.workers,
                         low_confidence_quantile=args.low_confidence)
    local = is_loopback(args.host)
    if not local:
        print(f"idml serve: warning: listening on {args.host}: anyone who can reach this "
              "machine can search the index (file paths are left out of answers)",
              file=sys.stderr)
    service = SearchService(load_index(args.index), load(args.checkpoint, device=args.device),
                            limits, show_paths=local)
    print(f"serving {len(service.index)} items ({service.index.kind}, model "
          f"{service.embedder.fingerprint}) on http://{args.host}:{args.port}/")
    run(service, args.host, args.port)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from idml.data.sources import read_source
    from idml.serving.embedder import embed_source, embed_split, load
    from idml.serving.embeddings import is_embeddings_file, save_embeddings

    if args.source is None and args.split is None:
        raise IdmlError("nothing to embed: give SOURCE (a folder or CSV manifest) or --split")
    if args.source is not None and args.split is not None:
        raise IdmlError("give either SOURCE (a folder or CSV manifest) or --split, not both")
    check_output(args.out, inputs=[args.checkpoint, *([args.source] if args.source else [])],
                 kind="an embeddings file", is_own=is_embeddings_file, overwrite=args.overwrite)
    embedder = load(args.checkpoint, device=args.device, batch_size=args.batch_size)
    if args.split is not None:
        emb = embed_split(embedder, args.split)
    else:
        emb = embed_source(embedder, read_source(args.source), source=str(args.source))
    path = save_embeddings(args.out, emb)
    known = emb.labels[emb.labels >= 0]
    score = embedder.uncertainty_score(emb.uncertainty)
    print(f"embedded {len(emb)} images ({len(set(known.tolist()))} classes, "
          f"{len(emb) - len(known)} unlabelled) with model {embedder.fingerprint} -> {path}: "
          f"semantic {embedder.semantic_dim}-d, uncertainty {embedder.uncertainty_dim}-d, "
          f"mean ||u||^2 {float(score.mean()) if len(score) else float('nan'):.4g} "
          f"(design {embedder.config.design})")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from idml.serving.embeddings import load_embeddings
    from idml.serving.index import build_index, is_index_folder, save_index
    from idml.serving.thumbnails import make_thumbnails

    ivf, hnsw = (args.nlist, args.nprobe), (args.hnsw_m, args.ef_search)
    if args.kind != "ivf" and any(v is not None for v in ivf):
        raise IdmlError("--nlist/--nprobe apply to --kind ivf only")
    if args.kind != "hnsw" and any(v is not None for v in hnsw):
        raise IdmlError("--hnsw-m/--ef-search apply to --kind hnsw only")
    options: dict[str, Any] = {"nlist": args.nlist, "nprobe": args.nprobe}
    if args.hnsw_m is not None:
        options["hnsw_m"] = args.hnsw_m
    if args.ef_search is not None:
        options["ef_search"] = args.ef_search
    check_output(args.out, inputs=[args.embeddings], kind="an index folder",
                 is_own=is_index_folder, overwrite=args.overwrite, folder=True)
    index = build_index(load_embeddings(args.embeddings), args.kind, **options)
    thumbs = ""
    if args.thumbnails:
        index.thumbnails = make_thumbnails(index.paths)
        missing = index.thumbnails.missing
        thumbs = f"; thumbnails: {len(index) - missing}" + (
            f" ({missing} items without a readable image)" if missing else "")
    folder = save_index(index, args.out)
    params = ", ".join(f"{k}={v}" for k, v in index.params.items())
    print(f"indexed {len(index)} embeddings ({index.semantic_dim}-d, model "
          f"{index.fingerprint}) as {index.kind}{f' ({params})' if params else ''}{thumbs} "
          f"-> {folder}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from idml.serving.embedder import load
    from idml.serving.index import load_index
    from idml.serving.search import format_results, search_images

    index = load_index(args.index)
    embedder = load(args.checkpoint, device=args.device, batch_size=args.batch_size)
    result = search_images(index, embedder, args.queries, args.k,
                           rerank=None if args.rerank == "none" else args.rerank,
                           shortlist=args.shortlist)
    if args.json:
        out = {"index": args.index, "checkpoint": args.checkpoint,
               "fingerprint": embedder.fingerprint, "design": embedder.config.design,
               **result.to_dict()}
        print(json.dumps(out, indent=2))
    else:
        print(f"confidence: ||u||^2 of design {embedder.config.design} (larger = less sure)")
        print(format_results(result))
    return 0


#: Library parameters that are command-line flags of the same name (besides RunConfig's).
_PARAMETER_FLAGS = ("resume", "examples", "batch_size", "image_size", "split", "kind", "nlist",
                    "nprobe", "shortlist", "rerank", "k", "opset", "format", "base_url")
_PARAMETER = re.compile(
    r"(?<![\w.-])(" + "|".join(sorted({f.name for f in fields(RunConfig)} | set(_PARAMETER_FLAGS),
                                      key=len, reverse=True)) + r")="
)


def as_flags(message: str, args: argparse.Namespace) -> str:
    """A library error in the CLI's words: ``data_root='x'`` becomes ``--data-root 'x'``,
    with a hint where the fix is a flag the message cannot know of."""
    message = _PARAMETER.sub(lambda m: "--" + m.group(1).replace("_", "-") + " ", message)
    if args.command == "train" and "is not empty; choose another out folder" in message:
        message += " (--out DIR), or continue it with --resume DIR"
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``idml`` console script."""
    args = build_parser().parse_args(argv)
    try:
        command = {"embed": _cmd_embed, "index": _cmd_index, "search": _cmd_search,
                   "train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data,
                   "export": _cmd_export, "report": _cmd_report,
                   "suspicious": _cmd_suspicious, "serve": _cmd_serve}[args.command]
        return command(args)
    except (ValueError, OSError) as exc:  # our errors name the file, parameter or field
        print(f"idml {args.command}: error: {as_flags(str(exc), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
