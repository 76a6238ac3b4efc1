"""``train(cfg)``: a whole run, from a config to a finished run folder, for one process or
under ``torchrun``. The steps themselves are :class:`~idml.training.trainer.Trainer`'s."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from idml.core.checkpoint import load_checkpoint
from idml.core.config import RunConfig, as_dict, config_from_dict, read_yaml
from idml.core.errors import ConfigError
from idml.core.rundir import CONFIG_FILE, LOG_FILE, RESUME_FILE, RunLog, new_run_dir, quiet
from idml.core.runtime import seed_everything, select_device
from idml.data.splits import RetrievalSplits
from idml.evaluation.evaluator import evaluate_model
from idml.method.model import IntrospectiveNet
from idml.training.distributed import Distributed, process_group
from idml.training.factories import build, build_loss_for, check_config
from idml.training.state import ResumeState, process_seeds
from idml.training.tracking import Trackers, open_trackers
from idml.training.trainer import Trainer


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder and its metrics."""

    run_dir: Path
    initial: dict[str, float]
    final: dict[str, float]
    uncertainty: dict[str, Any]


def train(cfg: RunConfig, resume: str | Path | None = None) -> TrainResult:
    """Train, evaluate before and after, and write the run folder. Returns the metrics.

    ``resume``: the folder of an interrupted run (killed at any point); training continues
    from its last completed epoch with every random state restored, so on the CPU the result
    equals that of an uninterrupted run.

    Under ``torchrun`` (or in an initialised process group) the processes train one model
    data-parallel (see :mod:`idml.training.distributed`): ``cfg.batch_size`` is the global
    batch, process 0 alone evaluates, logs and writes the run folder, and every process
    returns the same result.
    """
    check_config(cfg)
    ctx = Distributed.from_env()
    device = ctx.select_device(cfg.device) if ctx.enabled else select_device(cfg.device)
    if cfg.batch_size % ctx.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch and must be "
                          f"divisible by the number of processes ({ctx.world_size})")
    with process_group(ctx, device):
        return _train(cfg, resume, ctx, device)


def _train(
    cfg: RunConfig, resume: str | Path | None, ctx: Distributed, device: torch.device
) -> TrainResult:
    seed_everything(cfg.seed)
    run_dir, saved, log, (model, splits) = _prepare(cfg, resume, ctx, device)
    if ctx.rank > 0:
        seed_everything(process_seeds(cfg, ctx.rank)[0])
    loss_fn = build_loss_for(cfg, splits.num_train_classes).to(device)
    if ctx.enabled:
        if device.type == "cuda" and not cfg.freeze_bn:  # one set of batch statistics
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ctx.broadcast_state(model, loss_fn)  # identical start, whatever each process drew
    log(_describe(cfg, ctx, device, run_dir, splits))
    # process 0 alone logs to trackers; a resumed run continues the same tracker runs
    trackers = open_trackers(cfg, run_dir, log) if ctx.is_main else Trackers([])
    trainer = Trainer(cfg, model, loss_fn, splits, device, ctx=ctx, run_dir=run_dir, log=log,
                      trackers=trackers)
    try:
        if saved is None:
            trainer.initial = ctx.on_main(lambda: evaluate_model(model, splits, cfg, device)[0])
        else:
            trainer.restore(saved)
            log(f"resumed {run_dir} after epoch {trainer.epoch}/{cfg.epochs}")
        while trainer.epoch < cfg.epochs:
            trainer.end_epoch(trainer.run_epoch())
        final, unc = trainer.finish()
    except BaseException as exc:
        trackers.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return TrainResult(run_dir, trainer.initial, final, unc)


def _prepare(
    cfg: RunConfig, resume: str | Path | None, ctx: Distributed, device: torch.device
) -> tuple[Path, ResumeState | None, Callable[[str], None],
           tuple[IntrospectiveNet, RetrievalSplits]]:
    """The run folder (new, or the one resumed), its saved state, the log, model and data.

    Process 0 builds first: it downloads weights and fills the image cache once. A new run
    folder whose build fails is removed, so it does not block the same ``out`` next time.
    """
    if resume is not None:
        run_dir = Path(resume)
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
        saved = ResumeState.from_payload(load_checkpoint(run_dir / RESUME_FILE,
                                                         map_location="cpu"))
        check_resumable(cfg, saved, run_dir)
        log = RunLog(run_dir / LOG_FILE) if ctx.is_main else quiet
        return run_dir, saved, log, ctx.main_first(lambda: build(cfg, device, log))
    run_dir = ctx.on_main(lambda: new_run_dir(cfg))
    log = RunLog(run_dir / LOG_FILE) if ctx.is_main else quiet
    try:
        return run_dir, None, log, ctx.main_first(lambda: build(cfg, device, log))
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _describe(cfg: RunConfig, ctx: Distributed, device: torch.device, run_dir: Path,
              splits: RetrievalSplits) -> str:
    """The first line of a run's log: folder, device, split sizes, processes."""
    sizes = ", ".join(f"{len(d)} {name}" for name, d in (
        ("test", splits.test), ("val", splits.val), ("query", splits.query),
        ("gallery", splits.gallery)) if d is not None)
    procs = ""
    if ctx.enabled:
        procs = (f" | {ctx.world_size} processes ({dist.get_backend()}), "
                 f"{cfg.batch_size // ctx.world_size} images of each batch per process")
    return (f"run folder {run_dir} | device {device} | {len(splits.train)} train images in "
            f"{splits.num_train_classes} classes; {sizes} images{procs}")


#: Fields a resumed run may change: where and how it runs, not what it trains.
RESUME_MAY_DIFFER = ("device", "num_workers", "progress", "log", "mlflow_uri",
                     "eval_batch_size", "out")


def check_resumable(cfg: RunConfig, saved: ResumeState, run_dir: Path) -> None:
    """Refuse a ``config.yaml`` edited since the run started in a field that shapes the
    model, the data or the training, naming each such field."""
    before = as_dict(config_from_dict(saved.config, source=str(run_dir / RESUME_FILE)))
    changed = [f"{k} ({before[k]!r} -> {v!r})" for k, v in as_dict(cfg).items()
               if k not in RESUME_MAY_DIFFER and before.get(k) != v]
    if changed:
        raise ConfigError(f"resume={str(run_dir)!r}: {run_dir / CONFIG_FILE} differs from the "
                          f"config the run was started with in {', '.join(changed)}; undo the "
                          f"edit, or start a new run (only {', '.join(RESUME_MAY_DIFFER)} may "
                          "change)")


def resume_config(run_dir: str | Path) -> RunConfig:
    """The resolved config of an interrupted run (its ``config.yaml``)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not (run_dir / RESUME_FILE).is_file():
        raise ConfigError(f"resume={str(run_dir)!r}: no {RESUME_FILE} there (nothing to resume; "
                          "a run writes it at the end of every epoch and removes it when it "
                          "finishes)")
    values = read_yaml(path)
    if not isinstance(values, dict):
        raise ConfigError(f"resume={str(run_dir)!r}: {path} does not hold a config mapping")
    return config_from_dict(values, source=str(path))
