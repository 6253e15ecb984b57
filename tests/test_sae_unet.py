"""sae_unet (SAeUron) on a tiny random SD pipeline with a random SAE on up_blocks.1.attentions.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_sd

import safeguard
from safeguard.core.hooks import hook_snapshot
from safeguard.sae import SAEConfig, TopKSAE, save_sae

MODULE = "unet.up_blocks.1.attentions.1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = tiny_sd()
    folder = tmp_path_factory.mktemp("sae_unet")
    save_sae(TopKSAE(SAEConfig(d_in=8, num_latents=32, k=4), generator=torch.Generator().manual_seed(0)), folder)
    yield pipe, str(folder)
    safeguard.unwrap(pipe)


def run(pipe, prompt="a red star on a white background", **kw):
    out = pipe(
        prompt,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    return np.asarray(out.images)


def wrap(pipe, folder, **options):
    options = {"sae": folder, "module": MODULE, "percentile": 50.0, "prompts": 2} | options
    return safeguard.wrap(pipe, concepts=["red"], method="sae_unet", overwrite=True, **options)


def test_multiplier_one_is_bit_identical_and_unwrap_restores(setup):
    pipe, folder = setup
    plain = run(pipe)
    snap = hook_snapshot(pipe.unet)
    wrap(pipe, folder, multiplier=1.0)
    assert np.array_equal(run(pipe), plain)
    wrap(pipe, folder, multiplier=-3.0)
    assert not np.array_equal(run(pipe), plain)
    assert safeguard.last_report(pipe).defenses[0].acted_steps
    safeguard.unwrap(pipe)
    assert np.array_equal(run(pipe), plain) and hook_snapshot(pipe.unet) == snap


def test_edit_is_the_scaled_selected_features_and_keeps_the_rest(setup):
    pipe, folder = setup
    block = pipe.unet.get_submodule(MODULE.partition(".")[2])
    before, after = [], []
    h1 = block.register_forward_hook(lambda m, a, o: before.append(o[0] if isinstance(o, tuple) else o))
    wrap(pipe, folder, multiplier=-2.0)
    before.clear()  # drop what the wrap-time scoring runs passed through the block
    h2 = block.register_forward_hook(lambda m, a, o: after.append(o[0] if isinstance(o, tuple) else o))
    try:
        run(pipe, prompt=["a red star", "a blue circle on black"], height=64, width=32)  # non-square, 2 prompts
    finally:
        h1.remove()
        h2.remove()
    d = safeguard.api.get_guard(pipe).defenses[0]
    for step, (x, y) in enumerate(zip(before, after)):
        n = x.shape[0] // 2
        assert torch.equal(x[:n], y[:n])  # the unconditional rows are untouched
        rows = x[n:].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        idx, avg, w = d._tensors(x.device, d.step_index(step))
        z = d.sae.encode_dense(rows)[:, idx]
        delta = ((-2.0 - 1.0) * z * (z > avg)) @ w
        expect = x[n:] + delta.reshape(x[n:].shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(y[n:], expect, atol=1e-5, rtol=1e-5)
    safeguard.unwrap(pipe)


def test_selection_is_per_step_and_bad_options_raise(setup):
    pipe, folder = setup
    wrap(pipe, folder, multiplier=-1.0)
    d = safeguard.api.get_guard(pipe).defenses[0]
    assert d.selected.shape[1] == 32 and d.selected.any()  # [scored steps, latents]
    assert len(d.report.details["features_per_step"]) == d.selected.shape[0]
    safeguard.unwrap(pipe)
    snap = hook_snapshot(pipe.unet)
    with pytest.raises(safeguard.InvalidOptionError, match="percentile"):
        wrap(pipe, folder, percentile=101.0)
    with pytest.raises(safeguard.InvalidOptionError, match="module"):
        wrap(pipe, folder, module="unet.nope")
    assert hook_snapshot(pipe.unet) == snap and not safeguard.is_wrapped(pipe)
