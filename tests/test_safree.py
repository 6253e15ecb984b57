"""SAFREE: exact math of the subspace projection, the filter schedule, and the hooks' behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_bert_sd

import safeguard
from safeguard.defenses.safree import filter_steps, fourier_lowpass_scale, projector

PROMPT = "a red star on a white background"


def run(pipe, steps=4, **kw):
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).images


def test_projector_is_orthogonal_projection():
    a = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    p = projector(a)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(p @ a.double(), a.double())


def test_filter_steps_schedule():
    assert filter_steps(0.0, 2.5, 5.333) == 0
    assert filter_steps(1.0, 2.5, 5.333) == 10
    assert filter_steps(0.5333, 2.5, 5.333) == 5  # the midpoint of the sigmoid
    values = [filter_steps(b / 20, 2.5, 5.333) for b in range(21)]
    assert values == sorted(values)


def test_fourier_scale_one_is_identity_and_scales_the_mean():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fourier_lowpass_scale(x, 1.0), x, atol=1e-6, rtol=0)
    y = fourier_lowpass_scale(x, 0.0, radius=1)
    # the DC component sits inside the scaled square: the spatial mean is removed
    torch.testing.assert_close(y.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def pipe():
    p = tiny_bert_sd()
    yield p
    safeguard.unwrap(p)


def concept_projector(pipe, phrases):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    t = tok(phrases, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = enc(t.input_ids, attention_mask=t.attention_mask)[0].float()
    m = t.attention_mask.float().unsqueeze(-1)
    pooled = (states * m).sum(1) / m.sum(1)
    return projector(pooled.T)


def test_flagged_states_leave_the_concept_subspace_and_the_rest_is_untouched(pipe):
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50, overwrite=True)
    guarded = run(pipe)
    defense = safeguard.api.get_guard(pipe).defenses[0]
    entries = defense._entries
    assert entries, "the prompt names the concept: at least one token must be flagged"
    report = safeguard.last_report(pipe).defenses[0]  # before running the encoder again (a new call)
    p_c = concept_projector(pipe, list(safeguard.concepts.builtin_concept("red").phrases))
    for e in entries:
        changed = [i for i in range(e.original.shape[0]) if not torch.equal(e.original[i], e.filtered[i])]
        assert changed and len(changed) == len(e.flagged)
        for i in changed:
            v = e.filtered[i].double()
            assert (v @ p_c).norm() <= 1e-5 * v.norm()
        unchanged = [i for i in range(e.original.shape[0]) if i not in changed]
        assert torch.equal(e.filtered[unchanged], e.original[unchanged])  # bit-identical
    details = report.details["prompts"][0]
    assert details["filtered_steps_of_50"] == 50 and details["flagged_tokens"] == entries[0].flagged
    assert report.acted_steps == [0, 1, 2, 3]
    with safeguard.disabled(pipe):
        assert np.abs(run(pipe) - guarded).max() > 1e-5


def test_nothing_flagged_gives_bit_identical_image(pipe):
    safeguard.unwrap(pipe)
    plain = run(pipe)
    safeguard.wrap(pipe, concepts=["red"], method="safree", alpha=10.0, min_steps=0)
    np.testing.assert_array_equal(run(pipe), plain)
    assert safeguard.last_report(pipe).defenses[0].acted_steps == []


def test_filter_schedule_limits_the_steps(pipe):
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=25, overwrite=True)
    run(pipe, steps=8)  # 25 of 50 reference steps -> the first 4 of 8
    assert safeguard.last_report(pipe).defenses[0].acted_steps == [0, 1, 2, 3]


def test_re_attention_only_changes_output_when_enabled(pipe):
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50, re_attention=False, overwrite=True)
    without = run(pipe)
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50, s1=0.2, s2=0.2, overwrite=True)
    with_ra = run(pipe)
    assert np.abs(with_ra - without).max() > 1e-6
    safeguard.wrap(
        pipe, concepts=["red"], method="safree", min_steps=50, b1=1.0, b2=1.0, s1=1.0, s2=1.0, overwrite=True
    )
    np.testing.assert_allclose(run(pipe), without, atol=1e-5)


def test_safree_rejects_other_families_and_bad_options(pipe):
    from tiny_pipelines import tiny_sdxl

    with pytest.raises(safeguard.IncompatibleMethodError, match=r"SD 1\.x/2\.x"):
        safeguard.wrap(tiny_sdxl(), concepts=["red"], method="safree")
    with pytest.raises(safeguard.InvalidOptionError, match="projection_order"):
        safeguard.wrap(pipe, concepts=["red"], method="safree", projection_order="sideways", overwrite=True)


def test_batch_of_prompts_gets_the_same_per_prompt_decisions_as_single_calls(pipe):
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50, overwrite=True)
    prompts = ["a red star on a white background", "a blue circle"]
    singles = []
    for p in prompts:
        pipe(p, num_inference_steps=2, guidance_scale=5.0, output_type="np")
        singles.append(list(safeguard.api.get_guard(pipe).defenses[0]._entries))
    pipe(prompts, num_inference_steps=2, guidance_scale=5.0, output_type="np")
    batch = safeguard.api.get_guard(pipe).defenses[0]._entries
    report = safeguard.last_report(pipe).defenses[0].details["prompts"]
    expected = [e for s in singles for e in s]
    assert expected, "the red prompt is flagged with this config (see the test above)"
    assert [e.flagged for e in batch] == [e.flagged for e in expected]
    assert len(report) == len(expected)
    for a, b in zip(batch, expected):
        torch.testing.assert_close(a.filtered, b.filtered, atol=1e-5, rtol=1e-5)
        assert a.steps_of_50 == b.steps_of_50 and abs(a.beta - b.beta) < 1e-5
