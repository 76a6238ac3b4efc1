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
