"""Experiment trackers (TensorBoard, MLflow, W&B offline) behind one small contract.

The training loop talks to :class:`Trackers` only: :meth:`Trackers.log_epoch` after each
epoch's resume state is saved and :meth:`Trackers.finish` at the end. Each backend is a
:class:`Tracker` (start a run with the resolved config as parameters and tags, log scalars at
a step, attach files, end the run), imported only when asked for; a missing package is a
:class:`~idml.core.errors.ConfigError` naming the extra to install, and a backend that fails
later warns once and is dropped while training goes on.

Exactly once per step, also across ``--resume``: per-step values live in the epoch's history
record (saved in ``last.pt``), are logged only after that record is saved, and
``trackers.json`` in the run folder remembers the tracker runs and the last epoch logged.
A resumed run reopens the same tracker runs and logs the epochs it has not logged yet; the
step numbers and timestamps come from the record, so a repeat writes the same points (MLflow
keeps one of identical points, TensorBoard purges from the first step it is given again).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import idml
from idml.core.config import RunConfig, as_dict
from idml.core.errors import ConfigError
from idml.core.io import atomic_write_text
from idml.core.rundir import TRACKERS_FILE

#: The package each backend needs, and the idml extra that installs it.
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
#: Where MLflow records runs when neither ``MLFLOW_TRACKING_URI`` nor ``mlflow_uri`` is set.
DEFAULT_MLFLOW_DB = Path.home() / ".idml" / "mlflow.db"


def metric_name(name: str) -> str:
    """A metric name every backend accepts: ``recall@1`` -> ``recall_at_1``, ``map@r`` ->
    ``map_at_r``, ``recall@1@50%`` -> ``recall_at_1_at_50pct``; ``/`` separates sections."""
    name = name.replace("@", "_at_").replace("%", "pct")
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def flat_scalars(tree: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a nested dict as ``prefix/a/b`` scalars under :func:`metric_name`."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}/{metric_name(str(key))}"
        if isinstance(value, Mapping):
            out.update(flat_scalars(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@dataclass
class RunInfo:
    """What a tracker run is started with."""

    run_dir: Path
    name: str  #: the run folder's name
    experiment: str  #: one per data set: ``idml-<dataset>``
    params: dict[str, str]  #: the resolved config, flattened
    tags: dict[str, str]  #: idml version, git commit (when known), data set, design
    resume: dict[str, Any] = field(default_factory=dict)  #: this backend's saved state


class Tracker(ABC):
    """One backend. Every call may raise: :class:`Trackers` isolates failures."""

    name = ""

    @abstractmethod
    def start(self, run: RunInfo) -> dict[str, Any]:
        """Start (or, with ``run.resume``, continue) the run; returns state to save."""

    @abstractmethod
    def log_scalars(self, values: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        """Scalars at one step."""

    def log_artifact(self, path: Path) -> None:  # noqa: B027 - optional for a backend
        """Attach a file of the run folder (backends without artifacts ignore it)."""

    def flush(self) -> None:  # noqa: B027 - optional for a backend
        """Make what was logged durable (called once per epoch)."""

    @abstractmethod
    def end(self, status: str) -> None:
        """End the run: ``FINISHED`` or ``FAILED``."""


class TensorBoardTracker(Tracker):
    """Event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs``)."""

    name = "tensorboard"

    def start(self, run: RunInfo) -> dict[str, Any]:
        self.run_dir, self.params, self.writer = run.run_dir, run.params, None
        return {}

    def _open(self, first_step: int) -> Any:
        # Opened at the first step logged, purging what an interrupted run wrote from there.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=first_step)
        if first_step <= 1:
            text = "\n".join(f"    {k}: {v}" for k, v in sorted(self.params.items()))
            self.writer.add_text("config", text, 0)
        return self.writer

    def log_scalars(self, values: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        writer = self.writer or self._open(step)
        for key, value in values.items():
            writer.add_scalar(key, value, step, walltime=timestamp_ms / 1000)

    def flush(self) -> None:
        if self.writer is not None:  # a kill -9 must not lose an epoch trackers.json counts
            self.writer.flush()

    def end(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker(Tracker):
    """Runs in an MLflow store (``MLFLOW_TRACKING_URI``, else the config's ``mlflow_uri``,
    else SQLite at :data:`DEFAULT_MLFLOW_DB`), one experiment per data set."""

    name = "mlflow"

    def __init__(self, uri: str | None) -> None:
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or uri or \
            f"sqlite:///{DEFAULT_MLFLOW_DB}"

    def start(self, run: RunInfo) -> dict[str, Any]:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client, self.pending = MlflowClient(tracking_uri=self.uri), []
        if run.resume.get("run_id"):
            self.run_id = run.resume["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return {"run_id": self.run_id, "uri": self.uri}
        experiment = self.client.get_experiment_by_name(run.experiment)
        exp_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(run.experiment, artifact_location=self._artifacts())
        self.run_id = self.client.create_run(exp_id, run_name=run.name,
                                             tags=run.tags).info.run_id
        params = [Param(k, v[:6000]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("idml.run_dir", str(run.run_dir))])
        return {"run_id": self.run_id, "uri": self.uri}

    def _artifacts(self) -> str | None:
        """Beside a SQLite store (MLflow's own default is ./mlruns of the working folder)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts") \
                .resolve().as_uri()
        return None

    def log_scalars(self, values: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        # held until flush: one database transaction per epoch instead of one per step
        self.pending += [Metric(k, v, timestamp_ms, step) for k, v in values.items()]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=pending[i:i + 1000])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


class WandbTracker(Tracker):
    """Weights & Biases in offline mode: files under ``RUN_DIR/wandb`` (``wandb sync``)."""

    name = "wandb"

    def start(self, run: RunInfo) -> dict[str, Any]:
        import wandb

        run_id = run.resume.get("id") or secrets.token_hex(8)
        self.run = wandb.init(mode="offline", dir=str(run.run_dir), project=run.experiment,
                              name=run.name, id=run_id, resume="allow", config=run.params,
                              tags=[f"{k}={v}" for k, v in run.tags.items()][:20],
                              settings=wandb.Settings(console="off", silent=True))
        return {"id": run_id}

    def log_scalars(self, values: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        self.run.log(dict(values), step=step)

    def log_artifact(self, path: Path) -> None:
        # a copy in the run's files folder is what an offline run syncs (save() symlinks)
        shutil.copy2(path, Path(self.run.dir) / path.name)

    def end(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def _backend(name: str, cfg: RunConfig) -> Tracker:
    try:
        __import__(PACKAGES[name])
    except ImportError as exc:
        raise ConfigError(f"log={name!r} needs the {PACKAGES[name]} package: "
                          f"pip install 'idml[{name}]'") from exc
    if name == "tensorboard":
        return TensorBoardTracker()
    if name == "mlflow":
        return MLflowTracker(cfg.mlflow_uri)
    return WandbTracker()


def _git_commit() -> str | None:
    """The commit of the idml checkout imported, when it is one (else None)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(idml.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_info(cfg: RunConfig, run_dir: Path) -> RunInfo:
    """The run's name, experiment, parameters (the resolved config) and tags."""
    params = {k: json.dumps(v) if isinstance(v, list | dict) else str(v)
              for k, v in as_dict(cfg).items()}
    tags = {"idml.version": idml.__version__, "dataset": cfg.dataset, "design": cfg.design,
            "metric": cfg.metric, "loss": cfg.loss}
    commit = _git_commit()
    if commit:
        tags["idml.git_commit"] = commit
    return RunInfo(run_dir, run_dir.name, f"idml-{cfg.dataset}", params, tags)


class Trackers:
    """The trackers of one run (process 0), each isolated: a failure warns and drops it."""

    def __init__(self, trackers: list[Tracker], run_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.trackers, self.run_dir, self.log = trackers, run_dir, log
        self.state: dict[str, Any] = {"logged_epochs": 0}

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _drop(self, tracker: Tracker, method: str, exc: Exception) -> None:
        message = (f"tracker {tracker.name} failed in {method} ({type(exc).__name__}: "
                   f"{exc}); training goes on without it")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        if self.log is not None:
            self.log(message)
        self.trackers.remove(tracker)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker never stops training
                self._drop(tracker, method, exc)

    def start(self, info: RunInfo) -> None:
        """Start every tracker (continuing the runs ``trackers.json`` names, if any)."""
        saved = self._read_state()
        self.state["logged_epochs"] = saved.get("logged_epochs", 0)
        for tracker in list(self.trackers):
            info.resume = saved.get(tracker.name, {})
            try:
                self.state[tracker.name] = tracker.start(info)
            except Exception as exc:
                self._drop(tracker, "start", exc)
        self._save_state()

    def log_epochs(self, history: list[dict[str, Any]]) -> None:
        """Log every epoch record of ``history`` not logged yet (see the module doc)."""
        if not self.trackers:
            return
        for record in history[self.state["logged_epochs"]:]:
            for step, values in epoch_scalars(record):
                self._each("log_scalars", values, step, record["time_ms"])
            self._each("flush")
            self.state["logged_epochs"] = record["epoch"]
            self._save_state()

    def finish(self, scalars: dict[str, float], step: int, files: list[Path]) -> None:
        """The final test metrics at ``step``, the run folder's files, and the end."""
        self._each("log_scalars", scalars, step, int(time.time() * 1000))
        for path in files:
            if path.is_file():
                self._each("log_artifact", path)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        self._each("end", status)
        self.trackers = []

    def _read_state(self) -> dict[str, Any]:
        path = None if self.run_dir is None else self.run_dir / TRACKERS_FILE
        if path is None or not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        return state if isinstance(state, dict) else {}

    def _save_state(self) -> None:
        if self.run_dir is not None and self.trackers:
            atomic_write_text(self.run_dir / TRACKERS_FILE, json.dumps(self.state, indent=2))


def epoch_scalars(record: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """An epoch's history record as ``(step, scalars)``: per step the loss, the images per
    second and the learning rates; at its last step the epoch's averages and its validation
    metrics."""
    first, losses = record["first_step"], record["step_loss"]
    rates = record.get("step_images_per_s") or [None] * len(losses)
    lrs = {f"train/lr/{k}": v for k, v in record["lr"].items()}
    out = [(first + i, {"train/loss": loss, **lrs,
                        **({} if rate is None else {"train/images_per_s": rate})})
           for i, (loss, rate) in enumerate(zip(losses, rates, strict=True))]
    last = first + len(losses) - 1
    epoch = {"epoch/loss": record["loss"], "epoch/images_per_s": record["images_per_s"],
             "epoch/epoch": float(record["epoch"])}
    if "val" in record:
        epoch.update(flat_scalars(record["val"], "val"))
    if out:
        out[-1][1].update(epoch)
    else:
        out.append((last, epoch))
    return out


def open_trackers(cfg: RunConfig, run_dir: Path,
                  log: Callable[[str], None] | None = None) -> Trackers:
    """The trackers ``cfg.log`` names, started for ``run_dir`` (none: an empty, inert set)."""
    trackers = Trackers([_backend(name, cfg) for name in cfg.log], run_dir, log)
    if trackers:
        trackers.start(run_info(cfg, run_dir))
    return trackers
