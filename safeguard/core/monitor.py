"""Tracks pipeline calls and denoising steps from hooks alone (no patched ``__call__``).

A call starts when a text encoder runs after the previous call denoised, or when the denoiser's
timestep rises (a call made with ``prompt_embeds=``), or after the VAE decoder ran. Within a call,
``step`` counts denoiser forwards from 0. Listeners (the defenses) are told when a call starts so
they can reset their per-call state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .hooks import HookRegistry

logger = logging.getLogger(__name__)


def _timestep_value(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


def _batch_of(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 0


class MonitorBase:
    """What every call monitor shares: its hooks, the listeners told of a new call, the on/off
    switches (``enabled`` for :func:`safeguard.disabled`, ``bypass`` while safeguard itself runs
    the model) and the call and step counters."""

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self.hooks = HookRegistry("safeguard.monitor")
        self.listeners: list[Callable[[], None]] = []
        self.enabled = True  # False inside safeguard.disabled()
        self.bypass = 0  # >0 while safeguard itself runs the model (concept embeddings, look-ahead)
        self.calls = 0
        self.step = -1
        self.batch = 0
        self.guarded_call = True

    @property
    def active(self) -> bool:
        return self.enabled and self.bypass == 0

    def detach(self) -> None:
        self.hooks.remove_all()

    def _start_call(self) -> None:
        self.calls += 1
        self.step = -1
        self._on_call_start()
        self.guarded_call = self.enabled
        for fn in self.listeners:
            fn()

    def _on_call_start(self) -> None:
        """Reset subclass per-call tracking."""


class CallMonitor(MonitorBase):
    """Call and step tracking for one pipeline; owns the hooks that observe it."""

    def __init__(self, adapter: Any):
        super().__init__(adapter)
        self.phase = "idle"  # idle -> encoding -> denoising -> decoded
        self.last_t: float | None = None
        self.first_cond: torch.Tensor | None = None
        self.first_batch = 0
        self.cond_is_first = True

    def attach(self) -> CallMonitor:
        for i, enc in enumerate(self.adapter.text_encoders):
            self.hooks.forward_pre_hook(enc, f"text_encoder_{i}", self._on_encode, prepend=True)
        self.hooks.forward_pre_hook(self.adapter.denoiser, "denoiser", self._on_denoise, prepend=True)
        decoder = self.adapter.decoder
        if decoder is not None:
            self.hooks.forward_hook(decoder, "decoder", self._on_decode)
        return self

    def _on_call_start(self) -> None:
        self.last_t = None
        self.first_cond: torch.Tensor | None = None  # the pipeline's own conditioning at the first forward
        self.first_batch = 0
        self.cond_is_first = True

    def _note_conditioning(self, kwargs: dict) -> None:
        """Whether this forward gets the first forward's conditioning, as the pipeline passed it (before
        any defense edits it: this hook runs first). False on FLUX's separate negative pass; SD3's
        skip-layer-guidance pass has the same content but another batch (see ``first_batch``)."""
        ehs = kwargs.get("encoder_hidden_states")
        if not isinstance(ehs, torch.Tensor):
            self.cond_is_first = True
            return
        if self.step == 0 or self.first_cond is None:
            self.first_cond, self.first_batch, self.cond_is_first = ehs, int(ehs.shape[0]), True
            return
        first = self.first_cond
        self.cond_is_first = ehs is first or (ehs.shape == first.shape and torch.equal(ehs, first))

    def _on_encode(self, module, args, kwargs):
        if self.bypass:
            return None
        if self.phase in ("idle", "denoising", "decoded"):
            self._start_call()
        self.phase = "encoding"
        return None

    def _on_denoise(self, module, args, kwargs):
        if self.bypass:
            return None
        t = _timestep_value(args, kwargs)
        if self.phase in ("idle", "decoded") or (
            self.phase == "denoising" and t is not None and self.last_t is not None and t > self.last_t
        ):
            self._start_call()
        self.phase = "denoising"
        self.step += 1
        self.last_t = t
        self.batch = _batch_of(args, kwargs)
        self._note_conditioning(kwargs)
        return None

    def _on_decode(self, module, args, kwargs, output):
        if not self.bypass and self.phase == "denoising":
            self.phase = "decoded"
        return None


class bypassing:
    """Context manager: the monitor's and defenses' hooks pass through while safeguard itself runs
    the model (concept encoding, the look-ahead pass of ``repe``)."""

    def __init__(self, monitor: CallMonitor):
        self.monitor = monitor

    def __enter__(self) -> CallMonitor:
        self.monitor.bypass += 1
        return self.monitor

    def __exit__(self, *exc: object) -> None:
        self.monitor.bypass -= 1
