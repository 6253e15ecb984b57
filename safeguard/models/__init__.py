"""Embedded default models: the ShapesWorld text-to-image pipeline and the MiniLM text encoder.

Attributes load lazily so ``import safeguard`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShapesWorldPipeline", "shapes_pipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
