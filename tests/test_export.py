"""ONNX / TorchScript export: outputs equal PyTorch's, any batch size, CLI and errors."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from idml import cli
from idml.method.model import create_model
from idml.serving.export import (
    OUTPUT_NAMES,
    ExportError,
    MissingDependency,
    example_input,
    export_model,
    export_onnx,
    export_torchscript,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


def _with_bn_statistics(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Give trainable BNs non-trivial running statistics, then leave the model in train mode.

    Exporting in train mode would then use batch statistics and differ from eval outputs.
    """
    gen = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(2.0 * torch.randn(8, *shape, generator=gen) + 0.5)
    return model


def _models() -> list[tuple[str, torch.nn.Module, tuple[int, int, int]]]:
    torch.manual_seed(0)
    digits = create_model("digits_cnn", embedding_dim=32, pretrained="none")
    eff = create_model("efficientnet_lite0", embedding_dim=64, pretrained="none")
    eff = eff.to(memory_format=torch.channels_last)  # as `idml train` leaves it
    return [("digits_cnn", digits, (1, 8, 8)), ("efficientnet_lite0", eff, (3, 64, 64))]


@pytest.fixture(scope="module", params=[0, 1], ids=["digits_cnn", "efficientnet_lite0"])
def model_case(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, tuple]:
    name, model, shape = _models()[request.param]
    return name, _with_bn_statistics(model, shape), shape


def _reference(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = [t.numpy() for t in model(x)]
    model.train(was)
    return out


def test_onnx_matches_pytorch_for_other_batch_sizes(model_case, tmp_path: Path) -> None:
    name, model, shape = model_case
    example = torch.randn(2, *shape)
    path = export_onnx(model, tmp_path / f"{name}.onnx", example)
    assert model.training, "export must not change the caller's model mode"

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["idml.input_spec"])
    assert meta["input_size"] == list(shape)
    assert meta["mean"] == pytest.approx(list(model.input_spec["mean"]))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    for batch in (1, 5):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        ref = _reference(model, x)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, atol=TOL, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got[0], axis=1), 1.0, atol=1e-5)


def test_torchscript_matches_pytorch_for_other_batch_sizes(model_case, tmp_path: Path) -> None:
    name, model, shape = model_case
    path = export_torchscript(model, tmp_path / f"{name}.pt", torch.randn(2, *shape))
    assert model.training
    extra = {"idml.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["idml.json"])["output_names"] == list(OUTPUT_NAMES)
    for batch in (1, 7):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got = [t.numpy() for t in loaded(x)]
        for g, r in zip(got, _reference(model, x), strict=True):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, atol=TOL, rtol=0)


def test_legacy_opset_is_honoured(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("digits_cnn", embedding_dim=16, pretrained="none")
    path = export_model(model, tmp_path / "m13.onnx", "onnx", opset=13)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 13
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 8, 8)
    for g, r in zip(session.run(None, {"images": x.numpy()}), _reference(model, x), strict=True):
        np.testing.assert_allclose(g, r, atol=TOL, rtol=0)


def _checkpoint_model(ckpt_path: Path) -> torch.nn.Module:
    """The trained digits model, rebuilt here from the raw checkpoint contents."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = create_model(cfg["backbone"], embedding_dim=cfg["embedding_dim"],
                         uncertainty_dim=cfg["uncertainty_dim"], pretrained="none",
                         freeze_bn=cfg["freeze_bn"], in_chans=1, design=cfg["design"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_cli_exports_a_real_checkpoint(run_dir: Path, tmp_path: Path, fmt: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / f"model.{fmt}"
    code = cli.main(["export", str(run_dir / "checkpoint.pt"), "--format", fmt,
                     "--out", str(out)])
    assert code == 0 and out.is_file()
    assert "largest difference from PyTorch" in capsys.readouterr().out
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    ref = _reference(_checkpoint_model(run_dir / "checkpoint.pt"), x)
    if fmt == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["semantic", "uncertainty"], {"images": x.numpy()})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got = [t.detach().numpy() for t in torch.jit.load(str(out))(x)]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=TOL, rtol=0)


def test_cli_bad_format_exits_2(run_dir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", str(run_dir / "checkpoint.pt"), "--format", "tflite",
                  "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_cli_unwritable_path_exits_2(run_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "model.onnx"  # its "folder" is a file: cannot be created as root either
    code = cli.main(["export", str(run_dir / "checkpoint.pt"), "--format", "onnx",
                     "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot write {target}" in err
    code = cli.main(["export", str(run_dir / "checkpoint.pt"), "--format", "onnx",
                     "--out", str(tmp_path)])
    assert code == 2 and "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no stray temp files


def test_cli_missing_checkpoint_exits_2(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["export", str(tmp_path / "none.pt"), "--format", "torchscript",
                     "--out", str(tmp_path / "m.pt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_api_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model("digits_cnn", embedding_dim=8, pretrained="none")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m", "tflite")
    with pytest.raises(ExportError, match=r"\[B, C, H, W\]"):
        export_torchscript(model, tmp_path / "m.pt", torch.randn(1, 8, 8))
    with pytest.raises(ExportError, match="at least 2"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(MissingDependency, match=r"'onnx' package.*pip install"):
        export_onnx(model, tmp_path / "m.onnx", example_input(model))
    assert not (tmp_path / "m.onnx").exists()


def test_cli_image_run_uses_its_image_size_and_no_download(tmp_path: Path) -> None:
    """A checkpoint of an image run (3 channels, its own crop size) with package weights."""
    from idml.core.checkpoint import save_checkpoint
    from idml.core.config import RunConfig, as_dict

    cfg = dataclasses.replace(RunConfig(), dataset="folder", backbone="efficientnet_lite0",
                              pretrained="package", image_size=48, embedding_dim=24,
                              freeze_bn=True)
    torch.manual_seed(2)
    model = create_model("efficientnet_lite0", embedding_dim=24, pretrained="none",
                         freeze_bn=True).eval()
    save_checkpoint(tmp_path / "ckpt.pt", {"config": as_dict(cfg), "model": model.state_dict()})
    out = tmp_path / "m.pt"
    assert cli.main(["export", str(tmp_path / "ckpt.pt"), "--format", "torchscript",
                     "--out", str(out)]) == 0
    extra = {"idml.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["idml.json"])["input_size"] == [3, 48, 48]
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        for g, r in zip(loaded(x), model(x), strict=True):
            np.testing.assert_allclose(g.numpy(), r.numpy(), atol=TOL, rtol=0)
