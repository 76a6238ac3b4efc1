"""The command line: choices read from the registries, library errors in the CLI's words."""

from __future__ import annotations

from pathlib import Path

import pytest

from idml.cli import build_parser, main
from idml.core.config import METRICS, PRECISIONS, resolve_config
from idml.data.registry import DATASET_NAMES
from idml.method.designs import DESIGNS
from idml.method.losses import LOSSES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    return capsys.readouterr().out


def test_train_help_lists_every_closed_choice(capsys):
    text = _train_help(capsys)
    for names in (DATASET_NAMES, tuple(LOSSES), METRICS, tuple(DESIGNS), PRECISIONS):
        assert "{" + ",".join(names) + "}" in text
    assert "timm.list_models" in text


def test_a_choice_outside_the_registry_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--loss", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_library_errors_name_flags_on_the_command_line(tmp_path, capsys):
    assert main(["train", "--no-progress", "--device", "cpu", "--loss", "triplet",
                 "--margin", "0.3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--loss 'triplet'" in err and "loss=" not in err
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("taken")
    assert main(["train", "--no-progress", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err


def test_dataset_root_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IDML_DATA_ROOT", raising=False)
    assert main(["train", "--no-progress", "--dataset", "flowers102", "--pretrained", "none",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "IDML_DATA_ROOT" in err


@pytest.mark.skipif(not (SHARED / "flowers102").is_dir(), reason="../shared/datasets is absent")
def test_flowers_preset_finds_the_shared_copy_through_idml_data_root(monkeypatch):
    from idml.data.registry import read_dataset, resolve_data_root

    monkeypatch.setenv("IDML_DATA_ROOT", str(SHARED))
    cfg = resolve_config("flowers-cpu")
    root = resolve_data_root(cfg.dataset, cfg.data_root)
    assert root == SHARED / "flowers102"
    splits = read_dataset(cfg.dataset, root)
    assert len(splits.train.classes) == 51 and len(splits.test.classes) == 51
