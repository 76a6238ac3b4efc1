"""The run folder: what ``idml train`` writes where, and how a new one is made."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from idml.core.config import RunConfig, as_dict
from idml.core.errors import IdmlError
from idml.core.io import atomic_write_text

CONFIG_FILE = "config.yaml"  #: the resolved config
LOG_FILE = "train.log"  #: what the run printed
CHECKPOINT_FILE = "checkpoint.pt"  #: the trained model (and its final metrics)
RESUME_FILE = "last.pt"  #: everything to resume; written each epoch, removed at the end
METRICS_FILE = "metrics.json"  #: {"initial", "final", "uncertainty"}
HISTORY_FILE = "history.json"  #: loss and speed per epoch
TRACKERS_FILE = "trackers.json"  #: the tracker runs and the last epoch logged to them
#: Everything ``idml train`` writes into a run folder: never the output of another command.
RUN_FILES = (CONFIG_FILE, LOG_FILE, CHECKPOINT_FILE, RESUME_FILE, METRICS_FILE, HISTORY_FILE,
             TRACKERS_FILE)
#: What a finished run folder holds (the report needs all of them).
FINISHED_FILES = (CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, HISTORY_FILE)


class RunLog:
    """Lines to the run's ``train.log`` and (unless quiet) to the console."""

    def __init__(self, path: Path, echo: bool = True) -> None:
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        with self.path.open("a") as fh:
            fh.write(message + "\n")
        if self.echo:
            tqdm.write(message)


def quiet(message: str) -> None:
    """The log of processes other than 0 (and of runs without a run folder): nothing."""


def new_run_dir(cfg: RunConfig) -> Path:
    """Create the run folder of ``cfg`` (``cfg.out``, else ``runs/<time>-<dataset>-<metric>``)
    and write its ``config.yaml``; an existing non-empty folder is refused."""
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
        raise FileExistsError(f"run folder {run_dir} is not empty; choose another out folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # the claim: of two runs racing for one folder, one creates config.yaml first
        (run_dir / CONFIG_FILE).open("x").close()
    except FileExistsError:
        raise FileExistsError(f"run folder {run_dir} was just taken by another run; choose "
                              "another out folder") from None
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(as_dict(cfg), sort_keys=False))
    return run_dir


def check_finished(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path if it holds a finished run; else an :class:`IdmlError` saying
    what is missing (and that an unfinished run can be resumed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IdmlError(f"{run_dir} is not a run folder: no such folder")
    missing = [name for name in FINISHED_FILES if not (run_dir / name).is_file()]
    if missing:
        hint = " (the run has not finished: resume it)" if (run_dir / RESUME_FILE).is_file() \
            else ""
        raise IdmlError(
            f"{run_dir} is not a finished run folder: missing {', '.join(missing)}{hint}"
        )
    return run_dir
