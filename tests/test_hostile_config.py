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


# --- hostile data and flags ------------------------------------------------------------------


def _png(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def test_a_latin1_manifest_names_the_file_and_line(tmp_path: Path) -> None:
    from idml.data.records import DatasetError
    from idml.data.registry import read_dataset

    _png(tmp_path / "a.png", 0)
    manifest = tmp_path / "data.csv"
    manifest.write_bytes("path,label\na.png,rose\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"{manifest}:3: not UTF-8 \(byte 0xe9 at column 10"):
        read_dataset("csv", manifest)


def test_a_repeated_header_column_is_named(tmp_path: Path) -> None:
    from idml.data.records import DatasetError
    from idml.data.registry import read_dataset

    manifest = tmp_path / "data.csv"
    manifest.write_text("path,label,label\na.png,x,y\n")
    with pytest.raises(DatasetError, match="header repeats column\\(s\\) label"):
        read_dataset("csv", manifest)


def test_a_file_name_that_is_not_utf8_loads(tmp_path: Path) -> None:
    """Any name the OS allows: the decoded-image cache keys on the name's bytes."""
    import os

    from idml.data.build import load_image_splits
    from idml.method.backbones import IMAGENET_SPEC

    root = tmp_path / "images"
    odd = root / "a" / os.fsdecode(b"caf\xe9.png")
    _png(odd, 0)
    for i, cls in enumerate(["a", "b", "c", "d"]):
        _png(root / cls / f"{i}.png", i + 1)
        _png(root / cls / f"{i}x.png", i + 10)
    splits = load_image_splits("folder", str(root), input_spec=IMAGENET_SPEC, image_size=8,
                               log=lambda _m: None)
    assert odd in splits.train.paths and len(splits.train) == 5


@pytest.mark.parametrize("argv", [
    ["embed", "ckpt.pt", "--split", "test", "--out", "e.npz", "--batch-size", "0"],
    ["search", "idx", "q.png", "--checkpoint", "ckpt.pt", "-k", "0"],
    ["export", "ckpt.pt", "--format", "onnx", "--out", "m.onnx", "--image-size", "0"],
])
def test_zero_sizes_are_refused_not_taken_as_the_default(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err


def test_an_index_meta_whose_sha256_is_a_string_is_refused(tmp_path: Path) -> None:
    import json

    import numpy as np

    from idml.serving.embeddings import EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION, EmbeddingSet
    from idml.serving.index import IndexFormatError, build_index, load_index, save_index

    rng = np.random.default_rng(0)
    semantic = rng.standard_normal((6, 4)).astype("float32")
    semantic /= np.linalg.norm(semantic, axis=1, keepdims=True)
    emb = EmbeddingSet(semantic, rng.standard_normal((6, 2)).astype("float32"),
                       np.array([f"{i}.png" for i in range(6)]), np.arange(6),
                       {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION,
                        "semantic_dim": 4, "uncertainty_dim": 2, "fingerprint": "f"})
    folder = save_index(build_index(emb, "exact"), tmp_path / "idx")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "sha256": "deadbeef"}))
    with pytest.raises(IndexFormatError, match="sha256 must map file names"):
        load_index(folder)
