"""`idml train` / `idml eval` on tiny on-disk layouts: CUB, In-Shop, class folders."""

import json

import numpy as np
import pytest
from PIL import Image
from test_datasets import make_cub, make_inshop

from idml.cli import main
from idml.core.config import resolve_config

TINY = [
    "--backbone", "resnet18", "--pretrained", "none", "--image-size", "32",
    "--embedding-dim", "16", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
    "--num-workers", "0", "--eval-batch-size", "8", "--no-progress",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("IDML_CACHE", str(tmp_path / "cache"))


def _noise_images(folder, n, seed):
    rng = np.random.default_rng(seed)
    for k in range(n):
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img_{k}.jpg")


def test_cub_layout_trains_and_eval_reproduces(tmp_path, capsys):
    root = make_cub(tmp_path, classes=(3, 99, 101, 150), per_class=4)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "cub", "--data-root", str(root), "--out", str(out), *TINY]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"recall@1", "nmi", "map@r"} <= set(metrics["final"])
    log = (out / "train.log").read_text()
    assert "8 train images in 2 classes; 8 test images" in log
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["final"]


def test_inshop_is_evaluated_query_against_gallery(tmp_path):
    root = make_inshop(tmp_path / "inshop")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "inshop", "--data-root", str(root), "--out", str(out),
            *TINY, "--batch-size", "2"]
    assert main(argv) == 0
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert "recall@1" in final and "map@r" in final and "nmi" not in final
    assert "2 query, 2 gallery images" in (out / "train.log").read_text()


def test_truncated_image_stops_before_training_or_is_skipped(tmp_path, capsys):
    for i, name in enumerate(("001.a", "002.b", "003.c", "004.d")):
        _noise_images(tmp_path / "data" / name, 3, seed=i)
    bad = tmp_path / "data" / "003.c" / "img_0.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    argv = ["train", "--dataset", "folder", "--data-root", str(tmp_path / "data"), *TINY,
            "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "r1" / "checkpoint.pt").exists()
    assert main([*argv, "--out", str(tmp_path / "r2"), "--skip-bad-images"]) == 0
    assert "skipped 1 unreadable image(s) of 6 in the test split" in (
        tmp_path / "r2" / "train.log"
    ).read_text()


def test_dataset_flag_selects_its_preset():
    assert resolve_config(overrides={"dataset": "cub"}).lr == 6e-4
    assert resolve_config(overrides={"dataset": "folder"}).backbone == "efficientnet_lite0"
    assert resolve_config().dataset == "digits"
    sop = resolve_config("sop", overrides={"lr": 1e-5})
    assert sop.lr == 1e-5 and sop.eval_ks == [1, 10, 100, 1000] and sop.lr_gamma == 0.25


def test_csv_manifest_alone_trains(tmp_path):
    rows = ["path,label,split"]
    for i, (label, split) in enumerate([("a", "train"), ("b", "train"), ("c", "test"),
                                        ("d", "test")]):
        _noise_images(tmp_path / "imgs" / label, 2, seed=i)
        rows += [f"imgs/{label}/img_{k}.jpg,{label},{split}" for k in range(2)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "csv", "--csv", str(tmp_path / "manifest.csv"), "--out",
            str(out), *TINY, "--batch-size", "2"]
    assert main(argv) == 0
    assert "4 train images in 2 classes; 4 test images" in (out / "train.log").read_text()
