"""A trained model back from its checkpoint: the one loader every consumer uses (``idml.load``,
``idml eval``, ``idml export``, ``idml report``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from idml.core.checkpoint import load_checkpoint
from idml.core.config import RunConfig, config_from_dict
from idml.core.errors import CheckpointError, IdmlError
from idml.core.rundir import quiet
from idml.core.runtime import select_device
from idml.data.build import splits_from_config
from idml.data.registry import get_dataset
from idml.data.splits import labels_of, paths_of
from idml.evaluation.evaluator import evaluate_model, training_suspicion
from idml.method.model import IntrospectiveNet, model_from_config


@dataclass
class TrainedModel:
    """A model rebuilt from a ``checkpoint.pt`` with what the run recorded beside it."""

    model: IntrospectiveNet  #: on the CPU, in eval mode
    config: RunConfig  #: the run's config, as trained
    path: Path  #: the checkpoint file
    recorded: dict[str, Any]  #: metrics saved at training time (``{"final": {...}}``)


def load_trained(checkpoint: str | os.PathLike[str]) -> TrainedModel:
    """Rebuild the model of a ``checkpoint.pt`` written by ``idml train``.

    The file is checked whole (CRC of every entry) and read with ``weights_only``; a damaged,
    foreign or other-version file, or weights that do not fit the saved config, raise
    :class:`~idml.core.errors.CheckpointError` naming the file. Every weight comes from the
    file: no pretrained weights are fetched and no data set is read.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} lacks its 'config' or 'model' entry")
    cfg = config_from_dict(dict(ckpt["config"]), source=str(path))
    model = model_from_config(dataclasses.replace(cfg, pretrained="none"),
                              get_dataset(cfg.dataset).in_chans)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the configured model: {exc}"
        ) from exc
    return TrainedModel(model.eval(), cfg, path, dict(ckpt.get("metrics") or {}))


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str], device: str = "auto"
) -> tuple[dict[str, float], dict[str, float] | None, dict[str, Any]]:
    """Recompute the test metrics of a checkpoint on its run's data set.

    Returns ``(metrics, recorded, uncertainty)``: ``recorded`` are the final metrics saved at
    training time (``None`` if absent); ``uncertainty`` holds the risk-coverage report and the
    mixup ambiguity AUROC.
    """
    trained = load_trained(checkpoint)
    dev = select_device(device)
    splits = splits_from_config(trained.config, trained.model.input_spec, log=quiet)
    metrics, unc = evaluate_model(trained.model.to(dev), splits, trained.config, dev,
                                  ambiguity=True)
    return metrics, trained.recorded.get("final"), unc


@dataclass
class Suspect:
    """A training image whose label may be wrong (:func:`suspicious_training_images`)."""

    index: int  #: position in the training split
    path: str | None  #: its file (None for in-memory data such as the digits)
    label: int  #: the label training saw (a training class index)
    score: float  #: the score it was ranked by (larger = more suspect)
    knn_disagreement: float  #: fraction of its 10 nearest training images with another label
    centroid_distance: float  #: ``1 - cos`` to the mean embedding of its label's images
    uncertainty: float  #: ``||u||^2``


#: What :func:`suspicious_training_images` can rank by. ``knn_disagreement`` is the default:
#: it found 20 % flipped Flowers-102 labels with AUROC 0.98, ``||u||^2`` with ~0.5
#: (BENCHMARKS.md, "Uncertainty designs"): an image-only score cannot see a wrong label.
SUSPICION_SCORES = ("knn_disagreement", "centroid_distance", "uncertainty")


def suspicious_training_images(
    checkpoint: str | os.PathLike[str], top: int = 20, device: str = "auto",
    by: str = "knn_disagreement",
) -> list[Suspect]:
    """The ``top`` training images of a run ranked by ``by`` (one of
    :data:`SUSPICION_SCORES`; ties broken by the centroid distance), most suspect first."""
    return rank_training_suspects(load_trained(checkpoint), top, device, by)[0]


def rank_training_suspects(
    trained: TrainedModel, top: int, device: str = "auto", by: str = "knn_disagreement"
) -> tuple[list[Suspect], Any]:
    """:func:`suspicious_training_images` of a loaded run, with the training split it ranked
    (rebuilt as the run saw it: its classes, validation hold-out and any ``label_noise``,
    under the test-time transform)."""
    if by not in SUSPICION_SCORES:
        raise IdmlError(f"unknown suspicion score {by!r}; choose from "
                        f"{', '.join(SUSPICION_SCORES)}")
    dev = select_device(device)
    cfg = dataclasses.replace(trained.config, augment=False)
    train = splits_from_config(cfg, trained.model.input_spec, log=quiet).train
    scores = training_suspicion(trained.model.to(dev), train, cfg, dev)
    order = np.lexsort((-scores["centroid_distance"], -scores[by]))[:top]
    paths, labels = paths_of(train), labels_of(train)
    suspects = [Suspect(int(i), None if paths is None else paths[i], int(labels[i]),
                        float(scores[by][i]), *(float(scores[k][i]) for k in SUSPICION_SCORES))
                for i in order]
    return suspects, train
