"""Image pipeline: RGB decoding of any mode, transforms, the decoded cache, the train loader."""

import numpy as np
import pytest
import torch
from PIL import Image

import idml.data.images as images
from idml.data.images import (
    CachedImageDataset,
    DecodedCache,
    ImageDataset,
    cache_images,
    decode_image,
    load_rgb,
    loader_throughput,
)
from idml.data.loader import make_train_loader
from idml.data.records import DatasetError, Records
from idml.data.transforms import build_transforms

SPEC = {"mean": (0.5, 0.25, 0.125), "std": (0.5, 0.25, 0.5), "crop_pct": 0.875}


def write_image(path, mode="RGB", size=(12, 10), color=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    default = {"RGB": (200, 30, 60), "L": 128, "1": 1, "P": 3, "RGBA": (10, 20, 30, 0)}
    Image.new(mode, size, default[mode] if color is None else color).save(path)
    return path


@pytest.fixture
def mixed(tmp_path):
    rng = np.random.default_rng(0)
    paths = [
        write_image(tmp_path / "rgb.png"),
        write_image(tmp_path / "grey.png", "L"),
        write_image(tmp_path / "bit.png", "1"),
        write_image(tmp_path / "pal.png", "P"),
        write_image(tmp_path / "alpha.png", "RGBA"),
    ]
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(photo)
    return Records([*paths, photo], [0, 1, 2, 3, 4, 5])


def test_any_mode_decodes_to_rgb(mixed):
    for path in mixed.paths:
        img = load_rgb(path)
        assert img.mode == "RGB"
    assert load_rgb(mixed.paths[2]).getpixel((0, 0)) == (255, 255, 255)  # 1-bit white
    assert load_rgb(mixed.paths[4]).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_transforms_shape_dtype_and_normalisation(mixed):
    test_tf = build_transforms(SPEC, 8, train=False)
    train_tf = build_transforms(SPEC, 8, train=True)
    ds = ImageDataset(mixed, test_tf)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 0
    expected = (torch.tensor([200, 30, 60]) / 255 - torch.tensor(SPEC["mean"])) / torch.tensor(
        SPEC["std"]
    )
    torch.testing.assert_close(x[:, 4, 4], expected)
    for i in range(len(mixed)):
        assert ImageDataset(mixed, train_tf)[i][0].shape == (3, 8, 8)
    grey = build_transforms(
        {**SPEC, "mean": (0.5,), "std": (0.5,), "input_size": (1, 8, 8)}, 8, train=False
    )
    assert ImageDataset(mixed, grey)[5][0].shape == (1, 8, 8)


def test_test_transform_resizes_by_crop_pct():
    tf = build_transforms({**SPEC, "crop_pct": 0.5}, 8, train=False)
    resize = [t for t in tf.transforms if type(t).__name__ == "Resize"][0]
    assert resize.size == [16]
    default = build_transforms({"mean": SPEC["mean"], "std": SPEC["std"]}, 224, train=False)
    assert [t for t in default.transforms if type(t).__name__ == "Resize"][0].size == [256]


def test_decoded_cache_matches_direct_decoding_and_persists(mixed, tmp_path, monkeypatch):
    cache = cache_images(mixed, short_side=20, num_threads=2, cache_dir=tmp_path / "cache")
    assert len(cache) == len(mixed)
    for i, path in enumerate(mixed.paths):
        torch.testing.assert_close(cache[i], decode_image(path, 20), rtol=0, atol=0)
    assert cache[1].shape == (1, 10, 12)  # grey stays one channel, small images not enlarged
    assert cache[5].shape == (3, 20, 30)  # 40x60 photo: short side 20, aspect kept
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again instead of loading the cache file")

    monkeypatch.setattr(images, "decode_image", no_decoding)
    again = cache_images(mixed, short_side=20, num_threads=2, cache_dir=tmp_path / "cache")
    for i in range(len(mixed)):
        assert torch.equal(again[i], cache[i])
    with pytest.raises(DatasetError, match="decoded again"):  # another size is another key
        cache_images(mixed, short_side=10, num_threads=2, cache_dir=tmp_path / "cache")


def test_cached_dataset_equals_pil_dataset_when_not_downscaled(mixed):
    tf = build_transforms(SPEC, 8, train=False)
    cache = cache_images(mixed, short_side=1000, num_threads=2)
    cached, direct = CachedImageDataset(cache, mixed.labels, tf), ImageDataset(mixed, tf)
    for i in range(len(mixed)):
        (a, ya), (b, yb) = cached[i], direct[i]
        assert ya == yb and a.shape == b.shape == (3, 8, 8)
        torch.testing.assert_close(a, b)


def test_cache_names_an_undecodable_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.jpg does not decode"):
        cache_images(Records([bad], [0]), short_side=8, num_threads=1)


def test_decoded_cache_round_trip(tmp_path):
    cache = DecodedCache.from_tensors(
        [torch.ones(3, 2, 4, dtype=torch.uint8), torch.zeros(1, 5, 5, dtype=torch.uint8)]
    )
    cache.save(tmp_path / "c.pt")
    loaded = DecodedCache.load(tmp_path / "c.pt")
    assert loaded[0].shape == (3, 2, 4) and loaded[1].shape == (1, 5, 5)
    assert loaded.nbytes == 24 + 25


def test_loader_throughput_is_positive(mixed):
    ds = ImageDataset(mixed, build_transforms(SPEC, 8, train=True))
    assert loader_throughput(ds, batch_size=2, num_workers=0, max_batches=3) > 0


class _Labels(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor(i), self.labels[i]


def _epochs(loader, n=2):
    return [[idx.tolist() for idx, _ in loader] for _ in range(n)]


def test_m_per_class_loader_is_reproducible_per_seed():
    labels = [c for c in range(6) for _ in range(5)]
    ds = _Labels(labels)
    first = _epochs(make_train_loader(ds, labels, batch_size=8, m_per_class=2, seed=1))
    np.random.seed(123)  # noqa: NPY002 -- the global RNG must not matter
    torch.manual_seed(5)
    again = _epochs(make_train_loader(ds, labels, batch_size=8, m_per_class=2, seed=1))
    other = _epochs(make_train_loader(ds, labels, batch_size=8, m_per_class=2, seed=2))
    assert first == again and first != other and first[0] != first[1]
    assert len(first[0]) == 30 // 8
    for batch in first[0]:
        classes = [labels[i] for i in batch]
        assert all(classes.count(c) == 2 for c in set(classes)) and len(set(classes)) == 4


def test_plain_shuffled_loader_is_reproducible_per_seed():
    labels = list(range(10))
    ds = _Labels(labels)
    first = _epochs(make_train_loader(ds, labels, batch_size=4, m_per_class=0, seed=1))
    assert first == _epochs(make_train_loader(ds, labels, batch_size=4, m_per_class=0, seed=1))
    assert first != _epochs(make_train_loader(ds, labels, batch_size=4, m_per_class=0, seed=2))
    assert [len(b) for b in first[0]] == [4, 4]  # incomplete last batch dropped


def test_m_per_class_rejects_impossible_batches():
    labels = [0, 0, 1, 1]
    with pytest.raises(ValueError, match="must divide"):
        make_train_loader(_Labels(labels), labels, batch_size=3, m_per_class=2, seed=0)
    with pytest.raises(ValueError, match="has 2"):
        make_train_loader(_Labels(labels), labels, batch_size=8, m_per_class=2, seed=0)
