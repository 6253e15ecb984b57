"""Adapters: one per model family, found from the pipeline's class."""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidOptionError, UnsupportedPipelineError
from .base import PipelineAdapter
from .causal_lm import CausalLMAdapter, is_causal_lm, is_text_generation_pipeline
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


def get_adapter(target: Any, tokenizer: Any = None) -> PipelineAdapter | CausalLMAdapter:
    """The adapter for ``target`` (a supported pipeline or causal LM, or an adapter already).

    Args:
        target: a diffusers pipeline, a transformers causal LM or ``pipeline("text-generation")``.
        tokenizer: the tokenizer of a causal LM (language models only).

    Raises:
        UnsupportedPipelineError: ``target`` is none of the supported classes (or subclasses).
        InvalidOptionError: ``tokenizer`` was given for a diffusion pipeline.
    """
    if isinstance(target, (PipelineAdapter, CausalLMAdapter)):
        return target
    if is_causal_lm(target) or is_text_generation_pipeline(target):
        return CausalLMAdapter(target, tokenizer=tokenizer)
    import diffusers

    for name, adapter_cls in SUPPORTED.items():
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(target, cls):
            if tokenizer is not None:
                raise InvalidOptionError(
                    f"tokenizer= is for language models; {type(target).__name__} brings its own tokenizers. "
                    "Drop the tokenizer argument."
                )
            return adapter_cls(target)
    raise UnsupportedPipelineError(
        f"cannot guard an object of type {type(target).__module__}.{type(target).__name__}: "
        f"supported are diffusers' {sorted(SUPPORTED)} (and their subclasses), transformers causal LMs "
        "(AutoModelForCausalLM) and transformers pipeline('text-generation'). Load one of those and wrap it."
    )


__all__ = [
    "SUPPORTED",
    "CausalLMAdapter",
    "FluxAdapter",
    "PipelineAdapter",
    "SD3Adapter",
    "SDAdapter",
    "SDXLAdapter",
    "get_adapter",
]
