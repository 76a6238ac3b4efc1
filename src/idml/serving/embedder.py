"""Inference: a trained model that embeds images (``idml.load``), and embedding sets of
folders, manifests or a run's own data set.

>>> import idml
>>> embedder = idml.load("runs/flowers/checkpoint.pt")        # doctest: +SKIP
>>> semantic, uncertainty = embedder.embed(["a.jpg", "b.jpg"])  # doctest: +SKIP

:func:`load` rebuilds the model a checkpoint was trained with (never fetching pretrained
weights: every weight comes from the file) and returns an :class:`Embedder`. Its
:meth:`Embedder.embed` applies the model's test-time preprocessing and returns float32 NumPy
arrays: unit-norm semantic rows ``[N, D]`` and uncertainty rows ``[N, Du]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from idml import __version__
from idml.core.checkpoint import weights_fingerprint
from idml.core.config import RunConfig
from idml.core.errors import IdmlError
from idml.core.runtime import select_device
from idml.data.digits import DIGIT_NAMES, digit_path, load_digits_splits
from idml.data.images import io_threads, to_rgb, to_storage_mode
from idml.data.registry import get_dataset, resolve_root, test_transform
from idml.data.sources import Source, dataset_source
from idml.method.designs import LEGACY_DESIGN
from idml.method.metric import ISMParams, uncertainty_score
from idml.method.model import IntrospectiveNet
from idml.serving.embeddings import EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION, EmbeddingSet
from idml.serving.trained import load_trained

ImageInput = str | os.PathLike | Image.Image


class Embeddings(NamedTuple):
    """Output of :meth:`Embedder.embed`: float32 NumPy arrays, one row per image."""

    semantic: np.ndarray  #: ``[N, D]``, unit-norm rows
    uncertainty: np.ndarray  #: ``[N, Du]``, not normalised; ``||u||^2`` is the uncertainty


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
        raise IdmlError(f"image {path} cannot be read ({type(exc).__name__}: {exc})") from exc


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
        self.dataset = get_dataset(config.dataset)
        self.transform = test_transform(config.dataset, model.input_spec, config.image_size)
        self.fingerprint = fingerprint or weights_fingerprint(
            model.state_dict(), *self.preprocessing_key()
        )

    def preprocessing_key(self) -> tuple[Any, ...]:
        """Plain values that define the test-time preprocessing (part of the fingerprint)."""
        spec = self.model.input_spec
        # in-memory data sets have no image size of their own: their name stands for it
        size = self.dataset.name if self.dataset.in_memory else self.config.image_size
        key = (size, tuple(spec["input_size"]), tuple(spec["mean"]), tuple(spec["std"]),
               spec.get("interpolation"), spec.get("crop_pct"))
        # The uncertainty design changes what ||u||^2 means, so it is part of the identity;
        # the legacy design is left out, so indexes made before designs still match.
        return key if self.config.design == LEGACY_DESIGN else (*key, self.config.design)

    @property
    def semantic_dim(self) -> int:
        """Size ``D`` of the semantic embedding."""
        return int(self.model.semantic_head.out_features)

    @property
    def uncertainty_dim(self) -> int:
        """Size ``Du`` of the uncertainty embedding."""
        return self.model.uncertainty_dim

    @property
    def ism(self) -> ISMParams:
        """The ISM constants the model was trained with: ``a``, ``b``, ``beta``."""
        return ISMParams.from_config(self.config)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (path or PIL) as the float ``[C, H, W]`` tensor the model takes.

        Images are made RGB (grey replicated, transparency over white, as in training), then
        go through the data set's test transform (:func:`idml.data.registry.test_transform`).
        """
        img = _read_image(image)
        return self.transform(to_rgb(img))

    def _batches(
        self, images: Sequence[ImageInput] | torch.Tensor | np.ndarray, batch_size: int
    ) -> Iterator[torch.Tensor]:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if torch.is_tensor(images):
            want = tuple(self.model.input_spec["input_size"])[0]
            if images.ndim != 4 or images.shape[1] != want or not images.is_floating_point():
                raise IdmlError(
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
            raise IdmlError(f"batch_size must be >= 1, got {batch_size}")
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
        """Per-image uncertainty ``||u||^2`` (float32 NumPy ``[N]``): the one
        :func:`idml.method.metric.uncertainty_score` on NumPy or tensor input."""
        u = uncertainty if torch.is_tensor(uncertainty) else torch.from_numpy(
            np.asarray(uncertainty))
        return uncertainty_score(u.detach()).cpu().numpy().astype(np.float32)

    def __repr__(self) -> str:
        return (f"Embedder({self.config.backbone}, D={self.semantic_dim}, "
                f"Du={self.uncertainty_dim}, fingerprint={self.fingerprint}, "
                f"device={self.device})")


def load(
    checkpoint: str | os.PathLike, device: str = "auto", batch_size: int | None = None
) -> Embedder:
    """Rebuild the model of a ``checkpoint.pt`` written by ``idml train`` for inference.

    See :func:`idml.serving.trained.load_trained` (CRC-checked, ``weights_only``, nothing
    downloaded); ``device``: auto, cpu, cuda, cuda:N or mps.
    """
    trained = load_trained(checkpoint)
    return Embedder(trained.model, trained.config, checkpoint=str(trained.path),
                    device=select_device(device), batch_size=batch_size)




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
        "ism": embedder.ism.as_dict(),
        **extra,
    }


# ----------------------------------------------------------------------------------------------
# Embedding sources (:mod:`idml.data.sources`) and a checkpoint's own data set


def embed_source(
    embedder: Embedder, images: Source, batch_size: int | None = None, **meta: Any
) -> EmbeddingSet:
    """Embed every image of ``images``; ``meta`` adds fields (e.g. ``source``) to the
    set's metadata. Paths are recorded absolute (resolved now, against the current folder),
    so the file, its index and ``idml serve`` find the images from any folder."""
    semantic, uncertainty = embedder.embed(images.paths, batch_size=batch_size)
    return EmbeddingSet(
        semantic=semantic,
        uncertainty=uncertainty,
        paths=np.array([os.path.abspath(p) for p in images.paths], dtype=str).reshape(-1),
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
    if embedder.dataset.in_memory:  # the embedded digits
        spec = embedder.model.input_spec
        splits = load_digits_splits(tuple(spec["mean"]), tuple(spec["std"]), 0.0, False)
        data = {"train": splits.train, "test": splits.test}.get(split)
        if data is None:
            raise IdmlError(f"the digits data set has no {split!r} split; use train or test")
        semantic, uncertainty = embedder.embed(data.images, batch_size=batch_size)
        paths = [digit_path(split, i) for i in range(len(data))]
        source = Source(paths, [int(y) for y in data.labels], DIGIT_NAMES)
        return EmbeddingSet(
            semantic, uncertainty, np.array(paths, dtype=str),
            np.asarray(source.labels, dtype=np.int64),
            make_meta(embedder, len(paths), class_names=source.class_names,
                      source=f"digits:{split}"),
        )
    root, csv = resolve_root(cfg.dataset, cfg.data_root, cfg.csv)
    source = dataset_source(cfg.dataset, root, split, train_classes=cfg.train_classes, csv=csv)
    return embed_source(embedder, source, batch_size,
                        source=f"{cfg.dataset}:{root}:{split}")
