"""Image transforms: the paper's train/test transforms (for PIL images and uint8 tensors) and
batched random affine augmentation of in-memory images."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def test_crop_fraction(input_spec: dict[str, Any]) -> float:
    """Fraction of the resized test image that the centre crop keeps (timm's ``crop_pct``)."""
    return float(input_spec.get("crop_pct") or 0.875)


def build_transforms(input_spec: dict[str, Any], image_size: int, train: bool) -> v2.Compose:
    """The paper's augmentation, for PIL images or uint8 ``[C, H, W]`` tensors.

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip. Test: resize the short side to
    ``round(image_size / crop_pct)`` then centre-crop ``image_size`` (256 -> 224 at the
    default ``crop_pct`` 0.875). Then float in [0, 1] normalised with the spec's mean/std
    (and ``interpolation`` from the spec, default bilinear). A single-channel spec
    (``input_size[0] == 1``) gets grey inputs.
    """
    interpolation = _INTERPOLATIONS.get(
        str(input_spec.get("interpolation", "bilinear")), InterpolationMode.BILINEAR
    )
    steps: list[Any] = [v2.ToImage()]
    if train:
        steps += [
            v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        crop_pct = test_crop_fraction(input_spec)
        steps += [
            v2.Resize(round(image_size / crop_pct), interpolation=interpolation, antialias=True),
            v2.CenterCrop(image_size),
        ]
    if tuple(input_spec.get("input_size", (3,)))[0] == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(input_spec["mean"]), std=list(input_spec["std"])),
    ]
    return v2.Compose(steps)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    degrees: float = 10.0,
    translate: float = 0.125,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Batched random rotation / shift / zoom of in-memory images (one draw per image).

    For tensor data sets (the embedded digits) where per-image PIL transforms would cost more
    than the model; runs on the images' device. Parameters are drawn on the CPU ``generator``
    so runs are reproducible on any device.
    """
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * degrees)
    zoom = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    shift = (2 * u[:, 2:] - 1) * translate * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(images.device, images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        images, grid, padding_mode="border", align_corners=False
    )
