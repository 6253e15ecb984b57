"""Adapters: one per model family, found from the pipeline's class."""

from __future__ import annotations

from typing import Any

from ..core.errors import UnsupportedPipelineError
from .base import PipelineAdapter
from .flux import FluxAdapter
from .sd import SDAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter

SUPPORTED = {
    "StableDiffusionPipeline": SDAdapter,
    "StableDiffusionXLPipeline": SDXLAdapter,
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
}


def get_adapter(target: Any) -> PipelineAdapter:
    """The adapter for ``target`` (a supported pipeline, or an adapter already).

    Raises:
        UnsupportedPipelineError: ``target`` is none of the supported classes (or subclasses).
    """
    if isinstance(target, PipelineAdapter):
        return target
    import diffusers

    for name, adapter_cls in SUPPORTED.items():
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(target, cls):
            return adapter_cls(target)
    raise UnsupportedPipelineError(
        f"cannot guard an object of type {type(target).__module__}.{type(target).__name__}: "
        f"supported pipelines are diffusers' {sorted(SUPPORTED)} (and their subclasses). "
        "Load one of those, e.g. StableDiffusionPipeline.from_pretrained(...), and wrap it."
    )


__all__ = ["SUPPORTED", "FluxAdapter", "PipelineAdapter", "SD3Adapter", "SDAdapter", "SDXLAdapter", "get_adapter"]
