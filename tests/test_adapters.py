"""Adapters for SD 1.x (CLIP and BERT encoders), SDXL, SD3 and FLUX on tiny random pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_bert_sd, tiny_flux, tiny_sd3, tiny_sdxl

import safeguard
from safeguard.adapters import get_adapter
from safeguard.core.hooks import hook_snapshot

PROMPT = "a cat"
TEXT = "a red dog"


def run(pipe, steps=3, **kw):
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("guidance_scale", 5.0)
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def hooks(pipe):
    """All hooks on the pipeline's modules (a set; compare before wrap and after unwrap)."""
    return {(n, *h) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) for h in hook_snapshot(m)}


GUIDED = {"bert_sd": tiny_bert_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3}


@pytest.fixture(scope="module", params=list(GUIDED))
def guided(request):
    pipe = GUIDED[request.param]()
    yield request.param, pipe
    safeguard.unwrap(pipe)


def test_adapter_finds_modules(guided):
    name, pipe = guided
    a = get_adapter(pipe)
    assert a.family == {"bert_sd": "sd", "sdxl": "sdxl", "sd3": "sd3"}[name]
    assert a.denoiser is (getattr(pipe, "unet", None) or pipe.transformer)
    assert len(a.text_encoders) == {"bert_sd": 1, "sdxl": 2, "sd3": 3}[name]
    cond = a.encode_condition(TEXT)
    assert set(cond) == set(a.cond_paths) and all(t.shape[0] == 1 for t in cond.values())


def test_negative_prompt_equals_pipeline_negative_prompt(guided):
    _, pipe = guided
    expected = run(pipe, negative_prompt=TEXT)
    safeguard.wrap(pipe, concepts=[TEXT], method="negative_prompt")
    try:
        np.testing.assert_allclose(run(pipe), expected, atol=1e-5)
        report = safeguard.last_report(pipe)
        assert report.defenses[0].acted_steps == [0, 1, 2]
    finally:
        safeguard.unwrap(pipe)


def test_sld_and_composition_guard_batches_and_unwrap_exactly(guided):
    _, pipe = guided
    kw = dict(prompt=[PROMPT, "a house"], num_images_per_prompt=2)
    plain = run(pipe, **kw)
    base = hooks(pipe)
    safeguard.wrap(pipe, concepts=[TEXT], method=["sld", "negative_prompt"])
    # composition order is fixed: guidance-side negative_prompt before sld, whatever the list order
    assert [d.name for d in safeguard.api.get_guard(pipe).defenses] == ["negative_prompt", "sld"]
    safeguard.wrap(pipe, concepts=[TEXT], method=safeguard.SLDConfig(preset="max"), overwrite=True)
    guarded = run(pipe, **kw)
    assert guarded.shape == plain.shape and np.abs(guarded - plain).max() > 1e-4
    assert safeguard.last_report(pipe).defenses[0].acted_steps == [0, 1, 2]
    safeguard.unwrap(pipe)
    assert hooks(pipe) == base
    np.testing.assert_array_equal(run(pipe, **kw), plain)


def test_flux_guidance_defenses_raise_clear_error_and_leave_pipeline_untouched():
    pipe = tiny_flux()
    before = run(pipe, guidance_scale=3.5)
    base = hooks(pipe)
    for method in ("negative_prompt", "sld"):  # (the default, method=None, is safree on FLUX: test_wrap_api)
        with pytest.raises(safeguard.IncompatibleMethodError) as e:
            safeguard.wrap(pipe, concepts=["nudity"], method=method)
        assert "FluxPipeline" in str(e.value)
        assert not safeguard.is_wrapped(pipe) and hooks(pipe) == base
    with pytest.raises(safeguard.IncompatibleMethodError, match="Methods that work there"):
        safeguard.wrap(pipe, concepts=["x"], method="sld")
    np.testing.assert_array_equal(run(pipe, guidance_scale=3.5), before)
    a = get_adapter(pipe)
    assert a.family == "flux" and not a.cfg_active() and len(a.text_encoders) == 2
