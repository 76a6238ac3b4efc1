"""Writers never destroy what they did not create: a run folder's files, their own input, or a
file of the user's; they replace their own earlier products, and anything with --overwrite."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from idml import cli
from idml.core.outputs import OutputError, check_output
from idml.core.rundir import CHECKPOINT_FILE, new_run_dir
from idml.serving.index import load_index


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "run"
    assert cli.main(["train", "--epochs", "1", "--no-progress", "--device", "cpu",
                     "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def embeddings(run: Path) -> Path:
    out = run.parent / "emb.npz"
    assert cli.main(["embed", str(run / CHECKPOINT_FILE), "--split", "test", "--out", str(out),
                     "--device", "cpu"]) == 0
    return out


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.json", "config.yaml", "train.log",
                                  "history.json"])
def test_no_command_writes_a_run_folders_files(run: Path, embeddings: Path, name: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = _folder_digest(run)
    target = str(run / name)
    ckpt = str(run / CHECKPOINT_FILE)
    _refused(["embed", ckpt, "--split", "test", "--out", target, "--overwrite"], capsys,
             "run folder", name)
    _refused(["export", ckpt, "--format", "torchscript", "--out", target, "--overwrite"],
             capsys, "run folder")
    _refused(["report", str(run), "--out", target, "--overwrite"], capsys, "run folder")
    _refused(["index", str(embeddings), "--out", str(run), "--overwrite"], capsys,
             "run folder")
    assert _folder_digest(run) == before
    cli.main(["eval", ckpt, "--device", "cpu", "--json"])  # the run still loads
    assert capsys.readouterr().out.strip().startswith("{")


def test_index_refuses_a_folder_holding_its_input(embeddings: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The clash of the hostile-input report: ``idml index clash/embeddings.npz --out clash``
    would have replaced the user's embeddings file with the index's own."""
    clash = tmp_path / "clash"
    clash.mkdir()
    mine = clash / "embeddings.npz"
    mine.write_bytes(embeddings.read_bytes())
    before = _digest(mine)
    _refused(["index", str(mine), "--out", str(clash), "--overwrite"], capsys, "own input")
    assert _digest(mine) == before


def test_an_output_that_is_the_input_by_any_name_is_refused(
        run: Path, embeddings: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hard, soft = tmp_path / "hard.npz", tmp_path / "soft.npz"
    os.link(embeddings, hard)
    soft.symlink_to(embeddings)
    ckpt = str(run / CHECKPOINT_FILE)
    before = _digest(embeddings)
    for alias in (embeddings, hard, soft):
        _refused(["embed", ckpt, str(alias), "--out", str(alias), "--overwrite"], capsys,
                 "own input")
    assert _digest(embeddings) == before


def test_a_users_file_is_replaced_only_with_overwrite(
        run: Path, embeddings: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    ckpt = str(run / CHECKPOINT_FILE)
    for argv in (["embed", ckpt, "--split", "test", "--out", str(notes)],
                 ["export", ckpt, "--format", "torchscript", "--out", str(notes)],
                 ["report", str(run), "--out", str(notes), "--examples", "1"]):
        _refused(argv, capsys, "--overwrite")
        assert notes.read_text() == "my notes"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"not an index")
    _refused(["index", str(embeddings), "--out", str(folder)], capsys, "--overwrite")
    assert (folder / "photo.jpg").read_bytes() == b"not an index"
    assert cli.main(["export", ckpt, "--format", "torchscript", "--out", str(notes),
                     "--overwrite"]) == 0
    assert notes.read_bytes()[:2] == b"PK"  # now a TorchScript archive


def test_own_earlier_products_are_replaced(run: Path, embeddings: Path, tmp_path: Path) -> None:
    ckpt = str(run / CHECKPOINT_FILE)
    for _ in range(2):  # the second time over its own product, no --overwrite needed
        assert cli.main(["embed", ckpt, "--split", "test", "--out", str(tmp_path / "e.npz"),
                         "--device", "cpu"]) == 0
        assert cli.main(["index", str(embeddings), "--out", str(tmp_path / "idx")]) == 0
        assert cli.main(["export", ckpt, "--format", "torchscript",
                         "--out", str(tmp_path / "m.pt")]) == 0
        assert cli.main(["report", str(run), "--out", str(tmp_path / "r.html"),
                         "--examples", "1"]) == 0
    assert len(load_index(tmp_path / "idx")) > 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the index folder is written whole: no temporary folder remains


def test_check_output_names_the_problem(tmp_path: Path) -> None:
    existing = tmp_path / "x.bin"
    existing.write_bytes(b"1")
    with pytest.raises(OutputError, match="is not a thing written by idml"):
        check_output(existing, inputs=[], kind="a thing", is_own=lambda _p: False)
    assert check_output(existing, inputs=[], kind="a thing", is_own=lambda _p: True) == existing
    assert check_output(tmp_path / "new", inputs=[existing], kind="a thing",
                        is_own=lambda _p: False) == tmp_path / "new"


def test_two_runs_cannot_claim_one_folder(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is exclusive even when both runs saw the folder empty."""
    from idml.core.config import RunConfig

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("claimed by the other run\n")
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(()))  # it looked empty to both
    with pytest.raises(FileExistsError, match="taken by another run"):
        new_run_dir(RunConfig(out=str(out)))
    monkeypatch.undo()
    assert (out / "config.yaml").read_text() == "claimed by the other run\n"


def test_disk_full_names_the_file_and_keeps_the_previous_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from idml.core import io as idml_io

    target = tmp_path / "metrics.json"
    idml_io.write_json(target, {"version": 1})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(idml_io.os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        idml_io.write_json(target, {"version": 2})
    monkeypatch.undo()
    assert idml_io.json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file


def test_ctrl_c_mid_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    from idml.core.io import atomic_write

    target = tmp_path / "emb.npz"
    target.write_bytes(b"old")

    def interrupted(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]
