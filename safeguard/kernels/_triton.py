"""The Triton kernels (imported on first use, so ``TRITON_INTERPRET`` set before then is honoured)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sld_kernel(u_ptr, c_ptr, k_ptr, m_ptr, out_ptr, m_out_ptr, n, sld_scale, threshold, ms, mb, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    diff = c - k
    scale = tl.minimum(tl.abs(diff) * sld_scale, 1.0)
    scale = tl.where(diff >= threshold, 0.0, scale)
    g = (k - u) * scale + ms * m
    tl.store(out_ptr + offs, (c - g).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(m_out_ptr + offs, (mb * m + (1.0 - mb) * g).to(m_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ablate_kernel(h_ptr, u_ptr, g_ptr, out_ptr, d, strength, HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    h = tl.load(h_ptr + row * d + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    coef = tl.sum(h * u, axis=0) * strength
    if HAS_GATE:
        coef = coef * tl.load(g_ptr + row).to(tl.float32)
    tl.store(out_ptr + row * d + offs, (h - coef * u).to(out_ptr.dtype.element_ty), mask=mask)
