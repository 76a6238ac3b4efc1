"""Where and how a run computes: device selection, mixed precision, seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from idml.core.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; ``cpu``, ``cuda[:N]``, ``mps`` are
    checked to exist here."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N "
                              "or mps") from exc
        mps = getattr(torch.backends, "mps", None)
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available()
            and (device.index is None or device.index < torch.cuda.device_count()),
            "mps": mps is not None and mps.is_available(),
        }
        if not available.get(device.type, True):
            raise ConfigError(f"device={name!r}: no such device on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``precision`` in fp32 | bf16 | fp16 (fp32: no autocast).

    The ISM and the losses' exp/log switch autocast off themselves and run in float32.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- seeds third-party code that uses the legacy API
    torch.manual_seed(seed)
