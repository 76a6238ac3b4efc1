"""Embedding sources: folders, CSV manifests, query lists and a data set's split, read with the
same rules as the data-set readers."""

import pytest
from test_datasets import make_folder, write_image

from idml.data.records import DatasetError
from idml.data.sources import (
    collect_images,
    csv_source,
    dataset_source,
    folder_source,
    list_images,
    read_source,
)


def test_folder_source_labels_top_level_folders_and_descends_a_wrapper(tmp_path):
    root = make_folder(tmp_path)  # tmp/images/<class>/image_k.jpg (+ a notes.txt)
    write_image(root / "images" / "002.tulip" / "close-ups" / "deep.png")
    write_image(root / "images" / "003.lily" / ".hidden.png")
    source = folder_source(root)
    assert source.class_names == ["001.rose", "002.tulip", "003.lily", "004.daisy"]
    assert source.labels == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert source.paths[3].endswith("002.tulip/close-ups/deep.png")  # nested: its top folder
    assert not any(".hidden" in p or p.endswith(".txt") for p in source.paths)


def test_folder_source_flat_folder_is_unlabelled(tmp_path):
    for name in ("b.png", "a.jpg"):
        write_image(tmp_path / name)
    write_image(tmp_path / "cls" / "c.png")
    source = folder_source(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in source.paths] == ["a.jpg", "b.png", "c.png"]
    assert source.labels == [-1, -1, 0] and source.class_names == ["cls"]
    # One folder of images is one class, as for the folder reader (not a wrapper).
    assert folder_source(tmp_path / "cls").labels == [-1]
    single = tmp_path / "single"
    write_image(single / "only" / "d.png")
    assert folder_source(single).labels == [0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty holds no images"):
        list_images(tmp_path / "empty")


def test_csv_source_orders_labels_like_the_readers(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "imgs" / name)
    manifest = tmp_path / "m.csv"
    rows = ["imgs/a.png,10", "imgs/b.png,01", "imgs/a.png,1", "imgs/b.png,"]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    source = read_source(manifest)
    assert source.class_names == ["01", "1", "10"]
    assert source.labels == [2, 0, 1, -1]
    assert source.paths[0] == str(tmp_path / "imgs" / "a.png")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.png,1\n", r"m.csv:1: header lacks a 'path' column"),
        ("path,label\n,1\n", r"m.csv:2: field 'path' is empty"),
        ("path,label\nmissing.png,1\n", r"m.csv:2: image .*missing.png does not exist"),
        ("path,label\n", r"m.csv: no rows after the header"),
    ],
)
def test_csv_source_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DatasetError, match=message):
        csv_source(tmp_path / "m.csv")


def test_read_source_and_collect_images_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_source(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="neither a folder of images nor a .csv"):
        read_source(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="holds no images"):
        read_source(tmp_path)
    image = write_image(tmp_path / "q" / "a.png")
    assert collect_images([image, tmp_path / "q"]) == [str(image), str(image)]
    with pytest.raises(DatasetError, match="query .*gone.png does not exist"):
        collect_images([tmp_path / "gone.png"])
    with pytest.raises(DatasetError, match="no query images"):
        collect_images([])


def test_dataset_source_is_one_split_with_class_names(tmp_path):
    root = make_folder(tmp_path)
    source = dataset_source("folder", root, "test", train_classes="0.5")
    assert source.labels == [2, 2, 2, 3, 3, 3, 3]
    assert source.class_names == ["001.rose", "002.tulip", "003.lily", "004.daisy"]
    with pytest.raises(DatasetError, match="has no 'query' split .*train, test"):
        dataset_source("folder", root, "query")
