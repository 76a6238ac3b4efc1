"""Duplicate images within a split stop the run naming both (or are kept once when allowed);
train/test overlaps are counted; label order and splits do not depend on the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idml.data.build import load_image_splits
from idml.data.duplicates import duplicate_groups, shared_images
from idml.data.records import DatasetError
from idml.method.backbones import IMAGENET_SPEC


def _image(path: Path, seed: int) -> Path:
    """A small PNG whose pixels (and so bytes) differ by seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_groups_by_file_and_by_bytes(tmp_path: Path) -> None:
    a = _image(tmp_path / "a.png", 0)
    b = _image(tmp_path / "b.png", 1)
    copy = tmp_path / "copy.png"
    copy.write_bytes(a.read_bytes())  # the same bytes, another file
    hard = tmp_path / "hard.png"
    os.link(b, hard)
    soft = tmp_path / "soft.png"
    soft.symlink_to(b)
    same_size = tmp_path / "same_size.png"  # as large as a, other bytes: not a duplicate
    data = bytearray(a.read_bytes())
    data[-20] ^= 0xFF
    same_size.write_bytes(bytes(data))
    paths = [a, b, copy, hard, soft, same_size, a]
    assert duplicate_groups(paths) == [[0, 2, 6], [1, 3, 4]]
    assert duplicate_groups([a, b, same_size]) == []


def _csv_dataset(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    manifest = root / "data.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{p},{y},{s}\n" for p, y, s in rows))
    return manifest


def _load(manifest: Path, allow: bool = False, log=print):
    return load_image_splits("csv", None, csv=str(manifest), input_spec=IMAGENET_SPEC,
                             image_size=8, cache=False, allow_duplicates=allow, log=log)


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    return [_image(tmp_path / f"img{i}.png", i).name for i in range(8)]


def test_a_manifest_listing_an_image_twice_stops_naming_both(tmp_path: Path,
                                                             images: list[str]) -> None:
    rows = [(images[0], "a", "train"), (images[1], "b", "train"),
            (images[2], "c", "test"), (images[3], "c", "test"), (images[4], "d", "test"),
            (images[2], "d", "test")]  # the inflated-recall case of the report
    manifest = _csv_dataset(tmp_path, rows)
    with pytest.raises(DatasetError, match="test split .* same image twice") as err:
        _load(manifest)
    assert str(tmp_path / images[2]) in str(err.value) and "--allow-duplicates" in str(err.value)
    lines: list[str] = []
    splits = _load(manifest, allow=True, log=lines.append)
    assert len(splits.test) == 3  # the first of the pair kept
    assert any("dropped 1 duplicate image(s) of the test split" in line for line in lines)


def test_identical_bytes_under_two_names_are_duplicates(tmp_path: Path,
                                                        images: list[str]) -> None:
    (tmp_path / "again.png").write_bytes((tmp_path / images[5]).read_bytes())
    rows = [(images[0], "a", "train"), (images[1], "b", "train"), (images[5], "c", "test"),
            ("again.png", "d", "test"), (images[6], "d", "test")]
    with pytest.raises(DatasetError, match="identical bytes"):
        _load(_csv_dataset(tmp_path, rows))


def test_images_shared_by_train_and_test_are_counted(tmp_path: Path,
                                                     images: list[str]) -> None:
    rows = [(images[0], "a", "train"), (images[1], "b", "train"), (images[0], "c", "test"),
            (images[2], "d", "test")]
    lines: list[str] = []
    _load(_csv_dataset(tmp_path, rows), log=lines.append)
    assert any("1 test image(s)" in line and "identical to a training image" in line
               for line in lines)
    assert shared_images([tmp_path / images[0]], [tmp_path / images[0], tmp_path / images[1]]) \
        == 1


@pytest.mark.parametrize("seed", ["0", "1"])
def test_labels_that_tie_as_integers_order_the_same_in_every_process(
        tmp_path: Path, images: list[str], seed: str) -> None:
    """CSV labels ``1`` and ``01`` tie under an integer sort; the order must not follow
    string hashing (``PYTHONHASHSEED``)."""
    rows = [(images[i], label, "train" if i < 4 else "test")
            for i, label in enumerate(["1", "01", "2", "1", "10", "010", "3", "03"])]
    manifest = _csv_dataset(tmp_path, rows)
    code = ("import sys; from idml.data.registry import read_dataset; "
            "d = read_dataset('csv', sys.argv[1]); print(d.class_names)")
    outs = {subprocess.run([sys.executable, "-c", code, str(manifest)], check=True,
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": hs}).stdout
            for hs in (seed, "12345")}
    assert len(outs) == 1
    assert outs.pop().strip() == str({0: "01", 1: "1", 2: "2", 3: "03", 4: "3", 5: "010",
                                      6: "10"})


# --- idml data check: near-duplicates by a perceptual hash ------------------------------------


def test_near_duplicate_pairs_equal_a_brute_force_search() -> None:
    from idml.data.check import near_duplicates

    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 40, dtype=np.int64)]
    hashes = base + [h ^ (1 << int(b)) ^ (1 << int(c)) for h, b, c in
                     zip(base[:10], rng.integers(0, 64, 10), rng.integers(0, 64, 10),
                         strict=True)]
    want = sorted((i, j, (hashes[i] ^ hashes[j]).bit_count())
                  for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                  if (hashes[i] ^ hashes[j]).bit_count() <= 4)
    assert near_duplicates(hashes, 4) == want and len(want) >= 10


def test_difference_hash_finds_a_resized_reencoded_copy(tmp_path: Path) -> None:
    from idml.data.check import difference_hash

    rng = np.random.default_rng(3)
    smooth = np.cumsum(rng.integers(-8, 9, (64, 96, 3)), axis=1).clip(0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.png")
    Image.fromarray(smooth).resize((48, 32)).save(tmp_path / "copy.jpg", quality=80)
    _image(tmp_path / "other.png", 9)
    a, copy, other = (difference_hash(tmp_path / n) for n in ("a.png", "copy.jpg", "other.png"))
    assert (a ^ copy).bit_count() <= 4 < (a ^ other).bit_count()


def test_data_check_reports_every_kind(tmp_path: Path, images: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from idml import cli

    (tmp_path / "again.png").write_bytes((tmp_path / images[2]).read_bytes())
    big = np.asarray(Image.open(tmp_path / images[3]))
    Image.fromarray(big).resize((24, 24)).save(tmp_path / "bigger.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [(images[0], "a", "train"), (images[1], "b", "train"), (images[2], "c", "test"),
            ("again.png", "c", "test"), (images[3], "d", "test"), ("bigger.png", "d", "test"),
            ("broken.png", "d", "test")]
    manifest = _csv_dataset(tmp_path, rows)
    assert cli.main(["data", "check", "csv", "--csv", str(manifest)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["train", "2", "2", "0", "0", "0"]
    assert out[2].split() == ["test", "5", "2", "1", "1", "1"]
    text = "\n".join(out)
    assert "identical" in text and "again.png" in text and "bigger.png" in text
    assert "unreadable" in text and "broken.png" in text


def test_a_cub_copy_listing_one_image_under_two_ids_is_refused(tmp_path: Path) -> None:
    from test_datasets import make_cub

    root = make_cub(tmp_path, classes=(3, 99, 101, 150), per_class=2)
    images = (root / "images.txt").read_text().splitlines()
    first_test = next(line for line in images if "bird_101" in line).split()[1]
    n = len(images) + 1
    (root / "images.txt").write_text("\n".join([*images, f"{n} {first_test}"]) + "\n")
    labels = (root / "image_class_labels.txt").read_text()
    (root / "image_class_labels.txt").write_text(labels + f"{n} 101\n")
    with pytest.raises(DatasetError, match="test split .* same image twice.*the same file"):
        load_image_splits("cub", str(root), input_spec=IMAGENET_SPEC, image_size=8,
                          cache=False, log=lambda _m: None)
