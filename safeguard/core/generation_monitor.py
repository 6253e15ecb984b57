"""Tracks ``generate`` calls and forward passes of a causal LM from hooks alone.

One forward pre-hook on the module that owns the decoder layers (the base model) sees every
forward with its ``attention_mask`` and KV cache. A call starts on a forward with an empty cache,
unless it merely extends the previous forward's ``input_ids`` by one token (generation with
``use_cache=False``), so cached and uncached generation see the same call. Within a call,
``step`` counts forwards from 0 (the prefill). For each forward the monitor records what steering
hooks need: the absolute positions of the query tokens in the padded sequence, the index of each
row's first real token (left or right padding), and the prompt length of the call.
"""

from __future__ import annotations

from typing import Any

import torch

from .monitor import MonitorBase


def _past_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):  # legacy tuples
        return int(cache[0][0].shape[-2])
    return 0


def _cache_of(kwargs: dict) -> Any:
    """The KV cache a forward was given: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class GenerationMonitor(MonitorBase):
    """Call and forward tracking for one causal LM; owns the hook that observes it."""

    def __init__(self, adapter: Any):
        super().__init__(adapter)
        self.prompt_len = 0
        self.past = 0  # cached positions before this forward's tokens
        self.q = 0  # query tokens of this forward
        # the largest first-real-token index of the call's prefill, or None when a row had no real token there;
        # lets hooks tell on the host, without a device sync, that every query token lies after every row's first
        self.first_real_bound: int | None = None
        self._prev_ids: torch.Tensor | None = None
        self.batch = 0
        self._device = torch.device("cpu")
        self._mask: torch.Tensor | None = None
        self._derived: dict[str, torch.Tensor] = {}

    def attach(self) -> GenerationMonitor:
        owner = self.adapter.layer_owner()
        self.hooks.forward_pre_hook(owner, "base_model", self._on_forward, prepend=True)
        return self

    # Derived per-forward tensors are built lazily: decode steps of a cached generate usually need none of them,
    # so a guarded decode step pays no tensor op here.
    def _derive(self, name: str) -> torch.Tensor:
        if name not in self._derived:
            q, batch, device, mask = self.q, self.batch, self._device, self._mask
            if mask is not None:
                real = mask.to(torch.bool)
                tail = real[:, -q:]
                self._derived["first_real"] = real.to(torch.int8).argmax(dim=1)
                self._derived["last_real"] = q - 1 - tail.flip(1).to(torch.int8).argmax(dim=1)
            else:
                self._derived["first_real"] = torch.zeros(batch, dtype=torch.long, device=device)
                self._derived["last_real"] = torch.full((batch,), q - 1, dtype=torch.long, device=device)
            self._derived["positions"] = torch.arange(self.past, self.past + q, device=device)
        return self._derived[name]

    @property
    def positions(self) -> torch.Tensor:
        """``[q]`` absolute positions of this forward's tokens in the padded sequence."""
        return self._derive("positions")

    @property
    def first_real(self) -> torch.Tensor:
        """``[B]`` index of each row's first real token (left or right padding; 0 without a mask)."""
        return self._derive("first_real")

    @property
    def last_real(self) -> torch.Tensor:
        """``[B]`` index, within this forward, of each row's last real token."""
        return self._derive("last_real")

    def _continues_previous(self, ids: torch.Tensor | None) -> bool:
        prev = self._prev_ids
        return (
            ids is not None
            and prev is not None
            and ids.shape[0] == prev.shape[0]
            and ids.shape[1] == prev.shape[1] + 1
            and ids.device == prev.device
            and torch.equal(ids[:, :-1], prev)
        )

    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.bypass:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if isinstance(ids, torch.Tensor) else embeds
        if not isinstance(x, torch.Tensor):
            return None
        batch, q = int(x.shape[0]), int(x.shape[1])
        past = _past_length(_cache_of(kwargs))
        ids_t = ids if isinstance(ids, torch.Tensor) else None
        new_call = past == 0 and not self._continues_previous(ids_t)
        if new_call:
            self._start_call()
            self.prompt_len = q
        self._prev_ids = ids_t if past == 0 else None
        self.step += 1
        self.batch = batch
        self.past = past
        self.q = q
        self._device = x.device
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch else None
        self._derived = {}  # positions / first_real / last_real, built on first read
        if new_call:  # one host transfer per call
            if self._mask is not None:
                real = self._mask.to(torch.bool)
                bound, every_row_real = torch.stack([self.first_real.max(), real.any(dim=1).all().long()]).tolist()
                self.first_real_bound = int(bound) if every_row_real else None
            else:
                self.first_real_bound = 0
        return None
