"""Data-set readers on tiny generated layouts: splits, ids, archives and bad input."""

import io
import json
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from idml.data.cache import extract_once
from idml.data.images import validate_images
from idml.data.records import DatasetError, Records, descend_wrapper, ordered_labels
from idml.data.registry import (
    DATASET_NAMES,
    get_dataset,
    read_dataset,
    resolve_data_root,
    resolve_root,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def write_image(path, mode="RGB", size=(12, 10), fmt=None):
    """A solid image whose first row encodes its path, so no two files are identical (a
    duplicate within a split is an error, idml.data.duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 30, 60), "L": 128, "1": 1, "P": 3, "RGBA": (1, 2, 3, 128)}[mode]
    other = {"RGB": (0, 0, 0), "L": 0, "1": 0, "P": 0, "RGBA": (0, 0, 0, 255)}[mode]
    img = Image.new(mode, size, color)
    code, pixels = zlib.crc32(str(path).encode()), img.load()
    for x in range(min(size[0], 32)):
        pixels[x, 0] = color if code >> x & 1 else other
    img.save(path, format=fmt)
    return path


# ----------------------------------------------------------------------------------------------
# CUB


def make_cub(tmp_path, classes=(3, 99, 101, 150), per_class=2):
    """CUB subset whose folder names sort opposite to the class ids."""
    root = tmp_path / "CUB_200_2011"
    folders = {c: f"{999 - c:03d}.bird_{c}" for c in classes}  # larger id -> earlier folder
    images, labels = [], []
    for c in classes:
        for k in range(per_class):
            name = f"{folders[c]}/img_{k}.jpg"
            write_image(root / "images" / name)
            images.append(name)
            labels.append(c)
    root.joinpath("classes.txt").write_text(
        "".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, 201))
    )
    root.joinpath("images.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(images, 1)))
    root.joinpath("image_class_labels.txt").write_text(
        "".join(f"{i} {c}\n" for i, c in enumerate(labels, 1))
    )
    return root


def test_cub_subset_splits_by_metadata_class_id(tmp_path):
    root = make_cub(tmp_path)
    for given in (root, tmp_path):  # the folder itself or its parent
        splits = read_dataset("cub", given)
        assert sorted(set(splits.train.labels)) == [3, 99]
        assert sorted(set(splits.test.labels)) == [101, 150]
        assert len(splits.train) == len(splits.test) == 4
        # labels follow the metadata, not the (reversed) folder order
        for p, y in zip(
            splits.train.paths + splits.test.paths,
            splits.train.labels + splits.test.labels,
            strict=True,
        ):
            assert p.parent.name == f"{999 - y:03d}.bird_{y}" and p.is_file()
        assert splits.class_names[150] == "Bird_150"
        assert splits.query is None and splits.gallery is None


def test_cub_wrong_root_names_the_files_looked_for(tmp_path):
    with pytest.raises(DatasetError, match="images.txt.*classes.txt"):
        read_dataset("cub", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset("cub", tmp_path / "nowhere")


def test_cub_missing_metadata_file(tmp_path):
    root = make_cub(tmp_path)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match="missing.*image_class_labels.txt"):
        read_dataset("cub", root)


def test_cub_unparsable_line_names_file_and_line(tmp_path):
    root = make_cub(tmp_path)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    lines[2] = "3 three"
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt:3: class id 'three'"):
        read_dataset("cub", root)


def test_cub_missing_listed_image(tmp_path):
    root = make_cub(tmp_path)
    victim = sorted((root / "images").rglob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"{victim.name}.*images.txt:\d+"):
        read_dataset("cub", root)


def test_cub_image_without_label_is_an_error_not_a_smaller_set(tmp_path):
    root = make_cub(tmp_path)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="have no class"):
        read_dataset("cub", root)


def test_split_with_fewer_than_two_classes_is_rejected(tmp_path):
    root = make_cub(tmp_path, classes=(5, 120, 130))
    with pytest.raises(DatasetError, match="train split has 1 class"):
        read_dataset("cub", root)


# ----------------------------------------------------------------------------------------------
# Cars196


def make_cars(tmp_path, classes=(1, 98, 99, 196)):
    ann_dtype = [
        (f, "O")
        for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    ]
    annotations = np.zeros((1, 2 * len(classes)), dtype=ann_dtype)
    for i in range(2 * len(classes)):
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_image(tmp_path / rel)
        annotations[0, i] = (rel, 1, 1, 10, 8, np.array([[classes[i // 2]]], dtype=np.uint8), 0)
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Car model {c}" for c in range(1, 197)]
    scipy.io.savemat(
        tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": names}
    )
    return tmp_path


def test_cars_from_mat_annotations(tmp_path):
    root = make_cars(tmp_path)
    splits = read_dataset("cars", root)
    assert splits.train.labels == [1, 1, 98, 98]
    assert splits.test.labels == [99, 99, 196, 196]
    assert splits.train.paths[0] == root / "car_ims" / "000001.jpg"
    assert splits.class_names[196] == "Car model 196"


def test_cars_wrong_root_and_missing_image(tmp_path):
    with pytest.raises(DatasetError, match="cars_annos.mat"):
        read_dataset("cars", tmp_path)
    root = make_cars(tmp_path)
    (root / "car_ims" / "000003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"000003.jpg.*annotations\[2\]"):
        read_dataset("cars", root)


# ----------------------------------------------------------------------------------------------
# Stanford Online Products and In-Shop


def make_sop(tmp_path):
    for name, classes in (("Ebay_train.txt", (1, 2)), ("Ebay_test.txt", (3, 4, 5))):
        rows = ["image_id class_id super_class_id path"]
        for k, c in enumerate(c for c in classes for _ in range(2)):
            rel = f"bicycle_final/{c}_{k}.JPG"
            write_image(tmp_path / rel)
            rows.append(f"{k + 1} {c} 1 {rel}")
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    return tmp_path


def test_sop_train_and_test_as_listed(tmp_path):
    splits = read_dataset("sop", make_sop(tmp_path))
    assert splits.train.labels == [1, 1, 2, 2]
    assert splits.test.labels == [3, 3, 4, 4, 5, 5]
    assert all(p.is_file() for p in splits.test.paths)


def test_sop_bad_header_and_bad_row(tmp_path):
    root = make_sop(tmp_path)
    text = (root / "Ebay_test.txt").read_text()
    (root / "Ebay_test.txt").write_text(text.replace("image_id class_id", "id class"))
    with pytest.raises(DatasetError, match="Ebay_test.txt:1: expected the header"):
        read_dataset("sop", root)
    (root / "Ebay_test.txt").write_text(text.replace(" 4 1 ", " four 1 "))
    with pytest.raises(DatasetError, match=r"Ebay_test.txt:4: class_id 'four'"):
        read_dataset("sop", root)


def make_inshop(tmp_path):
    rows = []
    for item, status in (
        (1, "train"),
        (2, "train"),
        (3, "query"),
        (4, "query"),
        (3, "gallery"),
        (4, "gallery"),
    ):
        rel = f"img/WOMEN/Dresses/id_{item:08d}/{status}_front.jpg"
        write_image(tmp_path / rel)
        rows.append(f"{rel}    id_{item:08d}   {status}")
    header = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    (tmp_path / "list_eval_partition.txt").write_text(header + "\n".join(rows) + "\n")
    return tmp_path


def test_inshop_query_gallery(tmp_path):
    splits = read_dataset("inshop", make_inshop(tmp_path))
    assert splits.test is None
    assert splits.train.labels == [1, 2]
    assert splits.query.labels == [3, 4] and splits.gallery.labels == [3, 4]
    assert splits.class_names[4] == "id_00000004"
    assert set(splits.parts()) == {"train", "query", "gallery"}


def test_inshop_count_mismatch_and_bad_status(tmp_path):
    root = make_inshop(tmp_path)
    listing = root / "list_eval_partition.txt"
    text = listing.read_text()
    listing.write_text("7" + text[1:])
    with pytest.raises(DatasetError, match="announces 7 images but 6"):
        read_dataset("inshop", root)
    listing.write_text(text.replace("   query", "   probe", 1))
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt:5: evaluation_status"):
        read_dataset("inshop", root)


# ----------------------------------------------------------------------------------------------
# Omniglot


OMNI = {
    "images_background": {"Beta": ["character01"], "Alpha": ["character02", "character01"]},
    "images_evaluation": {"Gamma": ["character01", "character02"]},
}


def make_omniglot(root):
    for part, alphabets in OMNI.items():
        for alphabet, chars in alphabets.items():
            for char in chars:
                for k in range(2):
                    write_image(root / part / alphabet / char / f"{k:04d}_0{k}.png", "1", (8, 8))
    return root


def check_omniglot(splits):
    names = splits.class_names
    assert [names[i] for i in sorted(set(splits.train.labels))] == [
        "Alpha/character01",
        "Alpha/character02",
        "Beta/character01",
    ]
    assert [names[i] for i in sorted(set(splits.test.labels))] == [
        "Gamma/character01",
        "Gamma/character02",
    ]
    assert sorted(set(splits.train.labels)) == [0, 1, 2]
    assert sorted(set(splits.test.labels)) == [3, 4]
    assert len(splits.train) == 6 and len(splits.test) == 4


def test_omniglot_from_folders(tmp_path):
    check_omniglot(read_dataset("omniglot", make_omniglot(tmp_path / "omniglot")))


def test_omniglot_from_archive_extracted_once(tmp_path, monkeypatch):
    source = make_omniglot(tmp_path / "src")
    archive = tmp_path / "omniglot.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for part in OMNI:
            tar.add(source / part, arcname=part)
    monkeypatch.setenv("IDML_CACHE", str(tmp_path / "cache"))
    splits = read_dataset("omniglot", archive)
    check_omniglot(splits)
    assert splits.train.paths[0].is_relative_to(tmp_path / "cache" / "omniglot")
    marker = splits.train.paths[0]
    mtime = marker.stat().st_mtime_ns
    import idml.data.cache as cache

    def fail(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(cache, "extract_archive", fail)
    check_omniglot(read_dataset("omniglot", archive))
    assert marker.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["omniglot"]  # no temp left


def _tar_with(path, member: tarfile.TarInfo, data=b""):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("images_background/A/character01/0001_01.png")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"png"))
        tar.addfile(member, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "absolute", "hardlink"])
def test_malicious_archive_is_rejected_and_leaves_nothing(tmp_path, kind):
    member = tarfile.TarInfo(
        {"dotdot": "images_background/../../escape.png", "absolute": "/tmp/idml-escape.png"}.get(
            kind, "images_evaluation/x"
        )
    )
    data = b"evil"
    if kind == "symlink":
        member.type, member.linkname, data = tarfile.SYMTYPE, "/etc/passwd", b""
    elif kind == "hardlink":
        member.type = tarfile.LNKTYPE
        member.linkname, data = "images_background/A/character01/0001_01.png", b""
    else:
        member.size = len(data)
    archive = tmp_path / "evil.tar.gz"
    _tar_with(archive, member, data)
    target = tmp_path / "cache" / "omniglot"
    with pytest.raises(DatasetError, match="refusing|link"):
        extract_once(archive, target)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (tmp_path / "escape.png").exists()


def test_omniglot_wrong_root(tmp_path):
    with pytest.raises(DatasetError, match="images_background and images_evaluation"):
        read_dataset("omniglot", tmp_path)


# ----------------------------------------------------------------------------------------------
# Class folders and CSV


def make_folder(root, names=("001.rose", "002.tulip", "003.lily", "004.daisy")):
    for i, n in enumerate(names):
        for k in range(i + 1):
            write_image(root / "images" / n / f"image_{k}.jpg")
    (root / "images" / names[0] / "notes.txt").write_text("not an image")
    return root


def test_folder_fraction_and_wrapper_folder(tmp_path):
    splits = read_dataset("folder", make_folder(tmp_path))  # descends into images/
    assert splits.train.labels == [0, 1, 1]
    assert splits.test.labels == [2, 2, 2, 3, 3, 3, 3]
    assert splits.class_names == {0: "001.rose", 1: "002.tulip", 2: "003.lily", 3: "004.daisy"}
    assert all(p.suffix == ".jpg" for p in splits.train.paths)


def test_folder_explicit_class_list(tmp_path):
    root = make_folder(tmp_path)
    splits = read_dataset("folder", root / "images", train_classes="004.daisy, 001.rose")
    assert sorted(set(splits.train.labels)) == [0, 3]
    assert sorted(set(splits.test.labels)) == [1, 2]


def test_folder_bad_train_classes_and_empty_folder(tmp_path):
    root = make_folder(tmp_path)
    with pytest.raises(DatasetError, match="'005.iris' are not classes"):
        read_dataset("folder", root, train_classes="001.rose,005.iris")
    with pytest.raises(DatasetError, match="fraction strictly between 0 and 1"):
        read_dataset("folder", root, train_classes="1.5")
    with pytest.raises(DatasetError, match="train split has 1 class"):
        read_dataset("folder", root, train_classes="0.3")
    (root / "images" / "005.empty").mkdir()
    with pytest.raises(DatasetError, match="005.empty holds no images"):
        read_dataset("folder", root)


def write_csv(tmp_path, rows, header="path,label,split"):
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(header + "\n" + "\n".join(rows) + "\n")
    return manifest


def test_csv_with_split_column(tmp_path):
    write_image(tmp_path / "data" / "a.png", "L")
    write_image(tmp_path / "b.png", "P")
    rows = ["a.png,10,train", "a.png,2,TRAIN", f"{tmp_path / 'b.png'},cat,test", "a.png,dog,test"]
    write_csv(tmp_path, rows)
    splits = read_dataset("csv", tmp_path, csv="data/manifest.csv")
    # mixed labels sort as strings: "10" < "2" < "cat" < "dog"
    assert splits.class_names == {0: "10", 1: "2", 2: "cat", 3: "dog"}
    assert splits.train.labels == [0, 1] and splits.test.labels == [2, 3]
    assert splits.train.paths[0] == tmp_path / "data" / "a.png"
    assert splits.test.paths[0] == tmp_path / "b.png"


def test_csv_without_split_uses_train_classes(tmp_path):
    write_image(tmp_path / "data" / "a.png")
    manifest = write_csv(tmp_path, [f"a.png,{c}" for c in (10, 2, 3, 1)], header="path,label")
    splits = read_dataset("csv", tmp_path, csv=manifest)
    assert splits.class_names == {0: "1", 1: "2", 2: "3", 3: "10"}  # integers sort numerically
    assert sorted(splits.train.labels) == [0, 1] and sorted(splits.test.labels) == [2, 3]
    splits = read_dataset("csv", manifest, train_classes="10,3")
    assert sorted(splits.train.labels) == [2, 3]


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        ("path,class", "a.png,1", r"manifest.csv:1: header lacks column\(s\) label"),
        ("path,label,split", "a.png,1,val", r"manifest.csv:3: field 'split' is 'val'"),
        ("path,label,split", "a.png,,test", r"manifest.csv:3: field 'label' is empty"),
        ("path,label,split", "a.png,1", r"manifest.csv:3: expected 3 fields"),
        ("path,label,split", "missing.png,9,test", r"missing.png \(listed at .*manifest.csv:3"),
        ("path,label,split", "a.png,1,test", r"manifest.csv:3: label '1' is in both splits"),
    ],
)
def test_csv_bad_input(tmp_path, header, row, message):
    write_image(tmp_path / "data" / "a.png")
    manifest = write_csv(tmp_path, ["a.png,1,train", row], header=header)
    with pytest.raises(DatasetError, match=message):
        read_dataset("csv", manifest)


def test_unknown_name_and_misplaced_options(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        read_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="train_classes applies"):
        read_dataset("cub", tmp_path, train_classes="0.5")


def test_integer_labels_order_is_independent_of_hash_seed(tmp_path):
    # "1", "01" and "001" are all 1 under int(): their order must not follow set order, which
    # changes with PYTHONHASHSEED. Each run reads the manifest in a fresh interpreter.
    write_image(tmp_path / "data" / "a.png")
    labels = ["10", "1", "2", "01", "010", "02", "001", "3"]
    manifest = write_csv(tmp_path, [f"a.png,{c}" for c in labels], header="path,label")
    script = (
        "import json, sys\n"
        "from idml.data.registry import read_dataset\n"
        "s = read_dataset('csv', sys.argv[1])\n"
        "print(json.dumps([s.class_names, s.train.labels, s.test.labels]))\n"
    )
    outputs = []
    for seed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", script, str(manifest)], env=env,
                             capture_output=True, text=True, check=True)
        outputs.append(json.loads(run.stdout))
    assert outputs[0] == outputs[1]
    names, train, test = outputs[0]
    assert list(names.values()) == ["001", "01", "1", "02", "2", "3", "010", "10"]
    assert train == [2, 1, 3, 0] and test == [7, 4, 6, 5]  # ids in manifest row order
    assert ordered_labels(["b", "10", "a"]) == ["10", "a", "b"]  # not all integers: as text


def test_registry_lists_every_readable_data_set():
    assert DATASET_NAMES[0] == "digits" and get_dataset("digits").reader is None
    for name in DATASET_NAMES[1:]:
        assert get_dataset(name).reader is not None, name
    assert {n for n in DATASET_NAMES if get_dataset(n).train_classes} == {"folder", "csv"}
    assert get_dataset("flowers102").root_names == ("flowers102",)
    with pytest.raises(DatasetError, match="embedded"):
        read_dataset("digits", ".")


def test_resolve_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("IDML_DATA_ROOT", raising=False)
    assert resolve_data_root("cub", str(tmp_path)) == tmp_path  # explicit wins
    with pytest.raises(DatasetError, match="data_root.*IDML_DATA_ROOT") as err:
        resolve_data_root("cub", None)
    assert "--" not in str(err.value)  # a library message names parameters, not flags
    monkeypatch.setenv("IDML_DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetError, match="IDML_DATA_ROOT=.*omniglot, omniglot.tar.gz"):
        resolve_data_root("omniglot", None)
    (tmp_path / "omniglot.tar.gz").write_bytes(b"")
    assert resolve_data_root("omniglot", None) == tmp_path / "omniglot.tar.gz"
    (tmp_path / "omniglot").mkdir()
    assert resolve_data_root("omniglot", None) == tmp_path / "omniglot"  # first name first
    with pytest.raises(DatasetError, match="data_root.*IDML_DATA_ROOT does not apply"):
        resolve_data_root("folder", None)
    # A manifest alone is its own root; otherwise the data root is resolved.
    assert resolve_root("csv", None, "m.csv") == (Path("m.csv"), None)
    assert resolve_root("csv", str(tmp_path), "m.csv") == (tmp_path, "m.csv")


def test_data_set_under_idml_data_root(tmp_path, monkeypatch):
    make_cub(tmp_path)
    monkeypatch.setenv("IDML_DATA_ROOT", str(tmp_path))
    splits = read_dataset("cub", resolve_data_root("cub", None))
    assert sorted(set(splits.train.labels)) == [3, 99]


def test_wrapper_descent_rule(tmp_path):
    write_image(tmp_path / "wrap" / "inner" / "cls" / "a.png")
    assert descend_wrapper(tmp_path / "wrap") == tmp_path / "wrap" / "inner"
    write_image(tmp_path / "one" / "cls" / "a.png")  # a single class folder is not a wrapper
    assert descend_wrapper(tmp_path / "one") == tmp_path / "one"
    write_image(tmp_path / "loose" / "x.png")  # nor is a folder with images of its own
    write_image(tmp_path / "loose" / "inner" / "cls" / "a.png")
    assert descend_wrapper(tmp_path / "loose") == tmp_path / "loose"


# ----------------------------------------------------------------------------------------------
# Oxford Flowers-102


FLOWER_CLASSES = (1, 2, 51, 52, 60, 102)


def make_flowers_official(root, labels=(2, 1, 52, 51, 60, 102, 1, 52)):
    for i in range(1, len(labels) + 1):
        write_image(root / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    return root


def make_flowers_folders(root, classes=FLOWER_CLASSES):
    for c in classes:
        for k in range(2):
            write_image(root / "images" / f"{c:03d}.flower_{c}" / f"image_{c * 10 + k:05d}.jpg")
    return root


def test_flowers102_official_layout(tmp_path):
    root = make_flowers_official(tmp_path / "flowers102")
    for given in (root, tmp_path):  # also inside a wrapper folder (torchvision's flowers-102/)
        splits = read_dataset("flowers102", given)
        assert splits.train.labels == [2, 1, 51, 1] and splits.test.labels == [52, 60, 102, 52]
        assert [p.name for p in splits.train.paths] == [
            "image_00001.jpg", "image_00002.jpg", "image_00004.jpg", "image_00007.jpg"
        ]
        assert splits.train.paths[0] == root / "jpg" / "image_00001.jpg"


def test_flowers102_class_folders_match_the_folder_reader(tmp_path):
    root = make_flowers_folders(tmp_path / "flowers102")
    splits = read_dataset("flowers102", root)  # descends into images/
    assert sorted(set(splits.train.labels)) == [1, 2, 51]
    assert sorted(set(splits.test.labels)) == [52, 60, 102]
    assert splits.class_names[60] == "flower_60"
    folder = read_dataset("folder", root, train_classes="0.5")
    assert splits.train.paths == folder.train.paths and splits.test.paths == folder.test.paths


def test_flowers102_label_count_and_missing_jpg_name_the_file(tmp_path):
    root = make_flowers_official(tmp_path, labels=(1, 2, 52, 60))
    write_image(root / "jpg" / "image_00005.jpg")  # an image without a label
    with pytest.raises(DatasetError, match=r"imagelabels.mat has labels for 4 images but .*5"):
        read_dataset("flowers102", root)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 52, 60, 52, 1]])})
    with pytest.raises(DatasetError, match=r"image_00006.jpg \(listed at .*labels\[5\]\)"):
        read_dataset("flowers102", root)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 52, 103, 52]])})
    with pytest.raises(DatasetError, match=r"imagelabels.mat: labels\[3\] is 103"):
        read_dataset("flowers102", root)


def test_flowers102_bad_folders(tmp_path):
    root = make_flowers_folders(tmp_path)
    (root / "images" / "pansy").mkdir()
    with pytest.raises(DatasetError, match="pansy: expected a class folder named NNN.name"):
        read_dataset("flowers102", root)
    with pytest.raises(DatasetError, match="not a Flowers-102 folder"):
        read_dataset("flowers102", tmp_path / "images" / "001.flower_1")


# ----------------------------------------------------------------------------------------------
# Image validation


def test_validate_images_truncated_jpeg(tmp_path):
    good = [
        write_image(tmp_path / "rgb.jpg", size=(64, 48)),
        write_image(tmp_path / "grey.png", "L"),
        write_image(tmp_path / "bit.png", "1"),
        write_image(tmp_path / "pal.png", "P"),
        write_image(tmp_path / "alpha.png", "RGBA"),
    ]
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    truncated = tmp_path / "cut.jpg"
    noisy.save(truncated, quality=95)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    records = Records([*good, truncated, garbage], [0, 0, 1, 1, 2, 2, 3])

    with pytest.raises(DatasetError, match=r"cut.jpg does not decode"):
        validate_images(records, skip_bad=False, num_threads=2)
    kept, bad = validate_images(records, skip_bad=True, num_threads=2)
    assert kept.paths == good and kept.labels == [0, 0, 1, 1, 2]
    assert [p for p, _ in bad] == [truncated, garbage]
    assert "truncated" in bad[0][1]


# ----------------------------------------------------------------------------------------------
# The real data (skipped where ../shared/datasets is absent)


@pytest.mark.skipif(not (SHARED / "flowers102").is_dir(), reason="shared flowers102 absent")
def test_real_flowers102_split():
    splits = read_dataset("folder", SHARED / "flowers102")
    train_names = {splits.class_names[i] for i in set(splits.train.labels)}
    test_names = {splits.class_names[i] for i in set(splits.test.labels)}
    assert len(train_names) == len(test_names) == 51
    assert {n[:3] for n in train_names} == {f"{i:03d}" for i in range(1, 52)}
    assert {n[:3] for n in test_names} == {f"{i:03d}" for i in range(52, 103)}
    assert len(splits.train) == 3493 and len(splits.test) == 4696


@pytest.mark.skipif(not (SHARED / "flowers102").is_dir(), reason="shared flowers102 absent")
def test_real_flowers102_reader():
    splits = read_dataset("flowers102", SHARED / "flowers102")
    assert len(set(splits.train.labels)) == len(set(splits.test.labels)) == 51
    assert len(splits.train) + len(splits.test) == 8189
    folder = read_dataset("folder", SHARED / "flowers102", train_classes="0.5")
    assert splits.train.paths == folder.train.paths and splits.test.paths == folder.test.paths


@pytest.mark.skipif(not (SHARED / "omniglot.tar.gz").is_file(), reason="shared omniglot absent")
def test_real_omniglot_archive_members_are_safe():
    # Only the member listing is checked here (extracting 32k files is too slow for CI).
    with tarfile.open(SHARED / "omniglot.tar.gz") as tar:
        for k, member in enumerate(tar):
            assert member.isfile() or member.isdir()
            assert not os.path.isabs(member.name) and ".." not in member.name.split("/")
            assert member.name.split("/")[0] in ("images_background", "images_evaluation")
            if k > 200:
                break
