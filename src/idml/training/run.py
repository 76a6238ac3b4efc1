"""Training: the paper's recipe (Proxy-Anchor + ISM, mixup, AdamW, warm-up, StepLR, clipping)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from idml.core.checkpoint import save_checkpoint
from idml.core.config import RunConfig, as_dict
from idml.data.images import make_train_loader
from idml.data.splits import (
    RetrievalSplits,
    labels_of,
    load_digits_splits,
    load_image_splits,
    random_affine,
)
from idml.evaluation.knn import knn
from idml.evaluation.metrics import evaluation_depth, query_gallery_metrics, retrieval_metrics
from idml.evaluation.uncertainty import (
    format_uncertainty_table,
    mixup_ambiguity_auroc,
    query_correct,
    uncertainty_report,
    uncertainty_score,
)
from idml.method.losses import build_loss, mixup_batch, mixup_loss
from idml.method.model import IntrospectiveNet, create_model
from idml.training.distributed import Distributed, process_group


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; ``cpu``, ``cuda[:N]``, ``mps`` are
    checked to exist here."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N "
                             "or mps") from exc
        mps = getattr(torch.backends, "mps", None)
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available()
            and (device.index is None or device.index < torch.cuda.device_count()),
            "mps": mps is not None and mps.is_available(),
        }
        if not available.get(device.type, True):
            raise ValueError(f"--device {name}: no such device on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``precision`` in fp32 | bf16 | fp16 (fp32: no autocast).

    The ISM and the losses' exp/log switch autocast off themselves and run in float32.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- seeds third-party code that uses the legacy API
    torch.manual_seed(seed)


@torch.no_grad()
def compute_embeddings(
    model: IntrospectiveNet,
    data: Dataset,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantic and uncertainty embeddings (float32, CPU) and labels of a whole set."""
    was_training = model.training
    model.eval()
    sem, unc = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, _ in loader:
        with autocast(device, precision):
            s, u = model(images.to(device))
        sem.append(s.float().cpu())
        unc.append(u.float().cpu())
    model.train(was_training)
    return torch.cat(sem), torch.cat(unc), labels_of(data)


@torch.no_grad()
def mixup_uncertainty(
    model: IntrospectiveNet, data: Dataset, cfg: RunConfig, device: torch.device
) -> torch.Tensor:
    """``||u||^2`` of every image blended 50/50 with another image of the same batch.

    Deliberately ambiguous inputs: a useful uncertainty scores them above the clean images
    (see :func:`idml.evaluation.uncertainty.mixup_ambiguity_auroc`). Partners come from a generator
    seeded with ``cfg.seed``, so the check is reproducible.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    scores = []
    loader = DataLoader(data, batch_size=cfg.eval_batch_size, shuffle=False,
                        num_workers=cfg.num_workers)
    for images, _ in loader:
        images = images.to(device)
        partner = torch.randperm(len(images), generator=gen).to(device)
        with autocast(device, cfg.precision):
            _, u = model(0.5 * images + 0.5 * images[partner])
        scores.append(uncertainty_score(u).cpu())
    model.train(was_training)
    return torch.cat(scores)


def uncertainty_summary(
    semantic: torch.Tensor,
    uncertainty: torch.Tensor,
    labels: torch.Tensor,
    gallery: tuple[torch.Tensor, torch.Tensor] | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean ``||u||^2`` overall and on queries whose nearest neighbour is right / wrong.

    Leave-one-out within the set, or against ``gallery = (semantic, labels)`` when given;
    ``neighbours``: the queries' ``knn`` result, if already computed.
    """
    score = uncertainty_score(uncertainty)
    if gallery is None:
        correct = query_correct(semantic, labels, neighbours=neighbours)
    else:
        correct = query_correct(semantic, labels, gallery=gallery[0], gallery_labels=gallery[1],
                                neighbours=neighbours)
    correct = correct.to(score.device)
    nan = float("nan")
    return {
        "mean": score.mean().item(),
        "correct_mean": score[correct].mean().item() if correct.any() else nan,
        "wrong_mean": score[~correct].mean().item() if (~correct).any() else nan,
    }


def evaluate_model(
    model: IntrospectiveNet,
    splits: RetrievalSplits,
    cfg: RunConfig,
    device: torch.device,
    part: str = "test",
    ambiguity: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Retrieval metrics on the semantic embedding, and the uncertainty summary.

    ``part`` is ``test`` or ``val`` (leave-one-out); a data set with a query/gallery split
    (In-Shop) is evaluated query against gallery for ``test``. ``ambiguity`` adds the AUROC
    of telling mixup-blended query images from clean ones by ``||u||^2`` (one more pass).
    """
    def embed(data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, u, y = compute_embeddings(
            model, data, cfg.eval_batch_size, device, cfg.precision, cfg.num_workers
        )
        return s.to(device), u.to(device), y.to(device)  # exact kNN runs on the device

    if part not in ("test", "val"):
        raise ValueError(f"unknown split {part!r}; use 'test' or 'val'")
    if part == "val" and splits.val is None:
        raise ValueError("no validation split: set val_fraction > 0")
    data = splits.val if part == "val" else splits.test
    ks = tuple(cfg.eval_ks)
    if data is not None:
        s, u, y = embed(data)
        # One kNN pass serves the metrics, the uncertainty summary and the semantic gap.
        unit = F.normalize(s.float(), dim=1)
        nb = knn(unit, unit, min(max(2, evaluation_depth(y, ks)), len(y) - 1), exclude_self=True)
        metrics = retrieval_metrics(s, y, ks=ks, seed=cfg.seed, neighbours=nb)
        summary = uncertainty_summary(s, u, y, neighbours=nb)
        report = uncertainty_report(s, u, y, seed=cfg.seed, neighbours=nb)
        if ambiguity:
            mixed = mixup_uncertainty(model, data, cfg, device)
            summary["mixup_auroc"] = mixup_ambiguity_auroc(uncertainty_score(u).cpu(), mixed)
        return metrics, {**summary, "risk_coverage": report}
    if splits.query is None or splits.gallery is None:
        raise ValueError(f"the data set has no {part} split")
    s, u, y = embed(splits.query)
    gs, _, gy = embed(splits.gallery)
    depth = min(max(2, evaluation_depth(y, ks, gy)), len(gy))
    nb = knn(F.normalize(s.float(), dim=1), F.normalize(gs.float(), dim=1), depth,
             exclude_self=False)
    metrics = query_gallery_metrics(s, y, gs, gy, ks=ks, neighbours=nb)
    summary = uncertainty_summary(s, u, y, gallery=(gs, gy), neighbours=nb)
    report = uncertainty_report(s, u, y, seed=cfg.seed, gallery=gs, gallery_labels=gy,
                                neighbours=nb)
    if ambiguity:
        mixed = mixup_uncertainty(model, splits.query, cfg, device)
        summary["mixup_auroc"] = mixup_ambiguity_auroc(uncertainty_score(u).cpu(), mixed)
    return metrics, {**summary, "risk_coverage": report}


def build(
    cfg: RunConfig, device: torch.device, log: Callable[[str], None] = print
) -> tuple[IntrospectiveNet, RetrievalSplits]:
    """The model and the data splits (normalised for that model) a config describes."""
    model = model_from_config(cfg)
    spec = model.input_spec
    if cfg.dataset == "digits":
        splits = load_digits_splits(
            tuple(spec["mean"]), tuple(spec["std"]), cfg.val_fraction, cfg.rotation_classes
        )
    else:
        splits = load_image_splits(
            cfg.dataset,
            cfg.data_root,
            input_spec=spec,
            image_size=cfg.image_size,
            train_classes=cfg.train_classes,
            csv=cfg.csv,
            val_fraction=cfg.val_fraction,
            augment=cfg.augment,
            cache=cfg.cache_images,
            skip_bad_images=cfg.skip_bad_images,
            log=log,
        )
    return model.to(device), splits


def model_from_config(cfg: RunConfig) -> IntrospectiveNet:
    """The model a config describes (on the CPU, weights per ``cfg.pretrained``), without
    reading any data."""
    model = create_model(
        cfg.backbone,
        embedding_dim=cfg.embedding_dim,
        uncertainty_dim=cfg.uncertainty_dim,
        pretrained=cfg.pretrained,
        normalize_uncertainty=cfg.mode == "reference",
        freeze_bn=cfg.freeze_bn,
        in_chans=1 if cfg.dataset == "digits" else 3,
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_loss_for(cfg: RunConfig, num_classes: int) -> torch.nn.Module:
    """The loss a config names, called as ``loss(semantic, uncertainty, labels)``."""
    overrides: dict[str, Any] = {}
    if cfg.loss == "proxy_anchor":
        overrides = {"margin": cfg.margin, "scale": cfg.scale, "reference": cfg.mode == "reference"}
    elif (cfg.margin, cfg.scale) != (RunConfig.margin, RunConfig.scale):
        raise ValueError(
            f"margin/scale are Proxy-Anchor's; --loss {cfg.loss} uses its own defaults "
            "(see idml.method.losses), so leave --margin and --scale unset"
        )
    elif cfg.mode == "reference":
        raise ValueError(
            "mode=reference reproduces the release's Proxy-Anchor numerics; "
            f"use --loss proxy_anchor or --mode default with --loss {cfg.loss}"
        )
    return build_loss(
        cfg.loss,
        num_classes=num_classes,
        embedding_dim=cfg.embedding_dim,
        uncertainty_dim=cfg.uncertainty_dim or cfg.embedding_dim,
        metric=cfg.metric,  # type: ignore[arg-type]
        ism_a=cfg.ism_a,
        ism_b=cfg.ism_b,
        ism_beta=cfg.ism_beta,  # type: ignore[arg-type]
        **overrides,
    )


def make_optimizer(
    cfg: RunConfig,
    backbone_params: list[torch.nn.Parameter],
    head_params: list[torch.nn.Parameter],
    loss_fn: torch.nn.Module,
    device: torch.device,
) -> torch.optim.AdamW:
    """The recipe's AdamW: backbone, heads and the loss's other parameters at ``cfg.lr``, its
    proxies at ``cfg.lr * cfg.proxy_lr_mult``, weight decay ``cfg.weight_decay``."""
    proxies = list(loss_fn.proxy_parameters())
    proxy_ids = {id(p) for p in proxies}
    return torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": cfg.lr},
            {"params": head_params, "lr": cfg.lr},
            {"params": proxies, "lr": cfg.lr * cfg.proxy_lr_mult},
            {"params": [p for p in loss_fn.parameters() if id(p) not in proxy_ids], "lr": cfg.lr},
        ],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        # One fused kernel over all tensors instead of a Python loop over ~300 of them.
        fused=device.type in ("cpu", "cuda"),
    )


class RunLog:
    """Lines to the run's ``train.log`` and (unless quiet) to the console."""

    def __init__(self, path: Path, echo: bool = True) -> None:
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        with self.path.open("a") as fh:
            fh.write(message + "\n")
        if self.echo:
            tqdm.write(message)


def make_run_dir(cfg: RunConfig) -> Path:
    if cfg.out is not None:
        run_dir = Path(cfg.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{stamp}-{cfg.dataset}-{cfg.metric}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = run_dir.with_name(f"{stamp}-{cfg.dataset}-{cfg.metric}-{n}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder {run_dir} is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def format_metrics_table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per entry of ``columns``."""
    names = list(next(iter(columns.values())))
    head = f"{'metric':<12}" + "".join(f"{c:>10}" for c in columns)
    rows = [
        f"{n:<12}" + "".join(f"{100 * columns[c][n]:>10.2f}" for c in columns) for n in names
    ]
    return "\n".join([head, *rows])


@dataclass
class TrainResult:
    run_dir: Path
    initial: dict[str, float]
    final: dict[str, float]
    uncertainty: dict[str, float]


def _json_safe(value: Any) -> Any:
    """NaN (e.g. an undefined correlation) as JSON ``null`` instead of the invalid ``NaN``."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value


def _set_requires_grad(params: list[torch.nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _numpy_state_out(state: tuple) -> tuple:
    """A NumPy ``RandomState`` state with its key array as a tensor (``weights_only``-safe)."""
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss


def _numpy_state_in(state: tuple) -> tuple:
    """Inverse of :func:`_numpy_state_out`."""
    name, keys, pos, has_gauss, gauss = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


def _index_sampler(loader: DataLoader) -> Any:
    """The sampler that draws the (global) index order of a training loader."""
    return getattr(loader.batch_sampler, "sampler", loader.sampler)


def _rng_state(loader: DataLoader, generators: list[torch.Generator]) -> dict[str, Any]:
    """Every random state a run draws from, in types ``weights_only`` loading accepts."""
    sampler_rng = getattr(_index_sampler(loader), "rng", None)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_out(np.random.get_state()),  # noqa: NPY002 -- legacy state
        "python": random.getstate(),
        "loader": loader.generator.get_state() if loader.generator is not None else None,
        "generators": [g.get_state() for g in generators],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sampler_rng is not None:
        state["sampler"] = _numpy_state_out(sampler_rng.get_state())
    return state


def _set_rng_state(state: dict[str, Any], loader: DataLoader,
                   generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_in(state["numpy"]))  # noqa: NPY002 -- legacy state
    random.setstate(state["python"])
    if state["loader"] is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])
    for gen, gen_state in zip(generators, state["generators"], strict=True):
        gen.set_state(gen_state)
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "sampler" in state:
        _index_sampler(loader).rng.set_state(_numpy_state_in(state["sampler"]))


def resume_config(run_dir: str | Path) -> RunConfig:
    """The resolved config of an interrupted run (its ``config.yaml``)."""
    from idml.core.config import config_from_dict

    path = Path(run_dir) / "config.yaml"
    if not (Path(run_dir) / RESUME_FILE).is_file():
        raise ValueError(f"--resume {run_dir}: no {RESUME_FILE} there (nothing to resume; a run "
                         "writes it at the end of every epoch and removes it when it finishes)")
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--resume {run_dir}: cannot read {path}: {exc}") from exc
    return config_from_dict(values, source=str(path))


#: Written atomically at the end of every epoch; ``--resume`` continues from it.
RESUME_FILE = "last.pt"


def _quiet(message: str) -> None:
    """The log of processes other than 0."""


def _new_run_dir(cfg: RunConfig) -> Path:
    run_dir = make_run_dir(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(as_dict(cfg), sort_keys=False))
    return run_dir


def _process_seeds(cfg: RunConfig, rank: int, salt: int = 0) -> tuple[int, int]:
    """Seeds of the global RNGs and of the augmentation generator of process ``rank``.

    Process 0 keeps the single-process seeds (``cfg.seed``, ``cfg.seed + 2``); the others get
    their own, far apart, so their random augmentations differ.
    """
    if rank == 0 and salt == 0:
        return cfg.seed, cfg.seed + 2
    return cfg.seed + 1_000_003 * rank + salt, cfg.seed + 2 + 1_000_033 * rank + salt


def _restore_rng(
    saved: dict[str, Any],
    ctx: Distributed,
    cfg: RunConfig,
    loader: DataLoader,
    generators: list[torch.Generator],
    log: Callable[[str], None],
) -> None:
    """Every random state of a saved run; per-process ones where it had as many processes."""
    saved_world = saved.get("world_size", 1)
    if ctx.enabled and saved_world == ctx.world_size:
        _set_rng_state(saved["rank_rng"][ctx.rank], loader, generators)
        return
    # The sampler, loader and mixup states are the same on every process: take process 0's.
    _set_rng_state(saved["rng"], loader, generators)
    if saved_world != ctx.world_size:
        log(f"resuming with {ctx.world_size} process(es) a run saved with {saved_world}: the "
            "same global batches follow; per-process augmentation streams restart")
        if ctx.rank > 0:
            seed, aug_seed = _process_seeds(cfg, ctx.rank, salt=7919 * saved["epoch"])
            seed_everything(seed)
            generators[1].manual_seed(aug_seed)


def train(cfg: RunConfig, resume: str | Path | None = None) -> TrainResult:
    """Train, evaluate before and after, and write the run folder. Returns the metrics.

    ``resume``: the folder of an interrupted run (killed at any point); training continues
    from its last completed epoch with every random state restored, so on the CPU the result
    equals that of an uninterrupted run.

    Under ``torchrun`` (or in an initialised process group) the processes train one model
    data-parallel (see :mod:`idml.training.distributed`): ``cfg.batch_size`` is the global batch,
    process 0 alone evaluates, logs and writes the run folder, and every process returns
    the same result.
    """
    cfg.validate()
    ctx = Distributed.from_env()
    device = ctx.select_device(cfg.device) if ctx.enabled else select_device(cfg.device)
    build_loss_for(cfg, num_classes=2)  # a bad loss/metric/mode fails before any work
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is the global batch and must be "
                         f"divisible by the number of processes ({ctx.world_size})")
    with process_group(ctx, device):
        return _train(cfg, resume, ctx, device)


def _train(
    cfg: RunConfig, resume: str | Path | None, ctx: Distributed, device: torch.device
) -> TrainResult:
    seed_everything(cfg.seed)
    if resume is not None:
        from idml.core.checkpoint import load_checkpoint

        run_dir = Path(resume)
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
        saved = load_checkpoint(run_dir / RESUME_FILE, map_location="cpu")
        log: Callable[[str], None] = RunLog(run_dir / "train.log") if ctx.is_main else _quiet
        model, splits = ctx.main_first(lambda: build(cfg, device, log))
    else:
        saved = None
        run_dir = ctx.on_main(lambda: _new_run_dir(cfg))
        log = RunLog(run_dir / "train.log") if ctx.is_main else _quiet
        try:  # process 0 first: it downloads weights and fills the image cache once
            model, splits = ctx.main_first(lambda: build(cfg, device, log))
        except BaseException:
            # Nothing was trained: leave no half-made run folder that blocks the same --out.
            if ctx.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    if ctx.rank > 0:
        seed_everything(_process_seeds(cfg, ctx.rank)[0])
    loss_fn = build_loss_for(cfg, splits.num_train_classes).to(device)
    sizes = ", ".join(f"{len(d)} {name}" for name, d in (
        ("test", splits.test), ("val", splits.val), ("query", splits.query),
        ("gallery", splits.gallery)) if d is not None)
    procs = ""
    if ctx.enabled:
        procs = (f" | {ctx.world_size} processes ({dist.get_backend()}), "
                 f"{cfg.batch_size // ctx.world_size} images of each batch per process")
        if device.type == "cuda" and not cfg.freeze_bn:  # one set of batch statistics
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ctx.broadcast_state(model, loss_fn)  # identical start, whatever each process drew
    log(f"run folder {run_dir} | device {device} | {len(splits.train)} train images in "
        f"{splits.num_train_classes} classes; {sizes} images{procs}")

    backbone_params = model.backbone_parameters()
    optimizer = make_optimizer(cfg, backbone_params, model.new_parameters(), loss_fn, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, gamma=cfg.lr_gamma)
    # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    # The same mixup draws on every process (one lam per step); own augmentations.
    mixup_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(_process_seeds(cfg, ctx.rank)[1])
    loader = make_train_loader(
        splits.train,
        labels_of(splits.train).tolist(),
        min(cfg.batch_size, len(splits.train)),
        cfg.m_per_class,
        cfg.seed,
        cfg.num_workers,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )

    generators = [mixup_gen, aug_gen]
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if saved is None:
        initial = ctx.on_main(lambda: evaluate_model(model, splits, cfg, device)[0])
    else:
        model.load_state_dict(saved["model"])
        loss_fn.load_state_dict(saved["loss"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        _restore_rng(saved, ctx, cfg, loader, generators, log)
        initial, history, start_epoch = saved["initial"], saved["history"], saved["epoch"]
        if saved["best"] is not None:
            best = (saved["best"]["score"], saved["best"]["state"])
        log(f"resumed {run_dir} after epoch {start_epoch}/{cfg.epochs}")
    for epoch in range(start_epoch, cfg.epochs):
        warm = epoch < cfg.warmup_epochs
        _set_requires_grad(backbone_params, not warm)  # warm-up: heads + proxies only
        model.train()
        total, seen, start = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and ctx.is_main), leave=False)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if cfg.augment and splits.in_memory:  # image data sets augment per image
                images = random_affine(images, aug_gen)
            # Each process embeds its shard; the loss sees the gathered global batch.
            all_labels = ctx.gather_labels(labels)
            with autocast(device, cfg.precision):
                if cfg.mixup:
                    # Partners are drawn within each process's shard (the same lam and
                    # permutation on every process).
                    mixed, perm, lam = mixup_batch(images, mixup_gen)
                    # One forward for clean + mixed images: half the kernel launches. With
                    # frozen BN this equals two forwards; with trainable BN (the digits CNN)
                    # the batch statistics cover both halves.
                    s, u = model(torch.cat([images, mixed]))
                    n = len(images)
                    loss = mixup_loss(
                        loss_fn,
                        (ctx.gather(s[:n]), ctx.gather(u[:n])),
                        (ctx.gather(s[n:]), ctx.gather(u[n:])),
                        all_labels,
                        ctx.gather_indices(perm),
                        lam,
                    )
                else:
                    s, u = model(images)
                    loss = loss_fn(ctx.gather(s), ctx.gather(u), all_labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            ctx.average_gradients(params)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach() * len(all_labels)
            seen += len(all_labels)
            if cfg.progress and ctx.is_main:
                bar.set_postfix(loss=f"{float(total) / seen:.4f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        scheduler.step()
        ctx.broadcast_buffers(model, loss_fn)  # trainable BN on CPU: process 0's statistics
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(total) / max(seen, 1),
            "images_per_s": seen / (time.perf_counter() - start),
            "warmup": warm,
        }
        # Every process's random state (process 0 takes its own again after evaluating).
        rng = ctx.all_objects(_rng_state(loader, generators))

        def end_epoch(epoch: int = epoch, record: dict[str, Any] = record,
                      rng: list[dict[str, Any]] = rng, warm: bool = warm) -> None:
            nonlocal best
            if splits.val is not None:
                val_metrics, _ = evaluate_model(model, splits, cfg, device, part="val")
                record["val"] = val_metrics
                if best is None or val_metrics["recall@1"] > best[0]:
                    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = (val_metrics["recall@1"], snapshot)
            history.append(record)
            extra = (f" | val recall@1 {100 * record['val']['recall@1']:.2f}"
                     if "val" in record else "")
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} "
                f"{record['images_per_s']:.0f} img/s{' (warm-up)' if warm else ''}{extra}")
            rng[0] = _rng_state(loader, generators)  # after the evaluation, which draws too
            state: dict[str, Any] = {
                "config": as_dict(cfg), "epoch": epoch + 1, "model": model.state_dict(),
                "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng[0], "initial": initial, "history": history,
                "best": None if best is None else {"score": best[0], "state": best[1]},
            }
            if ctx.enabled:  # every process's own random state, for an exact resume
                state.update(world_size=ctx.world_size, rank_rng=rng)
            save_checkpoint(run_dir / RESUME_FILE, state)

        ctx.on_main(end_epoch)

    if ctx.enabled:
        diff = ctx.max_parameter_difference([*model.parameters(), *loss_fn.parameters()])
        log(f"parameters and proxies on the {ctx.world_size} processes: "
            + ("identical" if diff == 0 else f"differ by up to {diff:.3g}"))

    def finish() -> tuple[dict[str, float], dict[str, Any]]:
        if best is not None:  # chosen on the validation classes, never on the test classes
            model.load_state_dict(best[1])
        final, unc = evaluate_model(model, splits, cfg, device, ambiguity=True)
        save_checkpoint(
            run_dir / "checkpoint.pt",
            {
                "config": as_dict(cfg),
                "model": model.state_dict(),
                "loss": loss_fn.state_dict(),
                "metrics": {"final": final},
            },
        )
        (run_dir / "metrics.json").write_text(json.dumps(
            _json_safe({"initial": initial, "final": final, "uncertainty": unc}), indent=2
        ))
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))
        (run_dir / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
        log(format_metrics_table({"initial": initial, "final": final}))
        log(f"uncertainty ||u||^2 on test: mean {unc['mean']:.4g}; queries whose nearest "
            f"neighbour is right {unc['correct_mean']:.4g}, wrong {unc['wrong_mean']:.4g}")
        log("queries ranked by confidence (risk = 1 - recall@1; lower AURC is better):\n"
            + format_uncertainty_table(unc["risk_coverage"]))
        log(f"mixup ambiguity check: AUROC {unc['mixup_auroc']:.3f} of telling 50/50-blended "
            "test images from clean ones by ||u||^2 (0.5 = chance)")
        return final, unc

    final, unc = ctx.on_main(finish)
    return TrainResult(run_dir, initial, final, unc)


def evaluate_checkpoint(
    path: str | Path, device: str = "auto"
) -> tuple[dict[str, float], dict[str, float] | None, dict[str, Any]]:
    """Rebuild the model of a checkpoint and recompute its test metrics.

    Returns ``(metrics, recorded, uncertainty)``: ``recorded`` are the final metrics saved
    at training time (``None`` if absent); ``uncertainty`` holds the risk-coverage report
    and the mixup ambiguity AUROC.
    """
    from idml.core.checkpoint import load_checkpoint
    from idml.core.config import config_from_dict

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(dict(ckpt["config"]), source=str(path))
    dev = select_device(device)
    # Every weight comes from the checkpoint: never fetch the original pretrained weights.
    model, splits = build(dataclasses.replace(cfg, pretrained="none"), dev)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path}: weights do not fit the configured model: {exc}") \
            from exc
    metrics, unc = evaluate_model(model, splits, cfg, dev, ambiguity=True)
    return metrics, ckpt.get("metrics", {}).get("final"), unc
