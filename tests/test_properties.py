"""Property-based tests of the readers with an oracle: generated valid CSV manifests and YAML
configs parse to exactly the expected records and values; generated invalid ones raise the
reader's own error naming the file."""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from idml.core.config import RunConfig, load_yaml  # noqa: E402
from idml.core.errors import ConfigError  # noqa: E402
from idml.data.records import DatasetError  # noqa: E402
from idml.data.registry import read_dataset  # noqa: E402
from idml.method.designs import DESIGNS  # noqa: E402

#: Examples per property (CI: 60, seconds; set IDML_HYPOTHESIS_EXAMPLES for a deeper search).
FAST = settings(max_examples=int(os.environ.get("IDML_HYPOTHESIS_EXAMPLES", "60")),
                deadline=None)

# Labels as people write them: words, numbers with leading zeros, spaces inside, unicode.
label = st.one_of(
    st.integers(0, 30).map(str),
    st.integers(0, 30).map(lambda i: f"{i:03d}"),
    st.text(st.characters(categories=("L", "N"), include_characters=" -_.é"),
            min_size=1, max_size=8),
).map(str.strip).filter(bool)


def _oracle_order(names: set[str]) -> list[str]:
    """The documented id order, computed here: by integer value then text when every label
    is an integer, else by text."""
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


@st.composite
def manifests(draw):
    """Rows ``(path, label, split)`` with each label in one split and >= 2 labels per split."""
    labels = draw(st.lists(label, min_size=4, max_size=8, unique=True))
    cut = draw(st.integers(2, len(labels) - 2))
    split_of = {y: ("train" if i < cut else "test") for i, y in enumerate(labels)}
    rows = []
    for y in labels:
        for k in range(draw(st.integers(1, 3))):
            rows.append((f"img/{len(rows)}_{k}.png", y, split_of[y]))
    return draw(st.permutations(rows))


def _write_manifest(root: Path, rows, header=("path", "label", "split")) -> Path:
    for path, *_ in rows:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    manifest = root / "data.csv"
    manifest.write_text(buf.getvalue(), encoding="utf-8")
    return manifest


def test_only_ascii_integers_order_as_numbers() -> None:
    from idml.data.records import ordered_labels

    assert ordered_labels(["10", "9", "09"]) == ["09", "9", "10"]
    assert ordered_labels(["1_0", "2", "3"]) == ["1_0", "2", "3"]  # int("1_0") == 10
    assert ordered_labels(["\u0663", "2"]) == ["2", "\u0663"]  # an Arabic-Indic three


@FAST
@given(manifests())
def test_valid_manifests_parse_to_the_expected_records(rows) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits = read_dataset("csv", _write_manifest(root, rows))
        names = _oracle_order({y for _, y, _ in rows})
        ids = {y: i for i, y in enumerate(names)}
        for part, records in (("train", splits.train), ("test", splits.test)):
            want = [(root / p, ids[y]) for p, y, s in rows if s == part]
            assert list(zip(records.paths, records.labels, strict=True)) == want
        assert splits.class_names == dict(enumerate(names))


@FAST
@given(manifests(), st.sampled_from(["drop_label", "empty_path", "bad_split", "both_splits"]),
       st.data())
def test_invalid_manifests_raise_the_readers_error_naming_the_file(rows, fault, data) -> None:
    rows = [list(r) for r in rows]
    i = data.draw(st.integers(0, len(rows) - 1))
    header = ("path", "label", "split")
    if fault == "drop_label":
        header, rows = ("path", "split"), [[p, s] for p, _, s in rows]
    elif fault == "empty_path":
        rows[i][0] = " "
    elif fault == "bad_split":
        rows[i][2] = data.draw(st.sampled_from(["val", "TRAINING", "1", "tset"]))
    else:  # the same label in both splits
        rows.append([rows[i][0], rows[i][1], "test" if rows[i][2] == "train" else "train"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _write_manifest(root, [r for r in rows if r[0].strip()], header)
        if fault == "empty_path":  # a blank path cannot be created: write the row by hand
            manifest.write_text(manifest.read_text() + f" ,{rows[i][1]},{rows[i][2]}\n")
        with pytest.raises(DatasetError) as err:
            read_dataset("csv", manifest)
        assert str(manifest) in str(err.value)


# A YAML config of valid values for a sample of the fields, of each kind of type.
config_values = st.fixed_dictionaries({}, optional={
    "epochs": st.integers(1, 500),
    "lr": st.floats(1e-6, 1.0),
    "seed": st.integers(0, 2**31 - 1),
    "design": st.sampled_from(sorted(DESIGNS)),
    "mixup": st.booleans(),
    "eval_ks": st.lists(st.integers(1, 1000), min_size=1, max_size=5),
    "uncertainty_dim": st.one_of(st.none(), st.integers(1, 1024)),
    "data_root": st.one_of(st.none(), st.text(st.characters(categories=("L", "N")),
                                                min_size=1, max_size=12)),
    "log": st.lists(st.sampled_from(["tensorboard", "mlflow", "wandb"]), unique=True),
})


@FAST
@given(config_values)
def test_valid_yaml_configs_load_exactly(values) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        loaded = load_yaml(path)
        assert loaded == values
        cfg = RunConfig(**loaded).validate()
        assert {k: getattr(cfg, k) for k in values} == values


@FAST
@given(config_values, st.sampled_from([
    ("epochs", "ten"), ("lr", "fast"), ("mixup", "maybe"), ("eval_ks", "1,2"),
    ("uncertainty_dim", 2.5), ("data_root", 7), ("log", "mlflow"), ("no_such_field", 1),
]))
def test_invalid_yaml_configs_raise_a_config_error(values, bad) -> None:
    field, value = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump({**values, field: value}), encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            RunConfig(**load_yaml(path)).validate()
        assert field in str(err.value)


# ------------------------------------------------------------------ CUB and In-Shop metadata

# Integers as a sloppy file might spell them, which int() would take: they must be refused.
not_ascii_ints = st.sampled_from(["1_0", "\u0663", "\uff17", "+-1", "1.0", "0x10", "", "seven"])
image_name = st.text(st.characters(categories=("L", "N"), include_characters=" _-"),
                     min_size=1, max_size=10).map(str.strip).filter(bool)


def _touch_all(root: Path, names) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


@st.composite
def cub_sets(draw):
    """``(classes {id: folder}, images [(image_id, name, class_id)])`` with >= 2 classes on
    each side of the 100/101 split, ids in any order."""
    train = draw(st.lists(st.integers(1, 100), min_size=2, max_size=4, unique=True))
    test = draw(st.lists(st.integers(101, 200), min_size=2, max_size=4, unique=True))
    classes = {c: f"{c:03d}.{draw(image_name).replace(' ', '_')}" for c in train + test}
    names = draw(st.lists(image_name, min_size=len(classes) * 2, max_size=len(classes) * 3,
                          unique=True))
    owners = list(classes) + draw(st.lists(st.sampled_from(list(classes)),
                                           min_size=len(names) - len(classes),
                                           max_size=len(names) - len(classes)))
    ids = draw(st.lists(st.integers(1, 10**6), min_size=len(names), max_size=len(names),
                        unique=True))
    images = [(i, f"{classes[c]}/{n}.jpg", c) for i, n, c in zip(ids, names, owners,
                                                                   strict=True)]
    return classes, draw(st.permutations(images))


def _write_cub(root: Path, classes, images) -> None:
    _touch_all(root / "images", [name for _, name, _ in images])
    (root / "classes.txt").write_text("".join(f"{c} {f}\n" for c, f in classes.items()))
    (root / "images.txt").write_text("".join(f"{i} {n}\n" for i, n, _ in images))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {c}\n" for i, _, c in reversed(images)))


@FAST
@given(cub_sets())
def test_valid_cub_metadata_reads_to_the_expected_splits(case) -> None:
    classes, images = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_cub(root, classes, images)
        splits = read_dataset("cub", root)
    by_id = sorted(images)
    for records, keep in ((splits.train, lambda c: c <= 100), (splits.test, lambda c: c > 100)):
        want = [(root / "images" / n, c) for _, n, c in by_id if keep(c)]
        assert list(zip(records.paths, records.labels, strict=True)) == want
    assert splits.class_names == {c: f.split(".", 1)[1] for c, f in classes.items()}


@FAST
@given(cub_sets(), st.sampled_from(["bad_image_id", "bad_class_id", "twice", "unknown_class",
                                    "no_name"]), not_ascii_ints, st.data())
def test_invalid_cub_metadata_names_file_and_line(case, fault, token, data) -> None:
    classes, images = case
    i = data.draw(st.integers(0, len(images) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_cub(root, classes, images)
        images_txt, labels_txt = root / "images.txt", root / "image_class_labels.txt"
        lines = images_txt.read_text().splitlines()
        if fault == "bad_image_id":
            lines[i] = f"{token} {images[i][1]}"
        elif fault == "twice":
            lines.append(lines[i].split()[0] + " another/name.jpg")
        elif fault == "no_name":
            lines[i] = lines[i].split()[0]
        images_txt.write_text("\n".join(lines) + "\n")
        if fault in ("bad_class_id", "unknown_class"):
            wrong = token if fault == "bad_class_id" else "201"
            labels_txt.write_text(labels_txt.read_text() + f"{images[i][0]} {wrong}\n")
        with pytest.raises(DatasetError) as err:
            read_dataset("cub", root)
    where = labels_txt if fault in ("bad_class_id", "unknown_class") else images_txt
    if token == "" and fault == "bad_image_id":  # the line is the name alone: no id at all
        assert str(images_txt) in str(err.value)
    else:
        assert re.search(re.escape(str(where)) + r":\d+", str(err.value)), str(err.value)


@st.composite
def inshop_rows(draw):
    """Rows ``(name, item_id, status)``: >= 2 items in each of train, query and gallery."""
    rows = []
    for status in ("train", "query", "gallery"):
        items = draw(st.lists(st.integers(1, 10**8 - 1), min_size=2, max_size=3, unique=True))
        for item in items:
            for k in range(draw(st.integers(1, 2))):
                rows.append((f"img/{status}/{item}_{k}.jpg", item, status))
    return draw(st.permutations(rows))


def _write_inshop(root: Path, rows, count=None, header="image_name item_id evaluation_status",
                  items=None) -> Path:
    _touch_all(root, [name for name, _, _ in rows])
    items = items or [f"id_{item:08d}" for _, item, _ in rows]
    body = "".join(f"{n} {it} {s}\n" for (n, _, s), it in zip(rows, items, strict=True))
    listing = root / "list_eval_partition.txt"
    listing.write_text(f"{len(rows) if count is None else count}\n{header}\n{body}")
    return listing


@FAST
@given(inshop_rows())
def test_valid_inshop_listing_reads_to_the_expected_parts(rows) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_inshop(root, rows)
        splits = read_dataset("inshop", root)
    for part in ("train", "query", "gallery"):
        want = [(root / n, item) for n, item, s in rows if s == part]
        records = getattr(splits, part)
        assert list(zip(records.paths, records.labels, strict=True)) == want
    assert splits.test is None
    assert splits.class_names == {item: f"id_{item:08d}" for _, item, _ in rows}


@FAST
@given(inshop_rows(), st.sampled_from(["count", "header", "item", "status"]), st.data())
def test_invalid_inshop_listing_names_the_file(rows, fault, data) -> None:
    i = data.draw(st.integers(0, len(rows) - 1))
    items = [f"id_{item:08d}" for _, item, _ in rows]
    rows = list(rows)
    kwargs = {}
    if fault == "count":
        kwargs["count"] = len(rows) + data.draw(st.sampled_from([-1, 1, 5]))
    elif fault == "header":
        kwargs["header"] = data.draw(st.sampled_from(["image_name item_id",
                                                      "name item_id evaluation_status"]))
    elif fault == "item":
        items[i] = data.draw(st.sampled_from(["id_12a", "12", "id_", "ID_00000001",
                                              "id_\u0663"]))
    else:
        rows[i] = (rows[i][0], rows[i][1], data.draw(st.sampled_from(["val", "Train", "test"])))
    with tempfile.TemporaryDirectory() as tmp:
        listing = _write_inshop(Path(tmp), rows, items=items, **kwargs)
        with pytest.raises(DatasetError) as err:
            read_dataset("inshop", Path(tmp))
    assert str(listing) in str(err.value)
