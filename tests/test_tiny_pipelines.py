"""The tiny offline pipelines of tiny_pipelines.py build, run, and are deterministic in their seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import FACTORIES, IMAGE_SIZE, tiny_bert_sd, tiny_sd, tiny_sd_safe

PROMPT = "a photo of a cat"


def run(pipe, prompt=PROMPT, steps=2, **kw):
    return pipe(
        prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **kw
    ).images


@pytest.mark.parametrize("name", list(FACTORIES))
def test_factory_builds_runs_and_is_deterministic(name):
    rng = torch.get_rng_state()
    first, second = FACTORIES[name](0), FACTORIES[name](0)
    assert torch.equal(rng, torch.get_rng_state())  # building leaves the global RNG alone
    image = run(first)
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(run(second), image)
    assert not np.array_equal(run(first, "a house by the sea"), image)  # the prompt reaches the denoiser
    assert not np.array_equal(run(FACTORIES[name](1)), image)
    batch = run(first, [PROMPT, "a dog"], num_images_per_prompt=2)
    assert batch.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize("factory", [tiny_sd, tiny_bert_sd])
def test_safe_pipeline_shares_components_and_runs_sld(factory):
    pipe = factory(0)
    safe = tiny_sd_safe(pipe)
    assert type(safe).__name__ == "StableDiffusionPipelineSafe"
    for part in ("vae", "text_encoder", "tokenizer", "unet"):
        assert getattr(safe, part) is getattr(pipe, part)
    assert safe.scheduler is not pipe.scheduler and safe.scheduler.config == pipe.scheduler.config
    plain = run(pipe, steps=4)
    with pytest.warns(UserWarning, match="Safety checker disabled"):
        off = run(safe, steps=4, sld_guidance_scale=0.0)
    assert np.abs(off - plain).max() <= 1e-5  # SLD off == plain CFG (decode differs by float rounding only)
    out = safe(
        PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np",
        sld_guidance_scale=1000.0, sld_warmup_steps=0,
    )  # fmt: skip
    assert out.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and out.applied_safety_concept
    assert np.abs(out.images - plain).max() > 1e-3
