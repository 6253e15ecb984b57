"""What a defense needs to know about a pipeline, answered once per model family.

A defense never asks which family it is on; it asks the adapter: where are the text encoders,
the denoiser and the decoder; is classifier-free guidance batched, and is it on for this call;
which denoiser keyword arguments carry the text conditioning; how is a text encoded into that
conditioning.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

Path = tuple[str, ...]  # a path into the denoiser's kwargs, e.g. ("added_cond_kwargs", "text_embeds")
Condition = dict[Path, torch.Tensor]  # text conditioning for one row: path -> tensor with batch dim 1


def get_path(kwargs: dict, path: Path) -> Any:
    cur: Any = kwargs
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def set_path(kwargs: dict, path: Path, value: Any) -> dict:
    """A copy of ``kwargs`` with ``path`` set to ``value`` (nested dicts copied, never mutated)."""
    out = dict(kwargs)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = set_path(dict(out.get(path[0]) or {}), path[1:], value)
    return out


class PipelineAdapter:
    """Base adapter of a diffusers text-to-image pipeline."""

    family: ClassVar[str] = ""
    cond_paths: ClassVar[tuple[Path, ...]] = (("encoder_hidden_states",),)
    cfg_batched: ClassVar[bool] = True  # guidance runs [negative; positive] in one denoiser batch
    # How the text encoders' token states make up ``encoder_hidden_states``: groups of encoder
    # attribute names, concatenated along features within a group (zero-padded to the full width)
    # and along the sequence between groups.
    text_layout: ClassVar[tuple[tuple[str, ...], ...]] = (("text_encoder",),)
    # Where a pooled text embedding goes (a path into the denoiser kwargs) and which encoders'
    # pooled outputs it concatenates along features; None when the denoiser takes none.
    pooled_layout: ClassVar[tuple[Path, tuple[str, ...]] | None] = None

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self._empty: Condition | None = None

    def make_monitor(self) -> Any:
        from ..core.monitor import CallMonitor

        return CallMonitor(self)

    @property
    def pipeline_name(self) -> str:
        return type(self.pipe).__name__

    # ---------------------------------------------------------------- modules
    @property
    def denoiser(self) -> nn.Module:
        unet = getattr(self.pipe, "unet", None)
        return unet if unet is not None else self.pipe.transformer

    @property
    def text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for n in names if isinstance(m := getattr(self.pipe, n, None), nn.Module)]

    def conditioning_encoders(self) -> list[str]:
        """Names of the text encoders whose outputs reach the denoiser (``text_layout``, then pooled-only ones)."""
        names = [n for group in self.text_layout for n in group]
        if self.pooled_layout is not None:
            names += [n for n in self.pooled_layout[1] if n not in names]
        return [n for n in names if self.encoder_by_name(n) is not None]

    def encoder_by_name(self, name: str) -> nn.Module | None:
        m = getattr(self.pipe, name, None)
        return m if isinstance(m, nn.Module) else None

    def tokenizer_for(self, encoder_name: str) -> Any:
        """The tokenizer that feeds the text encoder attribute ``encoder_name``."""
        return getattr(self.pipe, encoder_name.replace("text_encoder", "tokenizer"), None)

    @property
    def decoder(self) -> nn.Module | None:
        vae = getattr(self.pipe, "vae", None)
        return getattr(vae, "decoder", None)

    def modules(self) -> list[nn.Module]:
        """Every torch module of the pipeline (for hook audits)."""
        return [m for m in self.pipe.components.values() if isinstance(m, nn.Module)]

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    # ---------------------------------------------------------------- guidance
    def cfg_active(self) -> bool:
        """Whether the current call batches classifier-free guidance as [negative; positive]."""
        if not self.cfg_batched:
            return False
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:  # property read before any call set _guidance_scale
            return False

    # ---------------------------------------------------------------- text
    @property
    def tokenizers(self) -> list:
        names = ("tokenizer", "tokenizer_2", "tokenizer_3")
        return [t for n in names if (t := getattr(self.pipe, n, None)) is not None]

    def truncation(self, text: str) -> list[tuple[str, int, int]]:
        """``(tokenizer name, tokens needed, tokens kept)`` for each tokenizer that would cut ``text``."""
        out = []
        for tok in self.tokenizers:
            limit = getattr(tok, "model_max_length", None)
            if not isinstance(limit, int) or limit > 100_000:
                continue
            n = len(tok(text, add_special_tokens=True).input_ids)
            if n > limit:
                out.append((type(tok).__name__, n, limit))
        return out

    def _encode(self, text: str, negative: str | None = None) -> tuple[Condition, Condition]:
        """(positive, negative) conditioning of one row, as the pipeline itself encodes them."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_condition(self, text: str) -> Condition:
        """Conditioning the denoiser would get for the prompt ``text`` (batch 1)."""
        return self._encode(text)[0]

    @torch.no_grad()
    def empty_condition(self) -> Condition:
        """Conditioning of the negative branch when the user gives no negative prompt (cached)."""
        if self._empty is None:
            self._empty = self._encode("", None)[1]
        return self._empty
