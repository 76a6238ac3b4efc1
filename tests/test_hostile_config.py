"""Hostile configs: each broken input built in a temp folder gets a clear error naming the
field or file (exit code 2), quickly, never a traceback, a hang or a run on NaN."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from idml import cli

TRAIN = ["train", "--epochs", "1", "--no-progress", "--device", "cpu"]


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert all(w in err for w in words), err
    return err


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines).replace("a0:", "data_root:", 1) + "\n")
    start = time.perf_counter()
    _fails([*TRAIN, "--config", str(bomb)], capsys, str(bomb), "aliases")
    assert time.perf_counter() - start < 5


def test_a_config_that_is_not_utf8_names_the_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("backbone: caf\xe9\n".encode("latin-1"))
    _fails([*TRAIN, "--config", str(path)], capsys, str(path), "UTF-8")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("eval_ks", "abc", ("eval_ks", "list of int")),
    ("eval_ks", [1, "two"], ("eval_ks", "list of int")),
    ("uncertainty_dim", "big", ("uncertainty_dim", "int")),
    ("data_root", 5, ("data_root", "str")),
    ("backbone", 123, ("backbone", "str")),
    ("out", 5, ("out", "str")),
    ("log", "tensorboard", ("log",)),
])
def test_wrong_types_in_yaml_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            field: str, value: object,
                                            words: tuple[str, ...]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({field: value}))
    _fails([*TRAIN, "--config", str(path)], capsys, *words)


@pytest.mark.parametrize(("flag", "value"), [("--lr", "inf"), ("--margin", "nan"),
                                             ("--grad-clip", "nan"), ("--ism-a", "-inf")])
def test_non_finite_numbers_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        flag: str, value: str) -> None:
    field = flag.removeprefix("--").replace("-", "_")
    _fails([*TRAIN, f"{flag}={value}", "--out", str(tmp_path / "run")], capsys,
           f"{field} must be a finite number")
    assert not (tmp_path / "run").exists()


def test_resume_of_a_finished_run_says_there_is_nothing_to_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(run)]) == 0
    capsys.readouterr()
    _fails(["train", "--resume", str(run)], capsys, "no last.pt")


def test_resume_after_a_kill_with_an_edited_config(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from idml.training import trainer as trainer_module

    class Killed(BaseException):
        pass

    original = trainer_module.Trainer._end_epoch_main

    def killed_after_saving(self, record, rng):
        original(self, record, rng)
        raise Killed

    monkeypatch.setattr(trainer_module.Trainer, "_end_epoch_main", killed_after_saving)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        cli.main(["train", "--epochs", "2", "--no-progress", "--device", "cpu",
                  "--out", str(run)])
    monkeypatch.undo()
    assert (run / "last.pt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "embedding_dim": 64,
                                                     "device": "auto"}))
    err = _fails(["train", "--resume", str(run)], capsys, "embedding_dim (128 -> 64)")
    assert "device" not in err.split("differs")[1].split(";")[0]  # device may change
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "device": "auto"}))
    assert cli.main(["train", "--resume", str(run)]) == 0


def test_embed_without_a_source_says_what_is_missing(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["embed", str(tmp_path / "none.pt"), "--out", str(tmp_path / "e.npz")], capsys,
           "nothing to embed")
