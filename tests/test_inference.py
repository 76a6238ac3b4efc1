"""`idml.load` / `Embedder.embed`, embeddings files and `idml embed`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import idml
from idml.cli import main
from idml.core.checkpoint import save_checkpoint
from idml.core.config import RunConfig, as_dict, resolve_config
from idml.core.errors import CheckpointError
from idml.data.digits import load_digits_splits
from idml.data.splits import LabeledTensors
from idml.evaluation.evaluator import compute_embeddings
from idml.method.metric import uncertainty_score
from idml.method.model import create_model
from idml.serving.embeddings import (
    EmbeddingsError,
    EmbeddingSet,
    load_embeddings,
    save_embeddings,
)

IMAGE_SIZE = 28  # test resize 32 (28 / 0.875), centre crop offset 2: exact in pixels


def image_config(embedding_dim: int = 16, **extra) -> RunConfig:
    """A tiny RGB-image run config (no pretrained weights, 28 px)."""
    overrides = {"dataset": "folder", "backbone": "efficientnet_lite0", "pretrained": "none",
                 "image_size": IMAGE_SIZE, "embedding_dim": embedding_dim, **extra}
    return resolve_config(None, None, overrides)


def make_checkpoint(path, embedding_dim: int = 16, seed: int = 0, **extra):
    """A checkpoint as `idml train` writes it, with a freshly initialised model."""
    cfg = image_config(embedding_dim, **extra)
    torch.manual_seed(seed)
    model = create_model(cfg.backbone, embedding_dim=embedding_dim, pretrained="none")
    save_checkpoint(path, {"config": as_dict(cfg), "model": model.state_dict(), "loss": {},
                           "metrics": {"final": {}}})
    return path, model


def make_class_folder(root, classes=("cat", "dog"), per_class: int = 3, seed: int = 0):
    """``root/<class>/img_k.png`` noise images (40x40 RGB; one grey image per class)."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            if k == 0:
                img = img.convert("L")
            path = root / name / f"img_{k}.png"
            img.save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    ckpt, model = make_checkpoint(tmp / "checkpoint.pt")
    paths = make_class_folder(tmp / "images")
    return tmp, ckpt, model.eval(), paths


def manual_preprocess(path, spec) -> torch.Tensor:
    """Independent restatement of the test transform for 40x40 images at 28 px."""
    img = Image.open(path).convert("RGB")
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]  # uint8
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True,
                                        align_corners=False)  # the spec's interpolation
    x = x[0, :, 2:30, 2:30].float() / 255.0  # centre crop 28, [0, 1]
    mean = torch.tensor(spec["mean"]).view(3, 1, 1)
    std = torch.tensor(spec["std"]).view(3, 1, 1)
    return (x - mean) / std


def test_embed_paths_equals_model_on_manually_preprocessed_tensors(setup):
    _, ckpt, model, paths = setup
    embedder = idml.load(ckpt, device="cpu", batch_size=4)
    semantic, uncertainty = embedder.embed([str(p) for p in paths])
    batch = torch.stack([manual_preprocess(p, model.input_spec) for p in paths])
    with torch.no_grad():
        s, u = model(batch)
    assert semantic.dtype == np.float32 and uncertainty.dtype == np.float32
    assert semantic.shape == (len(paths), 16) and uncertainty.shape == (len(paths), 16)
    np.testing.assert_allclose(np.linalg.norm(semantic, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(semantic, s.numpy(), atol=1e-4)
    np.testing.assert_allclose(uncertainty, u.numpy(), atol=1e-5)
    # PIL images and a preprocessed tensor give the same rows
    pil = embedder.embed([Image.open(p) for p in paths[:2]])
    np.testing.assert_allclose(pil.semantic, semantic[:2], atol=1e-6)
    tensor = embedder.embed(batch)
    np.testing.assert_allclose(tensor.semantic, s.numpy(), atol=1e-5)
    scores = embedder.uncertainty_score(uncertainty)
    np.testing.assert_allclose(scores, (uncertainty.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(uncertainty_score(torch.from_numpy(uncertainty)), scores)


def test_fingerprint_is_stable_and_tracks_the_weights(setup, tmp_path):
    _, ckpt, _, _ = setup
    first = idml.load(ckpt, device="cpu").fingerprint
    assert first == idml.load(ckpt, device="cpu").fingerprint
    assert len(first) == 16 and int(first, 16) >= 0
    other, _ = make_checkpoint(tmp_path / "other.pt", seed=1)
    assert idml.load(other, device="cpu").fingerprint != first


def test_unreadable_image_is_named(setup, tmp_path):
    _, ckpt, _, paths = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        idml.load(ckpt, device="cpu").embed([str(paths[0]), str(bad)])
    with pytest.raises(ValueError, match="missing.jpg"):
        idml.load(ckpt, device="cpu").embed([str(tmp_path / "missing.jpg")])


def test_tensor_input_must_match_the_model(setup):
    _, ckpt, _, _ = setup
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        idml.load(ckpt, device="cpu").embed(torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "version"])
def test_damaged_or_foreign_checkpoint_raises_checkpoint_error(setup, tmp_path, damage):
    _, ckpt, model, _ = setup
    target = tmp_path / "bad.pt"
    data = bytearray(ckpt.read_bytes())
    if damage == "flip":  # inside the tensor data, which torch.load alone does not check
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "foreign":
        torch.save({"model": model.state_dict()}, target)
    else:
        save_checkpoint(target, {"config": {}, "model": {}})
        payload = torch.load(target, weights_only=True)
        torch.save({**payload, "version": 99}, target)
    with pytest.raises(CheckpointError, match="bad.pt"):
        idml.load(target, device="cpu")


def test_weights_that_do_not_fit_the_config(tmp_path):
    cfg = image_config(embedding_dim=16)
    model = create_model(cfg.backbone, embedding_dim=8, pretrained="none")
    path = save_checkpoint(tmp_path / "c.pt", {"config": as_dict(cfg), "model": model.state_dict()})
    with pytest.raises(ValueError, match="do not fit"):
        idml.load(path, device="cpu")


def test_digits_model_embeds_tensors_like_compute_embeddings(tmp_path):
    cfg = RunConfig()
    torch.manual_seed(0)
    model = create_model("digits_cnn", embedding_dim=cfg.embedding_dim, in_chans=1)
    path = save_checkpoint(tmp_path / "d.pt", {"config": as_dict(cfg), "model": model.state_dict()})
    embedder = idml.load(path, device="cpu", batch_size=7)
    spec = embedder.model.input_spec
    test = load_digits_splits(tuple(spec["mean"]), tuple(spec["std"])).test
    images, labels = test.images[:20], test.labels[:20]
    got = embedder.embed(images)
    s, u, _ = compute_embeddings(embedder.model, LabeledTensors(images, labels), 5,
                                 torch.device("cpu"))
    np.testing.assert_allclose(got.semantic, s.numpy(), atol=1e-6)
    np.testing.assert_allclose(got.uncertainty, u.numpy(), atol=1e-6)
    # 8x8 grey images: ink 255 -> 1.0, normalised with the spec (binarised: exact in uint8)
    from sklearn.datasets import load_digits

    raw = load_digits().images[:3] >= 8
    pil = [Image.fromarray((r * 255).astype(np.uint8)) for r in raw]
    ref = (torch.from_numpy(raw.astype(np.float32))[:, None] - spec["mean"][0]) / spec["std"][0]
    np.testing.assert_allclose(embedder.embed(pil).semantic, embedder.embed(ref).semantic,
                               atol=1e-6)


def _embedding_set(n=5, d=4, du=3) -> EmbeddingSet:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((n, d)).astype(np.float32)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    meta = {"format": "idml-embeddings", "version": 1, "fingerprint": "ab", "semantic_dim": d,
            "uncertainty_dim": du}
    return EmbeddingSet(s, rng.standard_normal((n, du)).astype(np.float32),
                        np.array([f"x/{i}.png" for i in range(n)]),
                        np.arange(n, dtype=np.int64) - 1, meta)


def test_embeddings_file_round_trip(tmp_path):
    emb = _embedding_set()
    path = save_embeddings(tmp_path / "e.npz", emb)
    with np.load(path, allow_pickle=False) as data:  # plain arrays, no pickles
        assert set(data.files) == {"semantic", "uncertainty", "paths", "labels", "meta"}
        assert json.loads(str(data["meta"]))["format"] == "idml-embeddings"
    back = load_embeddings(path)
    np.testing.assert_array_equal(back.semantic, emb.semantic)
    np.testing.assert_array_equal(back.uncertainty, emb.uncertainty)
    assert back.paths.tolist() == emb.paths.tolist() and back.labels.tolist() == [-1, 0, 1, 2, 3]
    assert back.meta == emb.meta


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "dtype", "missing",
                                    "not_unit", "meta"])
def test_corrupt_embeddings_file_is_named(tmp_path, damage):
    emb = _embedding_set()
    path = save_embeddings(tmp_path / "e.npz", emb)
    arrays = {"semantic": emb.semantic, "uncertainty": emb.uncertainty, "paths": emb.paths,
              "labels": emb.labels, "meta": np.array(json.dumps(emb.meta))}
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif damage == "pickle":
        np.savez(path, **{**arrays, "paths": np.array(list(emb.paths), dtype=object)})
    elif damage == "dtype":
        np.savez(path, **{**arrays, "semantic": emb.semantic.astype(np.float64)})
    elif damage == "missing":
        np.savez(path, **{k: v for k, v in arrays.items() if k != "labels"})
    elif damage == "not_unit":
        np.savez(path, **{**arrays, "semantic": 2 * emb.semantic})
    else:
        np.savez(path, **{**arrays, "meta": np.array("{not json")})
    with pytest.raises(EmbeddingsError, match="e.npz"):
        load_embeddings(path)


def test_cli_embed_class_folder_flat_folder_and_csv(setup, tmp_path, capsys):
    tmp, ckpt, _, paths = setup
    out = tmp_path / "emb.npz"
    assert main(["embed", str(ckpt), str(tmp / "images"), "--out", str(out),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    assert "embedded 6 images (2 classes, 0 unlabelled)" in capsys.readouterr().out
    emb = load_embeddings(out)
    embedder = idml.load(ckpt, device="cpu")
    assert emb.paths.tolist() == [str(p) for p in paths]
    assert emb.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert emb.meta["class_names"] == ["cat", "dog"]
    assert emb.meta["fingerprint"] == embedder.fingerprint
    assert (emb.meta["semantic_dim"], emb.meta["uncertainty_dim"]) == (16, 16)
    assert emb.meta["idml_version"] == idml.__version__
    np.testing.assert_allclose(emb.semantic, embedder.embed(paths).semantic, atol=1e-6)

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in paths[:2]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert main(["embed", str(ckpt), str(flat), "--out", str(out), "--device", "cpu"]) == 0
    assert load_embeddings(out).labels.tolist() == [-1, -1]

    manifest = tmp_path / "m.csv"
    rel = [p.relative_to(tmp) for p in paths]
    manifest.write_text("path,label\n" + "".join(
        f"{tmp / r},{10 if i < 3 else 2}\n" for i, r in enumerate(rel)))
    assert main(["embed", str(ckpt), str(manifest), "--out", str(out), "--device", "cpu"]) == 0
    emb = load_embeddings(out)
    assert emb.labels.tolist() == [1, 1, 1, 0, 0, 0]  # numeric label order: 2, 10
    assert emb.meta["class_names"] == ["2", "10"]


def test_cli_embed_errors(setup, tmp_path, capsys):
    tmp, ckpt, _, _ = setup
    bad = tmp_path / "imgs" / "a" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    argv = ["embed", str(ckpt), str(tmp_path / "imgs"), "--out", str(tmp_path / "e.npz"),
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("idml embed: error:") and "broken.jpg" in err
    assert main(["embed", str(ckpt), "--out", str(tmp_path / "e.npz")]) == 2
    assert "SOURCE" in capsys.readouterr().err


def test_cli_embed_split_of_the_checkpoint_data_set(setup, tmp_path):
    _, _, model, _ = setup
    paths = make_class_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=2)
    cfg = image_config(data_root=str(tmp_path / "data"), train_classes="0.5")
    ckpt = save_checkpoint(tmp_path / "c.pt", {"config": as_dict(cfg),
                                                "model": model.state_dict()})
    out = tmp_path / "test.npz"
    assert main(["embed", str(ckpt), "--split", "test", "--out", str(out), "--device", "cpu"]) == 0
    emb = load_embeddings(out)
    assert emb.paths.tolist() == [str(p) for p in paths[4:]]  # c, d: the test classes
    assert emb.labels.tolist() == [2, 2, 3, 3]
    assert emb.meta["class_names"] == ["a", "b", "c", "d"]
    np.testing.assert_allclose(
        emb.semantic, idml.load(ckpt, device="cpu").embed(paths[4:]).semantic, atol=1e-6)


def test_cli_embed_digits_split(tmp_path):
    torch.manual_seed(0)
    model = create_model("digits_cnn", embedding_dim=RunConfig.embedding_dim, in_chans=1)
    ckpt = save_checkpoint(tmp_path / "d.pt", {"config": as_dict(RunConfig()),
                                                "model": model.state_dict()})
    out = tmp_path / "digits.npz"
    assert main(["embed", str(ckpt), "--split", "test", "--out", str(out), "--device", "cpu"]) == 0
    emb = load_embeddings(out)
    assert set(emb.labels.tolist()) == {5, 6, 7, 8, 9}
    assert emb.paths[0] == "digits/test/0000"
