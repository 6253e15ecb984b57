"""Embedded default models: the ShapesWorld text-to-image pipeline, the MiniLM text encoder and SmolLM2.

Attributes load lazily so ``import safeguard`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShapesWorldPipeline", "shapes_pipeline", "smollm2"]


def __getattr__(name: str) -> Any:
    if name == "smollm2":
        from .smollm import smollm2

        return smollm2
    if name in __all__:
        from . import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
