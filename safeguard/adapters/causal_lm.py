"""transformers causal language models (Llama, Qwen2, Mistral, Gemma, GPT-2, Phi...) and text-generation pipelines.

The adapter answers what a steering defense needs: the stack of decoder layers (found by module
discovery: the longest ``nn.ModuleList`` of identical blocks, or an explicit dotted path), the
module that owns it (the base model, which sees ``attention_mask`` and the KV cache), the
tokenizer, and how a user message is put into the model's chat format.

Example:
    >>> adapter = CausalLMAdapter(model, tokenizer=tok)  # doctest: +SKIP
    >>> path, layers = adapter.decoder_layers()  # doctest: +SKIP
    >>> path
    'model.layers'
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.errors import InvalidOptionError, UnsupportedPipelineError

KNOWN_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


def _get_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(dotted path, layers)`` of the decoder-layer stack of ``model``.

    Args:
        model: a causal LM.
        path: an explicit dotted path (e.g. ``"model.layers"``); ``None`` discovers it: a known
            path first, else the ``nn.ModuleList`` of identical blocks with the most parameters.

    Raises:
        InvalidOptionError: ``path`` does not name an ``nn.ModuleList`` of ``model``.
        UnsupportedPipelineError: no decoder stack was found.
    """
    if path is not None:
        mod = _get_module(model, path)
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise InvalidOptionError(
                f"layer_path={path!r} is not a non-empty nn.ModuleList of {type(model).__name__}; "
                f"module lists in this model: {lists[:8]}."
            )
        return path, mod
    for known in KNOWN_LAYER_PATHS:
        mod = _get_module(model, known)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return known, mod
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise UnsupportedPipelineError(
            f"found no decoder-layer stack in {type(model).__name__}; pass layer_path='<dotted path of the "
            "nn.ModuleList of decoder layers>' to wrap()."
        )
    return best[1], best[2]


def is_causal_lm(target: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(target, PreTrainedModel) and hasattr(target, "generate")


def is_text_generation_pipeline(target: Any) -> bool:
    try:
        from transformers import Pipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(target, Pipeline) and getattr(target, "task", "") == "text-generation"


class CausalLMAdapter:
    """Adapter of a transformers causal LM (or a text-generation pipeline around one)."""

    family: ClassVar[str] = "causal_lm"
    step_unit: ClassVar[str] = "forward passes"

    def __init__(self, target: Any, tokenizer: Any = None):
        if is_text_generation_pipeline(target):
            model = target.model
            tokenizer = tokenizer if tokenizer is not None else target.tokenizer
        elif is_causal_lm(target):
            model = target
        else:
            raise UnsupportedPipelineError(
                f"{type(target).__name__} is not a transformers causal LM or text-generation pipeline."
            )
        self.pipe = target
        self.model = model
        self.tokenizer = tokenizer
        self._layers: dict[str | None, tuple[str, nn.ModuleList]] = {}

    @property
    def pipeline_name(self) -> str:
        return type(self.pipe).__name__

    def make_monitor(self) -> Any:
        from ..core.generation_monitor import GenerationMonitor

        return GenerationMonitor(self)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(getattr(cfg, key, None), int):
                return int(getattr(cfg, key))
        raise UnsupportedPipelineError(f"cannot tell the hidden size of {type(self.model).__name__} from its config.")

    def decoder_layers(self, path: str | None = None) -> tuple[str, nn.ModuleList]:
        if path not in self._layers:
            self._layers[path] = find_decoder_layers(self.model, path)
        return self._layers[path]

    def layer_owner(self, path: str | None = None) -> nn.Module:
        """The module whose forward runs the decoder layers (sees ``attention_mask`` and the cache)."""
        full, _ = self.decoder_layers(path)
        parent = full.rpartition(".")[0]
        return self.model.get_submodule(parent) if parent else self.model

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the architecture a steering vector was read on."""
        cfg = self.model.config
        _, layers = self.decoder_layers()
        return {
            "model_type": getattr(cfg, "model_type", type(self.model).__name__),
            "hidden_size": self.hidden_size,
            "num_layers": len(layers),
            "name_or_path": str(getattr(cfg, "_name_or_path", "") or ""),
        }

    def require_tokenizer(self, why: str) -> Any:
        if self.tokenizer is None:
            raise InvalidOptionError(
                f"{why} needs the model's tokenizer; pass it: safeguard.wrap(model, tokenizer=tok, ...)."
            )
        return self.tokenizer

    def chat_prefix_ids(self) -> list[int] | None:
        """Token ids the chat template puts before every user message (system prompt, user header), or ``None``.

        ``None`` without a tokenizer or chat template, or when the template's text before the message does not
        tokenise to a prefix of a formatted message's ids (a merge across the boundary).
        """
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return None
        marker = "Zq7 request"
        text = self.chat_text(marker)
        if marker not in text:
            return None
        ids = tok(text[: text.index(marker)], add_special_tokens=False)["input_ids"]
        full = tok(text, add_special_tokens=False)["input_ids"]
        return list(ids) if ids and full[: len(ids)] == ids else None

    def chat_text(self, message: str) -> str:
        """``message`` as the model sees a user turn, ready for the assistant's reply."""
        tok = self.require_tokenizer("formatting prompts")
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
            )
        return message
