"""idml: Introspective Deep Metric Learning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]

if TYPE_CHECKING:
    from idml.serving.embedder import load


def __getattr__(name: str) -> Any:
    # ``idml.load`` imports torch and timm on first use, so ``import idml`` stays light.
    if name == "load":
        from idml.serving.embedder import load

        return load
    raise AttributeError(f"module 'idml' has no attribute {name!r}")
