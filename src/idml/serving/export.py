"""Export a two-head model to ONNX or TorchScript for serving outside this library.

The exported graph takes a preprocessed image batch ``images [B, C, H, W]`` (float32,
normalised with the model's ``input_spec``; ``B`` is dynamic) and returns
``(semantic, uncertainty)``: unit-norm semantic embeddings ``[B, D]`` and raw uncertainty
embeddings ``[B, Du]`` (``||u||^2`` is the per-image uncertainty). ONNX outputs carry those
names. Both formats record the input spec (size, mean, std) as metadata: ONNX
``metadata_props["idml.input_spec"]``, TorchScript the extra file ``idml.json``.

ONNX uses PyTorch's ``torch.export``-based exporter (``dynamo=True``, the default since
PyTorch 2.9; the TorchScript-based one is deprecated), which needs the ``onnx`` and
``onnxscript`` packages; checking an export against PyTorch needs ``onnxruntime``
(``pip install 'idml[export]'``). All three are imported only when used.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from idml.core.errors import IdmlError
from idml.core.io import atomic_path
from idml.data.registry import get_dataset
from idml.method.model import IntrospectiveNet

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAMES = ("semantic", "uncertainty")
METADATA_KEY = "idml.input_spec"
TORCHSCRIPT_EXTRA = "idml.json"
# ONNX protobuf files cannot exceed 2 GB; larger weights go to a side file.
_PROTOBUF_LIMIT = 2**31 - 2**26


class ExportError(IdmlError):
    """An export that cannot be made; the message says why and what to do."""


class MissingDependency(ExportError):
    """An optional package (onnx, onnxscript, onnxruntime) that is not installed."""


def require(module: str, purpose: str) -> Any:
    """Import an optional package, or raise :class:`MissingDependency` saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(
            f"{purpose} needs the '{module}' package, which is not installed: "
            f"pip install 'idml[export]' (or pip install {module})"
        ) from err


def default_image_size(model: IntrospectiveNet, cfg: Any | None = None) -> int:
    """The input side length a model was trained with: the run's crop size, else its spec."""
    if cfg is not None and not get_dataset(cfg.dataset).in_memory:
        return int(cfg.image_size)
    return int(model.input_spec["input_size"][-1])


def example_input(model: IntrospectiveNet, image_size: int | None = None,
                  batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A random preprocessed batch ``[batch_size, C, S, S]`` for tracing ``model``."""
    channels, _, side = model.input_spec["input_size"]
    size = image_size or side
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, channels, size, size, generator=gen)


def input_metadata(model: IntrospectiveNet, example: torch.Tensor) -> dict[str, Any]:
    """What a caller needs to preprocess images for the exported model."""
    spec = model.input_spec
    return {
        "input_name": INPUT_NAME,
        "output_names": list(OUTPUT_NAMES),
        "input_size": [int(s) for s in example.shape[1:]],
        "mean": [float(v) for v in spec["mean"]],
        "std": [float(v) for v in spec["std"]],
        "semantic_dim": int(model.semantic_head.out_features),
        "uncertainty_dim": model.uncertainty_dim,
    }


@contextlib.contextmanager
def _eval_copy(model: nn.Module) -> Iterator[nn.Module]:
    """An eval-mode, contiguous-format copy on the CPU (the caller's model is left alone).

    ``IntrospectiveNet.train`` keeps frozen BNs in eval mode anyway; eval mode here also
    fixes trainable BNs and dropout. channels_last weights are made contiguous so traced
    graphs do not depend on the memory format.
    """
    clone = copy.deepcopy(model).cpu().float()
    clone = clone.to(memory_format=torch.contiguous_format)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    yield clone


def _check_example(example: torch.Tensor) -> torch.Tensor:
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example)
        raise ExportError(f"example must be an image batch [B, C, H, W], got {shape}")
    if example.shape[0] < 2:
        # torch.export specialises a dimension of size 1; 2+ keeps the batch axis dynamic.
        raise ExportError("example batch must hold at least 2 images (dynamic batch axis)")
    return example.detach().cpu().float().contiguous()


def _prepare_target(path: str | Path) -> Path:
    """``path`` as a Path whose folder exists and is writable; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: cannot create its folder ({exc})") from exc
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {path.parent} is not writable")
    return path


#: Lowest opset the torch.export-based exporter emits natively; older ones use the legacy path.
DYNAMO_MIN_OPSET = 18


def export_onnx(
    model: IntrospectiveNet,
    path: str | Path,
    example: torch.Tensor,
    *,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as one ONNX file: input ``images``, outputs ``semantic``/``uncertainty``.

    ``example`` ([B >= 2, C, H, W]) fixes C, H and W; the batch axis stays dynamic. ``opset``:
    the ONNX opset (default: the exporter's). Opsets from 18 use the ``torch.export``-based
    exporter; older ones (which it would only reach by a lossy version conversion) the
    deprecated TorchScript-based one. Weights are stored inside the file unless they exceed
    protobuf's 2 GB limit (then in ``<path>.data`` beside it).
    """
    onnx = require("onnx", "ONNX export")
    legacy = opset is not None and opset < DYNAMO_MIN_OPSET
    if not legacy:
        require("onnxscript", "ONNX export (PyTorch's exporter)")
    example = _check_example(example)
    path = _prepare_target(path)
    meta = json.dumps(input_metadata(model, example))
    with _eval_copy(model) as net, warnings.catch_warnings():
        for category in (FutureWarning, UserWarning, DeprecationWarning,
                         torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        size = sum(p.numel() * p.element_size() for p in net.parameters())
        try:
            if legacy:
                _export_torchscript_based(net, example, path, opset, meta)
            else:
                program = torch.onnx.export(
                    net, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                )
        except Exception as exc:
            raise ExportError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc
    if not legacy:
        program.model.metadata_props[METADATA_KEY] = meta
        if size > _PROTOBUF_LIMIT:
            program.save(os.fspath(path), external_data=True)
        else:
            with atomic_path(path) as tmp:
                program.save(os.fspath(tmp), external_data=False)
    if opset is not None:
        proto = onnx.load(os.fspath(path), load_external_data=False)
        got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != opset:
            raise ExportError(f"asked for ONNX opset {opset}, the exporter wrote {got} ({path})")
    return path


def _export_torchscript_based(net: torch.nn.Module, example: torch.Tensor, path: Path,
                              opset: int, meta: str) -> None:
    """ONNX at an opset below the ``torch.export``-based exporter's, with the deprecated
    TorchScript-based exporter; the metadata is added to the written file."""
    onnx = require("onnx", "ONNX export")
    with atomic_path(path) as tmp:
        torch.onnx.export(
            net, (example,), os.fspath(tmp), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)},
        )
        proto = onnx.load(os.fspath(tmp))
        proto.metadata_props.add(key=METADATA_KEY, value=meta)
        onnx.save(proto, os.fspath(tmp))


def export_torchscript(model: IntrospectiveNet, path: str | Path, example: torch.Tensor) -> Path:
    """Write ``model`` as a traced TorchScript file returning ``(semantic, uncertainty)``.

    Traced with ``example`` ([B >= 2, C, H, W]): any batch size works, C/H/W should match
    the example (backbones with input-dependent padding bake it in). Load with
    ``torch.jit.load(path)``; ``idml.json`` among its extra files holds the input spec.
    """
    example = _check_example(example)
    path = _prepare_target(path)
    with _eval_copy(model) as net, warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export but still the format to load
        # from C++/LibTorch; the shape check in IntrospectiveNet.feature_map is static.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(net, (example,), check_trace=False)
        except Exception as exc:
            raise ExportError(f"TorchScript export failed ({type(exc).__name__}: {exc})") \
                from exc
        extra = {TORCHSCRIPT_EXTRA: json.dumps(input_metadata(model, example))}
        with atomic_path(path) as tmp:
            torch.jit.save(traced, os.fspath(tmp), _extra_files=extra)
    return path


def load_exported(path: str | Path, fmt: str) -> Any:
    """A callable ``images (np.ndarray or tensor) -> (semantic, uncertainty)`` as NumPy arrays.

    ONNX runs through onnxruntime on the CPU; TorchScript through ``torch.jit.load``.
    """
    if fmt == "onnx":
        ort = require("onnxruntime", "running an ONNX export")
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(images: Any) -> tuple[np.ndarray, np.ndarray]:
            x = images.detach().cpu().numpy() if torch.is_tensor(images) else images
            sem, unc = session.run(list(OUTPUT_NAMES), {name: np.asarray(x, np.float32)})
            return sem, unc

        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(os.fspath(path), map_location="cpu")

        @torch.no_grad()
        def run_ts(images: Any) -> tuple[np.ndarray, np.ndarray]:
            x = torch.as_tensor(np.asarray(images, np.float32)) if not torch.is_tensor(images) \
                else images.float()
            sem, unc = module(x)
            return sem.numpy(), unc.numpy()

        return run_ts
    raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


@torch.no_grad()
def max_difference(model: IntrospectiveNet, path: str | Path, fmt: str,
                   images: torch.Tensor) -> float:
    """Largest absolute difference between the export's outputs and the model's on ``images``."""
    run = load_exported(path, fmt)
    with _eval_copy(model) as net:
        ref = [t.numpy() for t in net(images.float())]
    got = run(images)
    return float(max(np.abs(a - b).max() for a, b in zip(got, ref, strict=True)))


def is_export_file(path: str | Path) -> bool:
    """Whether ``path`` is a model written by :func:`export_model` (TorchScript with its
    ``idml.json`` extra file, or ONNX with the ``idml.input_spec`` metadata)."""
    path = Path(path)
    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}") for n in archive.namelist())
    try:
        import onnx

        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # no onnx package, or not an ONNX file: not recognisably ours
        return False
    return any(p.key == METADATA_KEY for p in proto.metadata_props)


def export_model(
    model: IntrospectiveNet,
    path: str | Path,
    fmt: str,
    *,
    image_size: int | None = None,
    opset: int | None = None,
) -> Path:
    """Export in ``fmt`` (``onnx`` or ``torchscript``) with a random ``image_size`` example."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if image_size is not None and image_size < 1:
        raise ExportError(f"image size must be positive, got {image_size}")
    if opset is not None and fmt != "onnx":
        raise ExportError("opset= applies to ONNX export only")
    example = example_input(model, image_size)
    if fmt == "onnx":
        return export_onnx(model, path, example, opset=opset)
    return export_torchscript(model, path, example)
