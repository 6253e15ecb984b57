"""Removing a direction from token states (``repe`` ablation), fused.

``h - strength * gate * (h . u) u`` for every token state ``h`` (rows of the last dimension), unit
direction ``u`` and an optional per-token 0/1 ``gate``. Eagerly: a matrix-vector product, two
scalings, an outer product the size of ``h`` and a subtraction; the Triton kernel does one row per
program, its dot product and update in registers, in float32.
"""

from __future__ import annotations

import torch

from .dispatch import block_size, num_warps, on_device, use_triton

MAX_TRITON_HIDDEN = 1 << 14  # one row per program: wider states take the eager path


def ablate_rows_eager(h: torch.Tensor, unit: torch.Tensor, strength: float, gate: torch.Tensor | None) -> torch.Tensor:
    """The reference: ``h - strength * gate * (h . u) u`` with torch ops in ``h``'s dtype.

    Two ops when ungated (a matrix-vector product and one ``addcmul`` for the update), so a layer's edit costs
    little even where per-op overhead dominates (one-token decode steps on a CPU).
    """
    coef = (h @ unit).unsqueeze(-1)
    if gate is not None:
        coef = coef * gate
    return torch.addcmul(h, coef, unit, value=-strength)


def ablate_rows(h: torch.Tensor, unit: torch.Tensor, strength: float, gate: torch.Tensor | None) -> torch.Tensor:
    """``h - strength * gate * (h . u) u`` on the selected tokens (``strength=1`` leaves no component along ``u``).

    Args:
        h: token states ``[..., d]``.
        unit: unit direction ``[d]``, on ``h``'s device and dtype.
        strength: 1 removes the component; more pushes past zero.
        gate: ``None`` (every token) or a 0/1 tensor broadcastable to ``h.shape[:-1] + (1,)`` in ``h``'s dtype.

    Returns:
        A new tensor like ``h``: the Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``) when
        :func:`~safeguard.kernels.use_triton` says so, else :func:`ablate_rows_eager`.
    """
    d = h.shape[-1]
    alike = unit.shape == (d,) and unit.dtype == h.dtype and unit.device == h.device
    if gate is not None:
        alike = alike and gate.device == h.device and gate.shape[-1] == 1
    tensors = [h, unit] if gate is None else [h, unit, gate]
    if not alike or h.numel() == 0 or d > MAX_TRITON_HIDDEN or not use_triton(*tensors):
        return ablate_rows_eager(h, unit, strength, gate)  # also for mismatches: eager raises the usual error
    from ._triton import ablate_kernel

    rows = h.numel() // d
    x = h.contiguous().view(rows, d)
    g = None
    if gate is not None:
        g = gate.expand(*h.shape[:-1], 1).reshape(rows).to(h.dtype).contiguous()
    out = torch.empty_like(x)
    block = block_size(d)
    with on_device(h):
        ablate_kernel[(rows,)](
            x, unit.contiguous(), x if g is None else g, out, d, float(strength), HAS_GATE=g is not None, BLOCK=block,
            num_warps=num_warps(block),
        )  # fmt: skip
    return out.view(h.shape)
