"""A trained model back from its checkpoint: the one loader every consumer uses (``idml.load``,
``idml eval``, ``idml export``, ``idml report``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idml.core.checkpoint import load_checkpoint
from idml.core.config import RunConfig, config_from_dict
from idml.core.errors import CheckpointError
from idml.core.rundir import quiet
from idml.core.runtime import select_device
from idml.data.build import splits_from_config
from idml.data.registry import get_dataset
from idml.evaluation.evaluator import evaluate_model
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
