"""Safe Latent Diffusion's per-step guidance (``method="sld"``), fused.

With ``u, c, k`` the unconditional, prompt and safety-concept noise predictions and ``m`` the
momentum (see :mod:`safeguard.defenses.sld`)::

    d      = c - k
    scale  = min(|d| * sld_scale, 1), 0 where d >= threshold
    g      = scale * (k - u) + momentum_scale * m
    m'     = momentum_beta * m + (1 - momentum_beta) * g
    c'     = c - g

Eagerly that is about ten element-wise kernels and as many temporaries the size of the latents;
the Triton kernel reads ``u, c, k, m`` once and writes ``c'`` and ``m'`` once, computing in float32
whatever the storage dtype.
"""

from __future__ import annotations

import torch

from .dispatch import block_size, cdiv, on_device, use_triton


def sld_guidance_eager(
    u: torch.Tensor,
    c: torch.Tensor,
    k: torch.Tensor,
    m: torch.Tensor | None,
    *,
    sld_scale: float,
    threshold: float,
    momentum_scale: float,
    momentum_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: ``(c', m')`` with plain torch ops in the inputs' dtype (``m=None``: zero momentum)."""
    if m is None:
        m = torch.zeros_like(c)
    diff = c - k
    scale = torch.clamp(diff.abs() * sld_scale, max=1.0)
    scale = torch.where(diff >= threshold, torch.zeros_like(scale), scale)
    g = (k - u) * scale + momentum_scale * m
    return c - g, momentum_beta * m + (1 - momentum_beta) * g


def sld_guidance(
    u: torch.Tensor,
    c: torch.Tensor,
    k: torch.Tensor,
    m: torch.Tensor | None,
    *,
    sld_scale: float,
    threshold: float,
    momentum_scale: float,
    momentum_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c', m')``: the prompt prediction with SLD's guidance taken off, and the new momentum.

    Args:
        u, c, k: unconditional, prompt and safety-concept predictions, one shape and dtype.
        m: the momentum from the previous step, or ``None`` on the first step.
        sld_scale, threshold, momentum_scale, momentum_beta: SLD's parameters.

    Returns:
        New tensors shaped like ``c``; the Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``)
        when :func:`~safeguard.kernels.use_triton` says so, else :func:`sld_guidance_eager`.

    Example:
        >>> c2, m2 = sld_guidance(u, c, k, None, sld_scale=1000, threshold=0.01, momentum_scale=0.3,
        ...                       momentum_beta=0.4)  # doctest: +SKIP
    """
    params = dict(sld_scale=sld_scale, threshold=threshold, momentum_scale=momentum_scale, momentum_beta=momentum_beta)
    inputs = [u, c, k] if m is None else [u, c, k, m]
    alike = all(x.shape == c.shape and x.dtype == c.dtype and x.device == c.device for x in inputs)
    if not alike or c.numel() == 0 or not use_triton(*inputs):
        return sld_guidance_eager(u, c, k, m, **params)  # also where shapes differ: eager raises the usual error
    from ._triton import sld_kernel

    u, c, k = u.contiguous(), c.contiguous(), k.contiguous()
    m = torch.zeros_like(c) if m is None else m.contiguous()
    out, m_out = torch.empty_like(c), torch.empty_like(c)
    n = c.numel()
    block = block_size(min(n, 1024), cap=1024)
    with on_device(c):
        sld_kernel[(cdiv(n, block),)](
            u, c, k, m, out, m_out, n, float(sld_scale), float(threshold), float(momentum_scale),
            float(momentum_beta), BLOCK=block,
        )  # fmt: skip
    return out, m_out
