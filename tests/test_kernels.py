"""Fused kernels: eager references hold the defenses' math; Triton parity under the CPU interpreter (and on CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeguard.kernels as K
from safeguard.kernels import ablate_rows, ablate_rows_eager, sld_guidance, sld_guidance_eager, use_triton

SLD = dict(sld_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)


def sld_inputs(shape=(2, 4, 9, 7), seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    u, c, k, m = (torch.randn(shape, generator=g) * 0.02 for _ in range(4))
    return [t.to(device=device, dtype=dtype) for t in (u, c, k, m)]


def test_sld_eager_reference_is_the_paper_update():
    u, c, k, m = sld_inputs()
    out, m_new = sld_guidance_eager(u, c, k, m, **SLD)
    d = c - k
    scale = (d.abs() * 1000.0).clamp(max=1.0) * (d < 0.01)
    g = scale * (k - u) + 0.3 * m
    torch.testing.assert_close(out, c - g, rtol=0, atol=1e-7)
    torch.testing.assert_close(m_new, 0.4 * m + 0.6 * g, rtol=0, atol=1e-7)
    assert (d >= 0.01).any() and (d < 0.01).any()  # both sides of the threshold are exercised
    z, _ = sld_guidance_eager(u, c, k, None, **SLD)  # first step: zero momentum
    torch.testing.assert_close(z, sld_guidance_eager(u, c, k, torch.zeros_like(c), **SLD)[0])


def test_ablate_eager_reference_removes_the_component_on_gated_rows():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, 48, generator=g)
    u = torch.randn(48, generator=g)
    u = u / u.norm()
    gate = (torch.rand(3, 5, 1, generator=g) > 0.4).float()
    out = ablate_rows_eager(h, u, 1.0, gate)
    on = gate[..., 0].bool()
    assert (out @ u)[on].abs().max() < 1e-5 and torch.equal(out[~on], h[~on])
    torch.testing.assert_close(out - h, -((h @ u) * gate[..., 0])[..., None] * u)


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SAFEGUARD_DISABLE_KERNELS", raising=False)
    assert use_triton(cpu) is False  # CPU without the interpreter: eager
    if K.triton_available():
        import triton.language  # noqa: F401  (imported without the interpreter: it cannot run on CPU now)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if K.triton_available():
        monkeypatch.setattr(K.dispatch, "_warned_interpreter", False)
        with pytest.warns(UserWarning, match="set after triton was imported"):
            assert use_triton(cpu) is False
    assert use_triton(cpu) is False
    with torch.no_grad():
        assert use_triton(torch.zeros(2, requires_grad=True)) is False
    monkeypatch.setenv("SAFEGUARD_DISABLE_KERNELS", "1")
    assert use_triton(cpu) is False and K.kernels_disabled()
    monkeypatch.setenv("SAFEGUARD_DISABLE_KERNELS", "0")
    assert not K.kernels_disabled()
    assert [K.dispatch.block_size(n) for n in (1, 16, 17, 576, 1024)] == [16, 16, 32, 1024, 1024]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """tests/kernel_parity.py's results: every kernel through Triton's CPU interpreter and through its reference.

    It runs in a child process with ``TRITON_INTERPRET=1`` set before triton is imported (the interpreter has to
    be on when triton's standard library is first compiled, and in this process another module may import
    triton first).
    """
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("SAFEGUARD_DISABLE_KERNELS", None)
    script = Path(__file__).with_name("kernel_parity.py")
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path_factory.mktemp("parity"))],
        capture_output=True, text=True, env=env, cwd=script.parent, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["sld_no_momentum", "sld_momentum"])
def test_sld_kernel_matches_eager_under_interpreter(interpreted, case):
    r = interpreted[case]  # [3, 4, 11, 13]: 1716 elements, two blocks of 1024, the last one partial
    assert r["launches"] == 1
    assert r["diff"] <= 1e-6 * r["scale"] and r["diff_momentum"] <= 1e-6 * r["scale"]


@pytest.mark.parametrize("case", ["ablate_gated", "ablate_ungated", "ablate_row_gate"])
def test_ablate_kernel_matches_eager_under_interpreter(interpreted, case):
    r = interpreted[case]  # [2, 7, 40]: hidden 40 is not a power of two; per-token, none and per-row gates
    assert r["launches"] == 1 and r["diff"] <= 1e-6 * r["scale"]
    if case != "ablate_ungated":
        assert r["residual_along_u"] < 1e-5 and r["untouched_equal"]  # strength 1 removes it; gate 0 rows untouched


def test_disabled_kernels_take_the_eager_path(interpreted):
    assert interpreted["disabled"]["launches"] == 0  # SAFEGUARD_DISABLE_KERNELS=1, interpreter on


def test_repe_ablation_generates_the_same_with_the_kernel(interpreted):
    r = interpreted["repe_ablate"]  # tiny Llama, ablation at 4 layers: 1 forward + 6 greedy steps
    assert r["launches"] == 4 * 7 and r["same_tokens"] and r["logits_diff"] < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="native Triton parity needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_kernels_match_eager_on_cuda(dtype, tol, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("SAFEGUARD_DISABLE_KERNELS", raising=False)
    u, c, k, m = sld_inputs(shape=(4, 4, 64, 64), dtype=dtype, device="cuda")
    out, m_new = sld_guidance(u, c, k, m, **SLD)
    ref, m_ref = sld_guidance_eager(*(t.float() for t in (u, c, k, m)), **SLD)  # reference in float32
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * 0.05)
    torch.testing.assert_close(m_new.float(), m_ref, rtol=tol, atol=tol * 0.05)
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(8, 33, 576, generator=g) * 4).to("cuda", dtype)
    unit = torch.nn.functional.normalize(torch.randn(576, generator=g), dim=0).to("cuda", dtype)
    gates = {
        "none": None,
        "token": (torch.rand(8, 33, 1, generator=g) > 0.3).to("cuda", dtype),  # repe's [B, q, 1] token gate
        "row": (torch.rand(8, 1, 1, generator=g) > 0.5).to("cuda", dtype),  # its [B, 1, 1] row gate
    }
    for name, gate in gates.items():
        out = ablate_rows(h, unit, 1.0, gate)
        ref = ablate_rows_eager(h.float(), unit.float(), 1.0, None if gate is None else gate.float())
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * 4, msg=f"gate {name}")
    strided = h.transpose(0, 1)  # non-contiguous input
    torch.testing.assert_close(
        ablate_rows(strided, unit, 2.0, None).float(), ablate_rows_eager(strided.float(), unit.float(), 2.0, None),
        rtol=tol, atol=tol * 8,
    )  # fmt: skip
