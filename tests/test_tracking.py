"""Experiment trackers: read back with the backends' own readers (TensorBoard's event reader,
MLflow's client on a SQLite store), failure isolation, and no duplicated step after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from idml import cli
from idml.core.checkpoint import load_checkpoint
from idml.training import tracking
from idml.training.tracking import metric_name

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

ARGS = ["train", "--epochs", "2", "--no-progress", "--device", "cpu"]


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("idml-digits")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


def _step_losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "history.json").read_text())
    return [loss for h in history for loss in h["step_loss"]]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (./mlruns)
    return uri


def test_metric_names_every_backend_accepts() -> None:
    assert metric_name("recall@1") == "recall_at_1"
    assert metric_name("map@r") == "map_at_r"
    assert metric_name("recall@1@50%") == "recall_at_1_at_50pct"
    assert metric_name("a b:c") == "a_b_c"
    assert tracking.flat_scalars({"x@2": 1, "n": {"aurc": 0.5}, "s": "text", "b": True},
                                 "test") == {"test/x_at_2": 1.0, "test/n/aurc": 0.5}


def test_tensorboard_and_mlflow_read_back(tmp_path: Path, store: str) -> None:
    run = tmp_path / "run"
    assert cli.main([*ARGS, "--log", "tensorboard,mlflow", "--out", str(run)]) == 0
    losses = _step_losses(run)
    steps = list(range(1, len(losses) + 1))
    # TensorBoard: the loss and the learning rates at every step, nothing else in between
    loss = _scalars(run, "train/loss")
    assert [s for s, _ in loss] == steps
    assert [v for _, v in loss] == pytest.approx(losses, rel=1e-6)
    assert [s for s, _ in _scalars(run, "train/lr/backbone")] == steps
    assert [s for s, _ in _scalars(run, "train/images_per_s")] == steps
    # MLflow: one run named after the folder, the resolved config as parameters,
    # the final metrics equal to metrics.json under the name mapping, logged once at the end
    client, found = _mlflow_run(store, run.name)
    assert found.info.status == "FINISHED"
    config = yaml.safe_load((run / "config.yaml").read_text())
    want = {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in config.items()}
    assert found.data.params == want
    assert found.data.tags["design"] == config["design"]
    metrics = json.loads((run / "metrics.json").read_text())
    for key, value in metrics["final"].items():
        name = "test/" + metric_name(key)
        assert found.data.metrics[name] == pytest.approx(value, rel=1e-12), name
        assert [m.step for m in client.get_metric_history(found.info.run_id, name)] == \
            [steps[-1]]
    aurc = metrics["uncertainty"]["risk_coverage"]["uncertainty"]["aurc"]
    assert found.data.metrics["test/uncertainty/risk_coverage/uncertainty/aurc"] == \
        pytest.approx(aurc)
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == steps
    artifacts = {f.path for f in client.list_artifacts(found.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.json", "train.log"} <= artifacts
    assert not (tmp_path / "mlruns").exists()


def test_a_missing_backend_names_its_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    assert cli.main([*ARGS, "--log", "mlflow", "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'idml[mlflow]'" in capsys.readouterr().err
    assert cli.main([*ARGS, "--log", "tensorbord", "--out", str(tmp_path / "r2")]) == 2
    assert "tensorboard, mlflow, wandb" in capsys.readouterr().err


def test_a_failing_tracker_warns_and_training_goes_on(tmp_path: Path, store: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_scalars", broken)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="tracker tensorboard failed in log_scalars"):
        assert cli.main([*ARGS, "--log", "tensorboard,mlflow", "--out", str(run)]) == 0
    assert (run / "metrics.json").is_file()
    assert "training goes on without it" in (run / "train.log").read_text()
    client, found = _mlflow_run(store, run.name)  # the other tracker carried on
    assert found.info.status == "FINISHED"


def _train_process(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "idml.cli", *argv],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_and_resume_continue_the_tracker_runs_without_duplicates(
        tmp_path: Path, store: str) -> None:
    """kill -9 in the middle of epoch 2 of 3, then --resume: one MLflow run, every step once
    in MLflow and in TensorBoard, the W&B-free trackers state pointing at the same run."""
    run = tmp_path / "run"
    victim = _train_process(*ARGS[:2], "3", *ARGS[3:], "--log", "tensorboard,mlflow",
                            "--out", str(run))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "last.pt").is_file():
            try:
                if load_checkpoint(run / "last.pt")["epoch"] >= 1:
                    break
            except ValueError:
                pass
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    resumed = _train_process("train", "--resume", str(run))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    steps = list(range(1, len(_step_losses(run)) + 1))
    client, found = _mlflow_run(store, run.name)
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == steps
    assert [s for s, _ in _scalars(run, "train/loss")] == steps


def test_an_epoch_saved_but_not_logged_is_logged_on_resume(
        tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between writing last.pt and logging the epoch: the resumed run logs it first."""
    calls = {"n": 0}
    original = tracking.Trackers.log_epochs

    class Killed(BaseException):
        pass

    def dies_on_the_second_epoch(self, history):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        original(self, history)

    monkeypatch.setattr(tracking.Trackers, "log_epochs", dies_on_the_second_epoch)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        cli.main([*ARGS[:2], "3", *ARGS[3:], "--log", "tensorboard,mlflow", "--out", str(run)])
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert json.loads((run / "trackers.json").read_text())["logged_epochs"] == 1
    monkeypatch.setattr(tracking.Trackers, "log_epochs", original)
    assert cli.main(["train", "--resume", str(run)]) == 0
    steps = list(range(1, len(_step_losses(run)) + 1))
    client, found = _mlflow_run(store, run.name)
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id,
                                                             "train/loss")) == steps
    assert [s for s, _ in _scalars(run, "train/loss")] == steps


def test_wandb_offline_writes_under_the_run_folder(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert cli.main([*ARGS, "--log", "wandb", "--out", str(run)]) == 0
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    [offline] = (run / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    assert json.loads((offline / "files" / "metrics.json").read_text()) == \
        json.loads((run / "metrics.json").read_text())
