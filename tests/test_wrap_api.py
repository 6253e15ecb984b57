"""wrap / unwrap / disabled / last_report on tiny random pipelines, and the exact math of
negative_prompt and sld (parity with diffusers' own StableDiffusionPipelineSafe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_sd, tiny_sd_safe

import safeguard
from safeguard.core.hooks import hook_snapshot

PROMPT = "a photo of a cat"
TEXT = "a red dog"


def run(pipe, steps=4, seed=0, **kw):
    kw.setdefault("prompt", PROMPT)
    return pipe(
        num_inference_steps=steps, guidance_scale=kw.pop("guidance_scale", 7.5),
        generator=torch.Generator().manual_seed(seed), output_type="np", **kw,
    ).images  # fmt: skip


def hooks(pipe):
    """All hooks on the pipeline's modules (a set; compare before wrap and after unwrap)."""
    return {(n, *h) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) for h in hook_snapshot(m)}


@pytest.fixture(scope="module")
def sd():
    return tiny_sd(0)


@pytest.fixture(autouse=True)
def _clean(sd):
    safeguard.unwrap(sd)
    yield
    safeguard.unwrap(sd)


def test_wrap_returns_same_object_and_unwrap_is_bit_exact(sd):
    before = run(sd)
    base = hooks(sd)
    assert safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="max") is sd
    assert safeguard.is_wrapped(sd) and len(hooks(sd) - base) >= 4
    guarded = run(sd)
    assert not np.array_equal(guarded, before)
    assert safeguard.unwrap(sd) is sd
    assert not safeguard.is_wrapped(sd)
    assert hooks(sd) == base
    np.testing.assert_array_equal(run(sd), before)


def test_wrap_twice_same_config_is_noop_and_other_config_raises(sd):
    safeguard.wrap(sd, concepts=[TEXT], method="sld")
    n = hooks(sd)
    guard = safeguard.api.get_guard(sd)
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="medium")  # equal config
    assert safeguard.api.get_guard(sd) is guard and hooks(sd) == n
    with pytest.raises(safeguard.AlreadyWrappedError, match="overwrite=True"):
        safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="strong")
    assert safeguard.api.get_guard(sd) is guard and hooks(sd) == n
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="strong", overwrite=True)
    assert safeguard.api.get_guard(sd).configs[0].preset == "strong" and len(hooks(sd)) == len(n)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(concepts=[]), safeguard.InvalidConceptError, "concepts=[]"),
        (dict(concepts=["  "]), safeguard.InvalidConceptError, "'  '"),
        (dict(concepts=[TEXT], method="sdl"), safeguard.UnknownMethodError, "Did you mean 'sld'"),
        (dict(concepts=[TEXT], method="sld", strength=2), safeguard.InvalidOptionError, "['strength']"),
        (dict(concepts=[TEXT], method="sld", sld_scale=-3), safeguard.InvalidOptionError, "sld_scale=-3"),
        (dict(concepts=[TEXT], method="sld", threshold=7.0), safeguard.InvalidOptionError, "threshold=7.0"),
        (dict(concepts=[TEXT], method="negative_prompt", merge_weight=1.5), safeguard.InvalidOptionError, "1.5"),
    ],
)
def test_bad_input_raises_named_error_and_leaves_pipeline_untouched(sd, kwargs, error, fragment):
    before = run(sd, steps=2)
    base = hooks(sd)
    with pytest.raises(error) as e:
        safeguard.wrap(sd, **kwargs)
    assert isinstance(e.value, safeguard.SafeguardError)
    assert fragment in str(e.value)
    assert not safeguard.is_wrapped(sd) and hooks(sd) == base
    np.testing.assert_array_equal(run(sd, steps=2), before)


def test_unsupported_object():
    with pytest.raises(safeguard.UnsupportedPipelineError, match="StableDiffusionPipeline") as e:
        safeguard.wrap(torch.nn.Linear(2, 2), concepts=["nudity"])
    assert isinstance(e.value, TypeError) and "Linear" in str(e.value)


def test_failed_overwrite_keeps_previous_guard(sd):
    safeguard.wrap(sd, concepts=[TEXT], method="sld")
    guarded = run(sd, steps=3)
    with pytest.raises(safeguard.InvalidOptionError):
        safeguard.wrap(sd, concepts=[TEXT], method="sld", threshold=3.0, overwrite=True)
    np.testing.assert_array_equal(run(sd, steps=3), guarded)


def test_disabled_runs_unguarded_then_guard_returns(sd):
    plain = run(sd)
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="max")
    guarded = run(sd)
    with safeguard.disabled(sd):
        np.testing.assert_array_equal(run(sd), plain)
        assert safeguard.last_report(sd).guarded is False
    np.testing.assert_array_equal(run(sd), guarded)
    assert safeguard.last_report(sd).guarded is True


def test_last_report_steps_and_calls(sd):
    with pytest.raises(safeguard.NotWrappedError):
        safeguard.last_report(sd)
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="medium", warmup_steps=3)
    assert safeguard.last_report(sd) is None
    run(sd, steps=6)
    r1 = safeguard.last_report(sd)
    assert r1.steps == 6 and r1.defenses[0].name == "sld"
    assert r1.defenses[0].acted_steps == [3, 4, 5]
    assert r1.defenses[0].time_s > 0
    run(sd, steps=4)
    r2 = safeguard.last_report(sd)
    assert r2.call_index == r1.call_index + 1 and r2.defenses[0].acted_steps == [3]
    assert "sld: acted on steps 3" in r2.summary()


# ------------------------------------------------------------------ negative_prompt math
def test_negative_prompt_equals_diffusers_negative_prompt(sd):
    expected = run(sd, negative_prompt=TEXT)
    safeguard.wrap(sd, concepts=[TEXT], method="negative_prompt")
    np.testing.assert_allclose(run(sd), expected, atol=1e-5)
    assert safeguard.last_report(sd).defenses[0].details["rows_replaced"] == 1


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_negative_prompt_merges_with_user_negative(sd, weight):
    user = "blurry"
    expected = run(sd, negative_prompt=TEXT if weight == 1.0 else user)
    safeguard.wrap(sd, concepts=[TEXT], method="negative_prompt", merge_weight=weight)
    np.testing.assert_allclose(run(sd, negative_prompt=user), expected, atol=1e-5)
    assert safeguard.last_report(sd).defenses[0].details["rows_merged_with_user_negative"] == 1


def test_negative_prompt_half_merge_differs_from_both(sd):
    a, b = run(sd, negative_prompt=TEXT), run(sd, negative_prompt="blurry")
    safeguard.wrap(sd, concepts=[TEXT], method="negative_prompt")
    mixed = run(sd, negative_prompt="blurry")
    assert np.abs(mixed - a).max() > 1e-4 and np.abs(mixed - b).max() > 1e-4


def test_prompt_embeds_calls_are_guarded(sd):
    embeds, _ = sd.encode_prompt(PROMPT, "cpu", 1, False)
    concept, _ = sd.encode_prompt(TEXT, "cpu", 1, False)
    expected = run(sd, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=concept)
    safeguard.wrap(sd, concepts=[TEXT], method="negative_prompt")
    np.testing.assert_allclose(run(sd, prompt=None, prompt_embeds=embeds), expected, atol=1e-5)
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="max", overwrite=True)
    by_text = run(sd)
    np.testing.assert_allclose(run(sd, prompt=None, prompt_embeds=embeds), by_text, atol=1e-5)
    with safeguard.disabled(sd):
        assert np.abs(run(sd, prompt=None, prompt_embeds=embeds) - by_text).max() > 1e-4


def test_guidance_off_means_guidance_defenses_idle(sd):
    plain = run(sd, guidance_scale=1.0)
    safeguard.wrap(sd, concepts=[TEXT], method=["negative_prompt", "sld"])
    np.testing.assert_array_equal(run(sd, guidance_scale=1.0), plain)
    assert all(not d.acted_steps for d in safeguard.last_report(sd).defenses)


# ------------------------------------------------------------------ SLD parity
@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_sld_matches_diffusers_safe_pipeline(sd, preset):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    safe = tiny_sd_safe(sd)
    safe._safety_text_concept = TEXT
    ref = run(safe, steps=20, **getattr(SafetyConfig, preset.upper()))
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset=preset)
    ours = run(sd, steps=20)
    assert np.abs(ours - ref).max() <= 1e-4
    with safeguard.disabled(sd):
        plain = run(sd, steps=20)
    if preset != "weak":  # weak's 15 warm-up steps of 20 may leave the tiny model's image unchanged
        assert np.abs(plain - ref).max() > 1e-3


def test_sld_batch_of_prompts_and_images_per_prompt_matches_safe(sd):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    prompts = [PROMPT, "a house by the sea"]
    safe = tiny_sd_safe(sd)
    safe._safety_text_concept = TEXT
    ref = run(safe, steps=8, prompt=prompts, num_images_per_prompt=2, **SafetyConfig.STRONG)
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="strong")
    ours = run(sd, steps=8, prompt=prompts, num_images_per_prompt=2)
    assert ours.shape[0] == 4 and np.abs(ours - ref).max() <= 1e-4


def test_truncated_concept_text_warns(sd):
    long = ", ".join(["a very long phrase about something"] * 6)  # far past the tiny tokenizer's 32 tokens
    with pytest.warns(UserWarning, match="tokens but CLIPTokenizer keeps 32"):
        safeguard.wrap(sd, concepts=[long], method="sld")


def test_defense_used_directly_as_context_manager_matches_wrap(sd):
    from safeguard.concepts import resolve_concepts
    from safeguard.defenses.sld import SLDDefense

    base = hooks(sd)
    safeguard.wrap(sd, concepts=[TEXT], method="sld", preset="max")
    wrapped = run(sd)
    safeguard.unwrap(sd)
    assert np.abs(run(sd) - wrapped).max() > 1e-4
    with SLDDefense(safeguard.SLDConfig(preset="max"), resolve_concepts([TEXT])).attach(sd) as defense:
        np.testing.assert_array_equal(run(sd), wrapped)
        assert defense.report.acted_steps == [0, 1, 2, 3]
        assert len(hooks(sd) - base) >= 4
    assert hooks(sd) == base
    defense.detach()  # idempotent
    assert hooks(sd) == base


def test_default_method_per_family():
    from tiny_pipelines import tiny_flux, tiny_sd

    for factory, expected in ((tiny_sd, "sld"), (tiny_flux, "safree")):  # FLUX: no batched negative branch
        pipe = factory()
        safeguard.wrap(pipe, concepts=["red"])
        assert [d.name for d in safeguard.api.get_guard(pipe).defenses] == [expected]
        safeguard.unwrap(pipe)


def test_cli_options_parse_json_and_python_literals():
    from safeguard.cli import parse_options

    got = parse_options(["preset=strong", "sld_scale=100", "release=False", "x=true", "y=None", "z=[1, 2]"])
    assert got == {"preset": "strong", "sld_scale": 100, "release": False, "x": True, "y": None, "z": [1, 2]}
    assert got["release"] is False and got["x"] is True
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        parse_options(["release"])
