"""Inference: load a trained checkpoint, embed images, and read/write embedding files.

>>> import idml
>>> embedder = idml.load("runs/flowers/checkpoint.pt")        # doctest: +SKIP
>>> semantic, uncertainty = embedder.embed(["a.jpg", "b.jpg"])  # doctest: +SKIP

:func:`load` rebuilds the model a checkpoint was trained with (never fetching pretrained
weights: every weight comes from the file) and returns an :class:`Embedder`. Its
:meth:`Embedder.embed` applies the model's test-time preprocessing and returns float32 NumPy
arrays: unit-norm semantic rows ``[N, D]`` and uncertainty rows ``[N, Du]``.

An embeddings file (:func:`save_embeddings` / :func:`load_embeddings`) is an ``.npz`` readable
with ``allow_pickle=False``: ``semantic`` float32 ``[N, D]``, ``uncertainty`` float32
``[N, Du]``, ``paths`` unicode ``[N]``, ``labels`` int64 ``[N]`` (-1 = unknown) and ``meta``, a
JSON string (format ``idml-embeddings``, version 1, the model fingerprint, the checkpoint,
the dimensions, the idml version, the class names of the labels where known).
"""

from __future__ import annotations

import csv as csv_module
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from idml import __version__
from idml.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    weights_fingerprint,
)
from idml.core.config import RunConfig, config_from_dict
from idml.data.images import build_transforms, to_rgb, to_storage_mode
from idml.data.readers import IMAGE_SUFFIXES, io_threads
from idml.evaluation.uncertainty import uncertainty_score as _uncertainty_score
from idml.method.model import IntrospectiveNet

EMBEDDINGS_FORMAT = "idml-embeddings"
EMBEDDINGS_VERSION = 1
#: Tolerance on ``||s|| = 1`` when an embeddings file is validated.
UNIT_TOLERANCE = 1e-3

ImageInput = str | os.PathLike | Image.Image


class EmbeddingsError(ValueError):
    """An embeddings file (or array set) that cannot be used; the message names the file."""


class Embeddings(NamedTuple):
    """Output of :meth:`Embedder.embed`: float32 NumPy arrays, one row per image."""

    semantic: np.ndarray  #: ``[N, D]``, unit-norm rows
    uncertainty: np.ndarray  #: ``[N, Du]``, not normalised; ``||u||^2`` is the uncertainty


def uncertainty_score(uncertainty: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image uncertainty ``||u||^2`` (float32 ``[N]``; larger = more ambiguous)."""
    u = uncertainty if torch.is_tensor(uncertainty) else torch.from_numpy(np.asarray(uncertainty))
    return _uncertainty_score(u).cpu().numpy().astype(np.float32)


def _digits_transform(spec: dict[str, Any]) -> Any:
    """PIL image -> normalised ``[C, 8, 8]`` as the embedded digits are fed to the model.

    scikit-learn's digits are 32x32 bitmaps counted in 4x4 blocks (0..16, ink high), scaled
    to [0, 1] by :func:`idml.data.splits.load_digits_splits`: the image is converted to grey,
    reduced to 8x8 by area averaging (``BOX``) and 0..255 is scaled to [0, 1], so light strokes on a
    dark background (as the data set stores them) map to high values. No inversion.
    """
    chans, height, width = tuple(spec["input_size"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(-1, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:
        grey = to_storage_mode(img).convert("L").resize((width, height), Image.Resampling.BOX)
        x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0).unsqueeze(0)
        return (x.expand(chans, -1, -1) - mean) / std

    return transform


def _read_image(item: ImageInput) -> Image.Image:
    """A decoded PIL image; an unreadable path raises ``ValueError`` naming the file."""
    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    try:
        with Image.open(path) as img:
            img.load()
            return to_storage_mode(img)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ValueError(f"image {path} cannot be read ({type(exc).__name__}: {exc})") from exc


class Embedder:
    """A trained IDML model ready to embed images (see :func:`load`).

    Attributes: ``model`` (eval mode, on ``device``), ``config`` (the checkpoint's
    :class:`~idml.core.config.RunConfig`), ``checkpoint`` (its path), ``fingerprint`` (16 hex digits
    identifying the weights and test-time preprocessing), ``batch_size``.
    """

    def __init__(
        self,
        model: IntrospectiveNet,
        config: RunConfig,
        *,
        checkpoint: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.checkpoint = checkpoint
        self.batch_size = batch_size or config.eval_batch_size
        self.is_digits = config.dataset == "digits"
        spec = model.input_spec
        if self.is_digits:
            self.transform = _digits_transform(spec)
        else:
            self.transform = build_transforms(spec, config.image_size, train=False)
        self.fingerprint = fingerprint or weights_fingerprint(
            model.state_dict(), *self.preprocessing_key()
        )

    def preprocessing_key(self) -> tuple[Any, ...]:
        """Plain values that define the test-time preprocessing (part of the fingerprint)."""
        spec = self.model.input_spec
        size = "digits" if self.is_digits else self.config.image_size
        return (size, tuple(spec["input_size"]), tuple(spec["mean"]), tuple(spec["std"]),
                spec.get("interpolation"), spec.get("crop_pct"))

    @property
    def semantic_dim(self) -> int:
        """Size ``D`` of the semantic embedding."""
        return int(self.model.semantic_head.out_features)

    @property
    def uncertainty_dim(self) -> int:
        """Size ``Du`` of the uncertainty embedding."""
        return int(self.model.uncertainty_head.out_features)

    @property
    def ism_params(self) -> dict[str, Any]:
        """The ISM constants the model was trained with: ``a``, ``b``, ``beta``."""
        return {"a": self.config.ism_a, "b": self.config.ism_b, "beta": self.config.ism_beta}

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (path or PIL) as the float ``[C, H, W]`` tensor the model takes.

        Image models get RGB (grey replicated, transparency over white, as in training);
        the digits model gets grey.
        """
        img = _read_image(image)
        return self.transform(img if self.is_digits else to_rgb(img))

    def _batches(
        self, images: Sequence[ImageInput] | torch.Tensor | np.ndarray, batch_size: int
    ) -> Iterator[torch.Tensor]:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if torch.is_tensor(images):
            want = tuple(self.model.input_spec["input_size"])[0]
            if images.ndim != 4 or images.shape[1] != want or not images.is_floating_point():
                raise ValueError(
                    f"a tensor input must be preprocessed float [B, {want}, H, W], "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            for start in range(0, len(images), batch_size):
                yield images[start : start + batch_size].float()
            return
        if isinstance(images, str | os.PathLike | Image.Image):
            raise TypeError("embed() takes a list of images, not a single image")
        items = list(images)
        workers = min(io_threads(), batch_size)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                yield torch.stack(list(pool.map(self.preprocess, chunk)))

    @torch.no_grad()
    def embed(
        self,
        images: Sequence[ImageInput] | torch.Tensor | np.ndarray,
        batch_size: int | None = None,
    ) -> Embeddings:
        """Embed images: a list of paths and/or PIL images, or a preprocessed ``[B, C, H, W]``.

        Returns :class:`Embeddings` of float32 NumPy arrays (``semantic`` unit rows,
        ``uncertainty``). Runs in eval mode, float32, ``batch_size`` images at a time. An
        unreadable path raises ``ValueError`` naming the file.
        """
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model.eval()
        sem, unc = [], []
        for batch in self._batches(images, batch_size):
            s, u = self.model(batch.to(self.device))
            sem.append(s.float().cpu().numpy())
            unc.append(u.float().cpu().numpy())
        if not sem:
            return Embeddings(
                np.zeros((0, self.semantic_dim), np.float32),
                np.zeros((0, self.uncertainty_dim), np.float32),
            )
        return Embeddings(np.concatenate(sem), np.concatenate(unc))

    @staticmethod
    def uncertainty_score(uncertainty: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per-image uncertainty ``||u||^2`` (float32 ``[N]``)."""
        return uncertainty_score(uncertainty)

    def __repr__(self) -> str:
        return (f"Embedder({self.config.backbone}, D={self.semantic_dim}, "
                f"Du={self.uncertainty_dim}, fingerprint={self.fingerprint}, "
                f"device={self.device})")


def trained_model(checkpoint: str | os.PathLike) -> tuple[IntrospectiveNet, RunConfig]:
    """The trained model of a ``checkpoint.pt`` (CPU) and its config (``pretrained="none"``).

    The file is checked whole (CRC of every entry) and read with ``weights_only``: a damaged,
    foreign or other-version file raises :class:`~idml.core.checkpoint.CheckpointError` naming it;
    weights that do not fit the saved config raise ``ValueError``. Nothing is downloaded and
    no data set is read.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} lacks its 'config' or 'model' entry")
    cfg = config_from_dict(dict(ckpt["config"]), source=str(path))
    from idml.training.run import model_from_config

    cfg = dataclasses.replace(cfg, pretrained="none")
    model = model_from_config(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {path}: weights do not fit the configured model: {exc}"
        ) from exc
    return model, cfg


def load(
    checkpoint: str | os.PathLike, device: str = "auto", batch_size: int | None = None
) -> Embedder:
    """Rebuild the model of a ``checkpoint.pt`` written by ``idml train`` for inference.

    The file is checked whole (CRC of every entry) and read with ``weights_only``: a damaged,
    foreign or other-version file raises :class:`~idml.core.checkpoint.CheckpointError` naming it;
    weights that do not fit the saved config raise ``ValueError``. No pretrained weights are
    fetched. ``device``: auto, cpu, cuda, cuda:N or mps.
    """
    from idml.training.run import select_device

    path = Path(checkpoint)
    model, cfg = trained_model(path)
    return Embedder(model, cfg, checkpoint=str(path), device=select_device(device),
                    batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# Embedding sets and files


@dataclasses.dataclass
class EmbeddingSet:
    """Embeddings of a collection of images with their paths, labels and metadata."""

    semantic: np.ndarray  #: float32 ``[N, D]``, unit rows
    uncertainty: np.ndarray  #: float32 ``[N, Du]``
    paths: np.ndarray  #: unicode ``[N]``
    labels: np.ndarray  #: int64 ``[N]``, -1 = unknown
    meta: dict[str, Any]  #: format, version, fingerprint, checkpoint, dims, idml_version, ...

    def __len__(self) -> int:
        return len(self.semantic)

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the model that made the embeddings."""
        return self.meta.get("fingerprint")

    def validate(self, source: str = "embeddings") -> EmbeddingSet:
        """Raise :class:`EmbeddingsError` (naming ``source``) if the arrays are inconsistent."""
        s, u, p, y = self.semantic, self.uncertainty, self.paths, self.labels
        checks = [
            (s.dtype == np.float32 and s.ndim == 2, f"semantic must be float32 [N, D], got "
                                                    f"{s.dtype} {s.shape}"),
            (u.dtype == np.float32 and u.ndim == 2, f"uncertainty must be float32 [N, Du], got "
                                                    f"{u.dtype} {u.shape}"),
            (p.dtype.kind == "U" and p.ndim == 1, f"paths must be a unicode [N] array, got "
                                                  f"{p.dtype} {p.shape}"),
            (y.dtype == np.int64 and y.ndim == 1, f"labels must be int64 [N], got "
                                                  f"{y.dtype} {y.shape}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EmbeddingsError(f"{source}: {message}")
        counts = {len(s), len(u), len(p), len(y)}
        if len(counts) != 1:
            raise EmbeddingsError(
                f"{source}: row counts differ (semantic {len(s)}, uncertainty {len(u)}, "
                f"paths {len(p)}, labels {len(y)})"
            )
        if not (np.isfinite(s).all() and np.isfinite(u).all()):
            raise EmbeddingsError(f"{source}: embeddings contain NaN or Inf")
        if len(s) and np.abs(np.linalg.norm(s, axis=1) - 1.0).max() > UNIT_TOLERANCE:
            raise EmbeddingsError(f"{source}: semantic rows are not unit vectors")
        if self.meta.get("format") != EMBEDDINGS_FORMAT:
            raise EmbeddingsError(f"{source}: not an idml embeddings file (meta format "
                                  f"{self.meta.get('format')!r})")
        if self.meta.get("version") != EMBEDDINGS_VERSION:
            raise EmbeddingsError(f"{source}: embeddings version {self.meta.get('version')!r}; "
                                  f"this idml reads {EMBEDDINGS_VERSION}")
        dims = (self.meta.get("semantic_dim"), self.meta.get("uncertainty_dim"))
        if dims != (s.shape[1], u.shape[1]):
            raise EmbeddingsError(f"{source}: meta says dims {dims}, arrays have "
                                  f"{(s.shape[1], u.shape[1])}")
        return self


def make_meta(embedder: Embedder, count: int, **extra: Any) -> dict[str, Any]:
    """The ``meta`` of an embeddings file made by ``embedder``."""
    return {
        "format": EMBEDDINGS_FORMAT,
        "version": EMBEDDINGS_VERSION,
        "fingerprint": embedder.fingerprint,
        "checkpoint": embedder.checkpoint,
        "semantic_dim": embedder.semantic_dim,
        "uncertainty_dim": embedder.uncertainty_dim,
        "count": count,
        "idml_version": __version__,
        "backbone": embedder.config.backbone,
        "ism": embedder.ism_params,
        **extra,
    }


def save_embeddings(path: str | os.PathLike, embeddings: EmbeddingSet) -> Path:
    """Validate and write ``embeddings`` to ``path`` (``.npz``) atomically."""
    path = Path(path)
    embeddings.validate(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                semantic=embeddings.semantic,
                uncertainty=embeddings.uncertainty,
                paths=embeddings.paths,
                labels=embeddings.labels,
                meta=np.array(json.dumps(embeddings.meta)),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_embeddings(path: str | os.PathLike) -> EmbeddingSet:
    """Read and validate an embeddings file; any problem raises :class:`EmbeddingsError`."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file {path} does not exist")
    keys = ("semantic", "uncertainty", "paths", "labels", "meta")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise EmbeddingsError(f"embeddings file {path} lacks {', '.join(missing)}")
            arrays = {k: data[k] for k in keys}
    except EmbeddingsError:
        raise
    except Exception as exc:  # zipfile, pickle refusal, truncated data, ...
        raise EmbeddingsError(
            f"cannot read embeddings file {path}: not an idml embeddings file or damaged "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise EmbeddingsError(f"embeddings file {path}: meta is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise EmbeddingsError(f"embeddings file {path}: meta is not a JSON object")
    return EmbeddingSet(meta=meta, **arrays).validate(f"embeddings file {path}")


# ----------------------------------------------------------------------------------------------
# Sources: folders, CSV manifests, a checkpoint's own data set


@dataclasses.dataclass
class Source:
    """Images to embed: paths, int labels (-1 unknown) and the class names of the labels."""

    paths: list[str]
    labels: list[int]
    class_names: list[str] | None = None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
    if not found:
        raise ValueError(f"{root} holds no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def collect_images(items: Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from a mix of files and folders (folders are listed recursively)."""
    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(str(p) for p in list_images(path))
        elif path.is_file():
            paths.append(str(path))
        else:
            raise ValueError(f"query {path} does not exist")
    if not paths:
        raise ValueError("no query images given")
    return paths


def folder_source(folder: str | os.PathLike) -> Source:
    """Every image under ``folder``; the label of an image is its top-level subfolder.

    Class ids are positions in the sorted subfolder names (stored as ``class_names``); images
    directly in ``folder`` get -1 (a flat folder is unlabelled). A single wrapper folder
    without images of its own (``flowers102/images/<class>/``) is descended into.
    """
    root = Path(folder)
    paths = list_images(root)
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and not any(_is_image(p) for p in root.iterdir()):
        root = subdirs[0]
    tops = [p.relative_to(root).parts for p in paths]
    names = sorted({parts[0] for parts in tops if len(parts) > 1})
    ids = {name: i for i, name in enumerate(names)}
    labels = [ids[parts[0]] if len(parts) > 1 else -1 for parts in tops]
    return Source([str(p) for p in paths], labels, names or None)


def csv_source(manifest: str | os.PathLike) -> Source:
    """A CSV manifest with a ``path`` column and optionally ``label`` (other columns ignored).

    Relative paths are relative to the manifest's folder. Labels are names mapped to ids in
    sorted order (numeric order when all are integers); an empty label is -1.
    """
    manifest = Path(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv_module.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns:
                raise ValueError(f"{manifest}:1: header lacks a 'path' column; expected "
                                 f"'path,label', got {','.join(columns) or 'an empty file'!r}")
            reader.fieldnames = columns
            rows = []
            for row in reader:
                at = f"{manifest}:{reader.line_num}"
                text = (row.get("path") or "").strip()
                if not text:
                    raise ValueError(f"{at}: field 'path' is empty")
                path = Path(text).expanduser()
                path = path if path.is_absolute() else manifest.parent / path
                if not path.is_file():
                    raise ValueError(f"{at}: image {path} does not exist")
                rows.append((str(path), (row.get("label") or "").strip()))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{manifest} is not a UTF-8 CSV file ({exc})") from exc
    if not rows:
        raise ValueError(f"{manifest}: no rows after the header")
    named = {label for _, label in rows if label}
    try:
        names = sorted(named, key=int)
    except ValueError:
        names = sorted(named)
    ids = {name: i for i, name in enumerate(names)}
    return Source([p for p, _ in rows], [ids[y] if y else -1 for _, y in rows], names or None)


def read_source(source: str | os.PathLike) -> Source:
    """A folder (see :func:`folder_source`) or a ``.csv`` manifest (see :func:`csv_source`)."""
    path = Path(source)
    if path.is_dir():
        return folder_source(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return csv_source(path)
    if not path.exists():
        raise ValueError(f"source {path} does not exist")
    raise ValueError(f"source {path} is neither a folder of images nor a .csv manifest")


def embed_source(
    embedder: Embedder, images: Source, batch_size: int | None = None, **meta: Any
) -> EmbeddingSet:
    """Embed every image of ``images``; ``meta`` adds fields (e.g. ``source``) to the
    set's metadata."""
    semantic, uncertainty = embedder.embed(images.paths, batch_size=batch_size)
    return EmbeddingSet(
        semantic=semantic,
        uncertainty=uncertainty,
        paths=np.array(images.paths, dtype=str).reshape(-1),
        labels=np.asarray(images.labels, dtype=np.int64).reshape(-1),
        meta=make_meta(embedder, len(semantic), class_names=images.class_names, **meta),
    )


def embed_split(
    embedder: Embedder, split: str = "test", batch_size: int | None = None
) -> EmbeddingSet:
    """Embed a split of the checkpoint's own data set, at test-time preprocessing.

    Image data sets are read from their configured ``data_root`` (paths and the data set's
    own class ids); the embedded digits get ``digits/<split>/<index>`` as paths and their
    digit as label (``train`` without the rotated copies).
    """
    cfg = embedder.config
    if cfg.dataset == "digits":
        from idml.data.splits import load_digits_splits

        spec = embedder.model.input_spec
        splits = load_digits_splits(tuple(spec["mean"]), tuple(spec["std"]), 0.0, False)
        data = {"train": splits.train, "test": splits.test}.get(split)
        if data is None:
            raise ValueError(f"the digits data set has no {split!r} split; use train or test")
        semantic, uncertainty = embedder.embed(data.images, batch_size=batch_size)
        paths = [f"digits/{split}/{i:04d}" for i in range(len(data))]
        source = Source(paths, [int(y) for y in data.labels], [str(d) for d in range(10)])
        return EmbeddingSet(
            semantic, uncertainty, np.array(paths, dtype=str),
            np.asarray(source.labels, dtype=np.int64),
            make_meta(embedder, len(paths), class_names=source.class_names,
                      source=f"digits:{split}"),
        )
    from idml.data.readers import read_dataset

    root, csv = cfg.data_root, cfg.csv
    if root is None and cfg.dataset == "csv" and csv is not None:
        root, csv = csv, None
    if root is None:
        raise ValueError(f"the checkpoint's {cfg.dataset!r} data set has no data_root")
    dataset = read_dataset(cfg.dataset, root, train_classes=cfg.train_classes, csv=csv)
    parts = dataset.parts()
    if split not in parts:
        raise ValueError(f"the {cfg.dataset} data set at {root} has no {split!r} split "
                         f"(it has {', '.join(parts)})")
    records = parts[split]
    names = dataset.class_names
    class_names = None
    if names and all(isinstance(k, int) and k >= 0 for k in names):
        class_names = [str(names.get(i, i)) for i in range(max(names) + 1)]
    source = Source([str(p) for p in records.paths], list(records.labels), class_names)
    return embed_source(embedder, source, batch_size,
                        source=f"{cfg.dataset}:{root}:{split}")
