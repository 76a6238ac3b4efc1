"""Exact resume after `kill -9` in the middle of training (deterministic on the CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from idml.core.checkpoint import load_checkpoint

ARGS = ["--epochs", "5", "--no-progress", "--device", "cpu", "--seed", "4"]


def _idml(*argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "idml.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _idml("train", *ARGS, "--out", str(full))

    victim = _idml("train", *ARGS, "--out", str(killed))
    last = killed / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the checkpoint of epoch 2, then kill -9
        if last.is_file():
            try:
                if load_checkpoint(last)["epoch"] >= 2:
                    break
            except ValueError:
                pass  # never partial (atomic rename), but be safe against races
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    done = load_checkpoint(last)["epoch"]
    assert 2 <= done < 5

    resumed = _idml("train", "--resume", str(killed))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a == b
    ma = load_checkpoint(full / "checkpoint.pt")["model"]
    mb = load_checkpoint(killed / "checkpoint.pt")["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert f"resumed {killed} after epoch {done}/5" in (killed / "train.log").read_text()
    assert not last.exists()  # removed once the run completed


def test_resume_needs_an_interrupted_run(tmp_path, capsys):
    from idml.cli import main

    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
