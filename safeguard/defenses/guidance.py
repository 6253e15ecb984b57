"""Shared mechanics of guidance-side defenses: extra denoiser rows and concept conditioning.

Diffusers pipelines with classifier-free guidance call the denoiser once per step on a batch
``[negative rows (B); positive rows (B)]`` and combine the two halves themselves. A guidance-side
defense may (a) replace the text conditioning of some rows, and (b) append rows of its own in a
forward pre-hook, then read them and drop them in the forward hook, so the pipeline sees exactly
the ``2B`` rows it asked for and its own guidance formula does the rest.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..adapters.base import Condition, Path, get_path, set_path
from ..core.errors import IncompatibleMethodError
from ..core.monitor import bypassing


def concept_text(concepts: Sequence[Any]) -> str:
    """The single text a prompt-level defense encodes for a set of concepts."""
    return ", ".join(c.text for c in concepts)


def sample_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("sample", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    raise KeyError("denoiser input not found in args or kwargs")


def _map_batch(obj: Any, batch: int, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.ndim > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _map_batch(v, batch, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_batch(v, batch, fn) for v in obj)
    return obj


def append_rows(
    args: tuple, kwargs: dict, rows: Sequence[int], cond: Condition, paths: Sequence[Path]
) -> tuple[tuple, dict]:
    """Append copies of ``rows`` to every batch-sized input, with text conditioning set to ``cond``."""
    n = sample_of(args, kwargs).shape[0]
    idx = torch.as_tensor(list(rows), dtype=torch.long)

    def extend(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x[idx.to(x.device)]], dim=0)

    new_args = _map_batch(args, n, extend)
    new_kwargs = _map_batch(kwargs, n, extend)
    for path in paths:
        x = get_path(kwargs, path)
        new_kwargs = set_path(new_kwargs, path, torch.cat([x, cond[path].expand(len(rows), *x.shape[1:])], dim=0))
    return new_args, new_kwargs


def replace_rows(kwargs: dict, rows: Sequence[int], cond: Condition, paths: Sequence[Path]) -> dict:
    """A copy of ``kwargs`` whose text conditioning on ``rows`` is ``cond``."""
    out = kwargs
    for path in paths:
        x = get_path(kwargs, path).clone()
        x[list(rows)] = cond[path].expand(len(rows), *x.shape[1:])
        out = set_path(out, path, x)
    return out


def output_sample(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` of the same type with its sample replaced (tuple, tensor or ``BaseOutput``)."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(**{**output, "sample": sample})


class ConditionCache:
    """Concept and empty-prompt conditioning, encoded once, moved lazily to each device/dtype."""

    def __init__(self, adapter: Any, monitor: Any, text: str):
        self.adapter, self.monitor, self.text = adapter, monitor, text
        for name, needed, kept in adapter.truncation(text):
            warnings.warn(
                f"concept text {text[:60]!r}... is {needed} tokens but {name} keeps {kept}: the phrases past that are "
                "dropped. Pass fewer concepts, or text='...' with a shorter description, to cover what matters.",
                UserWarning,
                stacklevel=4,
            )
        with bypassing(monitor):
            self.base = adapter.encode_condition(text)
            self.empty_base = adapter.empty_condition()
        self._moved: dict[tuple, tuple[Condition, Condition]] = {}

    def get(self, like: dict) -> tuple[Condition, Condition]:
        """(concept, empty) conditioning matching the dtype, device and shapes of ``like`` (kwargs)."""
        ref = get_path(like, self.adapter.cond_paths[0])
        key = (ref.device, ref.dtype, tuple(ref.shape[1:]))
        if key not in self._moved:
            concept, empty = self.base, self.empty_base
            for path in self.adapter.cond_paths:
                x = get_path(like, path)
                if tuple(concept[path].shape[1:]) != tuple(x.shape[1:]):
                    raise IncompatibleMethodError(
                        f"the concept conditioning at {'/'.join(path)} has shape {tuple(concept[path].shape)} but this "
                        f"call's has {tuple(x.shape)} (a non-default max_sequence_length?); call the pipeline with "
                        "its default text length, or re-wrap after changing it."
                    )
            self._moved[key] = tuple(  # type: ignore[assignment]
                {p: t.to(device=ref.device, dtype=get_path(like, p).dtype) for p, t in c.items()}
                for c in (concept, empty)
            )
        return self._moved[key]
