"""Which slice of the denoiser's text conditioning came from which text-encoder call.

A pipeline builds ``encoder_hidden_states`` (and a pooled embedding, where the denoiser takes one)
from its text encoders' outputs by concatenation and zero padding only; the adapter's
``text_layout`` and ``pooled_layout`` say in which order. Text-side defenses record every encoder
call of a pipeline call (:class:`EncoderCall`) and, at the denoiser, find for a row the encoder
call, output field and row that each slice equals bit for bit (:func:`match_row`). Matching by
content, not by counting calls, makes the encoding order, ``clip_skip`` (any ``hidden_states``
layer is a candidate), ``num_images_per_prompt`` and ``prompt_embeds`` made by
``pipe.encode_prompt`` right before the call all work.

Example:
    >>> slices = match_row(adapter, calls, ehs[row], pooled[row])  # doctest: +SKIP
    >>> [(s.name, s.key, s.seq, s.feat) for s in slices]  # doctest: +SKIP
    [('text_encoder', ('hs', -2), slice(0, 77), slice(0, 768)), ('text_encoder_2', ...), ...]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch

Key = tuple[str, int]  # ("out", i): the output's i-th field; ("hs", -k): hidden_states[-k]


def field_of(output: Any, i: int) -> Any:
    try:
        return output[i]
    except (IndexError, KeyError, TypeError):
        return None


def tensor_of(output: Any, key: Key) -> torch.Tensor | None:
    """The tensor ``key`` names in an encoder output, or None."""
    kind, i = key
    if kind == "out":
        t = field_of(output, i)
    else:
        hs = getattr(output, "hidden_states", None)
        t = hs[i] if hs is not None and -len(hs) <= i < 0 else None
    return t if isinstance(t, torch.Tensor) else None


def candidates(output: Any, ndim: int) -> list[tuple[Key, torch.Tensor]]:
    """The output's tensors a pipeline may pass on: ``ndim`` 3 for token states, 2 for pooled ones."""
    out = []
    fields = output.to_tuple() if hasattr(output, "to_tuple") else output if isinstance(output, tuple) else (output,)
    for i, t in enumerate(fields):
        if isinstance(t, torch.Tensor) and t.ndim == ndim:
            out.append((("out", i), t))
    hs = getattr(output, "hidden_states", None)
    if ndim == 3 and hs is not None:  # the penultimate layer (SDXL, SD3) first, then the others
        layers = [(("hs", i - len(hs)), t) for i, t in enumerate(hs)]
        out += sorted(layers, key=lambda kt: kt[0][1] != -2)
    return out


@dataclasses.dataclass
class EncoderCall:
    """One text-encoder call of the current pipeline call, as the pipeline made it."""

    name: str  # the encoder's attribute name on the pipeline
    output: Any
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor | None:
        ids = self.args[0] if self.args else self.kwargs.get("input_ids")
        return ids if isinstance(ids, torch.Tensor) else None


@dataclasses.dataclass
class Slice:
    """Where one encoder call's row sits in a denoiser row."""

    name: str
    call: EncoderCall
    row: int  # row of the encoder call's output
    key: Key
    seq: slice  # sequence positions in encoder_hidden_states (unused for pooled slices)
    feat: slice  # feature positions
    pooled: bool = False

    def source(self) -> torch.Tensor:
        """This slice's tensor in the recorded output."""
        return tensor_of(self.call.output, self.key)[self.row]


S = TypeVar("S", bound=Slice)


def find_slice(
    calls: list[EncoderCall], name: str, target: torch.Tensor, seq: int, feat: int, pooled: bool, make: Callable = Slice
) -> Any:
    """The first recorded (call, field, row) of encoder ``name`` equal to ``target`` at (``seq``, ``feat``)."""
    for call in calls:
        if call.name != name:
            continue
        for key, t in candidates(call.output, 2 if pooled else 3):
            if pooled:
                region = target[feat : feat + t.shape[-1]]
            else:
                region = target[seq : seq + t.shape[1], feat : feat + t.shape[2]]
            if region.shape != t.shape[1:]:
                continue
            for j in range(t.shape[0]):
                if torch.equal(t[j].to(region.device, region.dtype), region):
                    if pooled:
                        return make(name, call, j, key, slice(None), slice(feat, feat + t.shape[-1]), True)
                    return make(name, call, j, key, slice(seq, seq + t.shape[1]), slice(feat, feat + t.shape[2]))
    return None


def match_row(
    adapter: Any,
    calls: list[EncoderCall],
    ehs_row: torch.Tensor,
    pooled_row: torch.Tensor | None = None,
    make: Callable[..., S] = Slice,
) -> list[S]:
    """Every slice of one denoiser row that a recorded encoder call produced, in layout order.

    Within a group, matching stops at the first encoder whose slice is not found; a group where no
    encoder matched ends the search (the next group's sequence offset is unknown). Encoders the
    pipeline does not have are skipped.
    """
    out: list[S] = []
    seq = 0
    for group in adapter.text_layout:
        feat, length = 0, None
        for name in group:
            if adapter.encoder_by_name(name) is None:
                continue
            s = find_slice(calls, name, ehs_row, seq, feat, pooled=False, make=make)
            if s is None:
                break
            out.append(s)
            feat, length = s.feat.stop, s.seq.stop - s.seq.start
        if length is None:
            break
        seq += length
    if pooled_row is not None and adapter.pooled_layout is not None:
        feat = 0
        for name in adapter.pooled_layout[1]:
            if adapter.encoder_by_name(name) is None:
                continue
            s = find_slice(calls, name, pooled_row, 0, feat, pooled=True, make=make)
            if s is None:
                break
            out.append(s)
            feat = s.feat.stop
    return out


def prompt_rows(adapter: Any, batch: int) -> tuple[range, range]:
    """``(negative rows, prompt rows)`` of a denoiser batch (no negative rows unless guidance is batched)."""
    if adapter.cfg_active() and batch % 2 == 0:
        return range(0, batch // 2), range(batch // 2, batch)
    return range(0), range(batch)
