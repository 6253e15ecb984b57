"""SAFREE: exact math of the subspace projection, the filter schedule, and the hooks' behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import FACTORIES, tiny_bert_sd

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


RED = list(safeguard.concepts.builtin_concept("red").phrases)


def reference_projector(pipe, encoder_name, key, phrases=RED):
    """P_C computed independently: each phrase encoded alone (no padding at all), pooled by hand."""
    enc = getattr(pipe, encoder_name)
    tok = getattr(pipe, encoder_name.replace("text_encoder", "tokenizer"))
    clip = "clip" in enc.config.model_type
    cols = []
    for phrase in phrases:
        ids = torch.tensor([tok(phrase).input_ids])
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        t = out[key[1]] if key[0] == "out" else out.hidden_states[key[1]]
        t = t[0].double()
        cols.append(t if t.ndim == 1 else t[-1] if clip else t.mean(0))
    return projector(torch.stack(cols, 1))


def call(pipe, prompts, steps=3, seed=0, **kw):
    if type(pipe).__name__ != "FluxPipeline":
        kw.setdefault("guidance_scale", 5.0)
    g = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, generator=g, output_type="np", **kw).images


def denoiser_inputs(pipe, prompts, **kw):
    """``call(pipe, prompts, **kw)`` with a test hook after safeguard's: the conditioning (token states,
    pooled) the denoiser really gets, per forward."""
    seen = []
    adapter = safeguard.adapters.get_adapter(pipe)
    pooled_path = adapter.pooled_layout[0] if adapter.pooled_layout else None

    def hook(module, args, kwargs):
        pooled = safeguard.adapters.base.get_path(kwargs, pooled_path) if pooled_path else None
        seen.append((kwargs["encoder_hidden_states"].clone(), None if pooled is None else pooled.clone()))

    handle = adapter.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call(pipe, prompts, **kw)
    finally:
        handle.remove()
    return seen


def original_state(stream):
    return stream.source()


@pytest.mark.parametrize("family", ["bert_sd", "sd", "sdxl", "sd3", "flux"])
def test_every_family_projects_flagged_states_out_of_the_concept_subspace_and_feeds_them_to_the_denoiser(family):
    pipe = FACTORIES[family]()
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50)
    seen = denoiser_inputs(pipe, ["a red star", "a blue circle"])
    defense = safeguard.api.get_guard(pipe).defenses[0]
    prompts, rows = defense._prompts, defense._rows  # before the reference encodings start a new call
    assert len(prompts) == 2
    expected_streams = sum(len(g) for g in defense.adapter.text_layout) + len(
        defense.adapter.pooled_layout[1] if defense.adapter.pooled_layout else ()
    )
    assert all(len(p.streams) == expected_streams for p in prompts)  # every encoder's slice was found
    assert any(s.flagged for p in prompts for s in p.streams), "random tiny encoders flag some token here"
    for p in prompts:
        for s in p.streams:
            if s.filtered is None:
                continue
            state = original_state(s)
            p_c = reference_projector(pipe, s.name, s.key)
            vectors = [s.filtered] if s.pooled else [s.filtered[i] for i in s.flagged]
            for v in vectors:
                assert (v.double() @ p_c).norm() <= 1e-5 * v.norm()
            if not s.pooled:
                keep = [i for i in range(state.shape[0]) if i not in s.flagged]
                assert torch.equal(s.filtered[keep].to(state.dtype), state[keep])  # bit-identical
    # at every step the denoiser's prompt rows are exactly the filtered rows; negative rows never change
    assert rows and len(seen) == 3
    cfg = defense.adapter.cfg_active()
    for ehs, pooled in seen:
        for r, p in rows:
            assert p.ehs is None or torch.equal(ehs[r], p.ehs)
            assert p.pooled is None or torch.equal(pooled[r], p.pooled)
        for r in range(ehs.shape[0] // 2 if cfg else 0):
            assert torch.equal(ehs[r], seen[0][0][r])
    # where each stream's flags land in the denoiser row: at its own sequence offset and features
    for r, p in rows:
        plain = seen[0][0][r].clone()
        expect = torch.zeros(plain.shape[0], dtype=torch.bool)
        for s in p.streams:
            if not s.pooled and s.filtered is not None:
                expect[[s.seq.start + i for i in s.flagged]] = True
        if p.ehs is not None:
            got = (p.ehs != defense_unfiltered_row(p, plain)).any(-1)
            assert torch.equal(got, expect)
    safeguard.unwrap(pipe)


def defense_unfiltered_row(p, like):
    row = like.clone()
    for s in p.streams:
        if not s.pooled:
            row[s.seq, s.feat] = original_state(s).to(row.dtype)
    return row


def hooks_of(pipe):
    from safeguard.core.hooks import hook_snapshot

    return [hook_snapshot(m) for m in safeguard.adapters.get_adapter(pipe).modules()]


@pytest.mark.parametrize("family", ["bert_sd", "sdxl", "sd3", "flux"])
def test_nothing_flagged_gives_bit_identical_images_on_every_family(family):
    pipe = FACTORIES[family]()
    plain = call(pipe, ["a red star", "a blue circle"])
    before = hooks_of(pipe)
    safeguard.wrap(pipe, concepts=["red"], method="safree", alpha=10.0)
    np.testing.assert_array_equal(call(pipe, ["a red star", "a blue circle"]), plain)
    report = safeguard.last_report(pipe).defenses[0]
    assert report.acted_steps == [] and all(e["flagged_tokens"] == [] for e in report.details["prompts"])
    safeguard.unwrap(pipe)
    assert hooks_of(pipe) == before  # no hook left anywhere
    np.testing.assert_array_equal(call(pipe, ["a red star", "a blue circle"]), plain)


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


def test_safree_rejects_language_models_and_bad_options(pipe):
    from tiny_llms import tiny_llama, tiny_tokenizer

    with pytest.raises(safeguard.IncompatibleMethodError, match="safree"):
        safeguard.wrap(tiny_llama(), tokenizer=tiny_tokenizer(), concepts=["red"], method="safree")
    with pytest.raises(safeguard.InvalidOptionError, match="projection_order"):
        safeguard.wrap(pipe, concepts=["red"], method="safree", projection_order="sideways", overwrite=True)


def decisions(pipe):
    return [
        (p.flagged, p.steps_of_50, round(p.beta, 5), p.ehs, p.pooled)
        for p in safeguard.api.get_guard(pipe).defenses[0]._prompts
    ]


@pytest.mark.parametrize("family", ["bert_sd", "sd3"])
def test_a_batch_gets_the_same_per_prompt_decisions_as_single_calls(family):
    pipe = FACTORIES[family]()
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50)
    prompts = ["a red star on a white background", "a blue circle"]
    singles = []
    for text in prompts:
        call(pipe, text, steps=2)
        singles += decisions(pipe)
    call(pipe, prompts, steps=2, num_images_per_prompt=2)  # 4 prompt rows, 2 prompts: decided once each
    batch = decisions(pipe)
    defense = safeguard.api.get_guard(pipe).defenses[0]
    assert len(batch) == 2 and any(d[0] for d in batch)
    # rows 4-7 are the prompt rows (after 4 negative rows), two images of each prompt in order
    assert [r for r, _ in defense._rows] == [r for r in range(4, 8) if batch[(r - 4) // 2][1] > 0]
    for (fa, sa, ba, ea, pa), (fb, sb, bb, eb, pb) in zip(batch, singles):
        assert fa == fb and sa == sb and abs(ba - bb) < 1e-4
        for x, y in ((ea, eb), (pa, pb)):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    safeguard.unwrap(pipe)


def test_prompt_embeds_from_encode_prompt_are_guarded_and_foreign_ones_warn_and_pass_unchanged():
    pipe = FACTORIES["sdxl"]()
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50)
    text_call = call(pipe, "a red star")
    flagged = decisions(pipe)[0][0]
    assert flagged
    embeds = dict(
        zip(
            ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"],
            pipe.encode_prompt(
                "a red star", device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            ),
        )
    )
    np.testing.assert_allclose(call(pipe, None, **embeds), text_call, atol=1e-6)
    assert decisions(pipe)[0][0] == flagged
    # embeddings no text encoder of this call produced: no token ids, so a warning and the plain image
    foreign = {k: v.clone() for k, v in embeds.items()}
    with safeguard.disabled(pipe):
        plain = call(pipe, None, **foreign)
    with pytest.warns(UserWarning, match="no token ids"):
        guarded = call(pipe, None, **foreign)
    np.testing.assert_array_equal(guarded, plain)
    assert safeguard.last_report(pipe).defenses[0].details["unguarded_rows"] == 1
    safeguard.unwrap(pipe)


def test_flux_true_cfg_filters_the_prompt_pass_only():
    pipe = FACTORIES["flux"]()
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50)
    seen = denoiser_inputs(pipe, "a red star", negative_prompt="a blue circle", true_cfg_scale=2.0)
    defense = safeguard.api.get_guard(pipe).defenses[0]
    assert safeguard.last_report(pipe).defenses[0].acted_steps == [0, 2, 4]  # forwards 0, 2, 4 are the prompt's
    (prompt,) = defense._prompts
    assert prompt.steps_of_50 == 50 and prompt.ehs is not None
    assert len(seen) == 6  # 3 steps x (prompt pass, negative pass)
    positive, negative = seen[0::2], seen[1::2]
    assert all(torch.equal(e[0], prompt.ehs) for e, _ in positive)
    neg_embeds = pipe.encode_prompt("a blue circle", prompt_2=None, device=pipe.device)[0]
    assert all(torch.equal(e, neg_embeds) for e, _ in negative)
    safeguard.unwrap(pipe)


def test_sd3_skip_layer_guidance_pass_gets_the_filtered_prompt_rows():
    pipe = FACTORIES["sd3"]()
    safeguard.wrap(pipe, concepts=["red"], method="safree", min_steps=50)
    seen = denoiser_inputs(
        pipe,
        ["a red star", "a blue circle"],
        skip_guidance_layers=[0],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
    )
    defense = safeguard.api.get_guard(pipe).defenses[0]
    rows = dict(defense._rows)  # guided batch rows 2, 3 are the prompts
    # 3 steps of the guided batch of 4; SD3 adds a skip-layer pass of the 2 prompts after steps 1 and 2
    skip_layer = [(ehs, pooled) for ehs, pooled in seen if ehs.shape[0] == 2]
    assert rows and len(seen) == 5 and len(skip_layer) == 2
    for ehs, pooled in skip_layer:
        for r, p in rows.items():
            assert torch.equal(ehs[r - 2], p.ehs)
            assert p.pooled is None or torch.equal(pooled[r - 2], p.pooled)
    safeguard.unwrap(pipe)
