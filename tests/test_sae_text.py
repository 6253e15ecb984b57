"""sae_text (Concept Steerers) on a tiny BERT-encoder SD pipeline with a random SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_bert_sd

import safeguard
from safeguard.core.hooks import hook_snapshot
from safeguard.sae import SAEConfig, TopKSAE, save_sae

MODULE = "text_encoder.encoder.layer.0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = tiny_bert_sd()
    folder = tmp_path_factory.mktemp("sae")
    save_sae(TopKSAE(SAEConfig(d_in=32, num_latents=128, k=8), generator=torch.Generator().manual_seed(0)), folder)
    yield pipe, str(folder)
    safeguard.unwrap(pipe)


def run(pipe, **kw):
    kw.setdefault("prompt", "a red star on a white background")
    out = pipe(
        num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np", **kw
    )
    return np.asarray(out.images)


def encode(pipe, text, vec):
    """The pipeline's encoding of ``text`` with ``vec`` added at the SAE layer (by hand)."""
    tok = pipe.tokenizer
    t = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    mask = t.attention_mask

    def hook(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        h = h + mask.unsqueeze(-1).to(h.dtype) * vec
        return (h, *o[1:]) if isinstance(o, tuple) else h

    handle = pipe.text_encoder.encoder.layer[0].register_forward_hook(hook)
    try:
        with torch.no_grad(), safeguard.disabled(pipe):
            return pipe.text_encoder(t.input_ids, attention_mask=mask)[0][0]
    finally:
        handle.remove()


def test_strength_zero_is_bit_identical_and_unwrap_restores(setup):
    pipe, folder = setup
    plain = run(pipe)
    snap = hook_snapshot(pipe.unet) | hook_snapshot(pipe.text_encoder)
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=folder, module=MODULE, strength=0.0, overwrite=True)
    assert np.array_equal(run(pipe), plain)
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=folder, module=MODULE, strength=-2.0, overwrite=True)
    assert not np.array_equal(run(pipe), plain)
    safeguard.unwrap(pipe)
    assert np.array_equal(run(pipe), plain)
    assert hook_snapshot(pipe.unet) | hook_snapshot(pipe.text_encoder) == snap


@pytest.mark.parametrize("negative_prompt", [None, "blurry, dark"])
def test_prompt_gets_the_vector_and_the_negative_prompt_its_opposite(setup, negative_prompt):
    pipe, folder = setup
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=folder, module=MODULE, strength=-2.0, overwrite=True)
    defense = safeguard.api.get_guard(pipe).defenses[0]
    vec = defense.vector
    seen = {}

    def grab(m, a, k):
        seen.setdefault("ehs", k["encoder_hidden_states"].clone())

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(pipe, negative_prompt=negative_prompt)
    finally:
        handle.remove()
    assert safeguard.last_report(pipe).defenses[0].acted_steps == [0, 1, 2]
    neg, pos = seen["ehs"]
    torch.testing.assert_close(pos, encode(pipe, "a red star on a white background", vec), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(neg, encode(pipe, negative_prompt or "", -vec), atol=1e-5, rtol=1e-5)
    safeguard.unwrap(pipe)


def test_concept_vector_is_the_bias_free_decoding_of_dense_codes(setup):
    pipe, folder = setup
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=folder, module=MODULE, strength=-0.5, overwrite=True)
    d = safeguard.api.get_guard(pipe).defenses[0]
    tok = pipe.tokenizer
    t = tok(
        [d.concepts[0].text],
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad(), safeguard.disabled(pipe):
        h = pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True).hidden_states[1][
            0
        ]
    special = torch.tensor(
        tok.get_special_tokens_mask(t.input_ids[0].tolist(), already_has_special_tokens=True), dtype=torch.bool
    )
    keep = t.attention_mask[0].bool() & ~special
    codes = torch.relu((h[keep] - d.sae.b_dec) @ d.sae.encoder.weight.T + d.sae.encoder.bias).mean(0)
    torch.testing.assert_close(d.vector, -0.5 * codes @ d.sae.W_dec, atol=1e-5, rtol=1e-4)
    safeguard.unwrap(pipe)


def test_prompt_embeds_warn_and_bad_module_raises(setup):
    pipe, folder = setup
    snap = hook_snapshot(pipe.unet)
    with pytest.raises(safeguard.InvalidOptionError, match="module"):
        safeguard.wrap(
            pipe, concepts=["red"], method="sae_text", sae=folder, module="text_encoder.nope", overwrite=True
        )
    with pytest.raises(safeguard.MissingWeightsError):
        safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae="/nonexistent", module=MODULE, overwrite=True)
    assert hook_snapshot(pipe.unet) == snap
    with torch.no_grad():
        embeds, neg = pipe.encode_prompt("a red star", "cpu", 1, True)
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=folder, module=MODULE, overwrite=True)
    with pytest.warns(UserWarning, match="prompt_embeds"):
        run(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=neg)
    # embeddings the wrapped pipeline's own encode_prompt makes right before the call are steered like text
    with torch.no_grad():
        embeds, neg = pipe.encode_prompt("a red star", "cpu", 1, True)
    np.testing.assert_allclose(
        run(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=neg), run(pipe, prompt="a red star")
    )
    safeguard.unwrap(pipe)


def denoiser_inputs(pipe, **call):
    """Run ``pipe(**call)`` and return the ``encoder_hidden_states`` of every denoiser forward, as it got them."""
    seen = []
    denoiser = safeguard.adapters.get_adapter(pipe).denoiser
    handle = denoiser.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call)
    finally:
        handle.remove()
    return seen


OWNER = {"sdxl": "text_encoder_2", "sd3": "text_encoder_3", "flux": "text_encoder_2"}


def first_layer(pipe, encoder_name):
    enc = getattr(pipe, encoder_name)
    name = next(n for n, _ in enc.named_modules() if n.endswith(("layers.0", "block.0")))
    width = getattr(enc.config, "hidden_size", None) or enc.config.d_model
    return f"{encoder_name}.{name}", enc.get_submodule(name), width


def encode_with(pipe, family, layer, vec, text):
    """``(token states, pooled)`` the pipeline's own encode_prompt gives ``text`` with ``vec`` added at ``layer``."""

    def hook(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        return (h + vec, *o[1:]) if isinstance(o, tuple) else h + vec

    handle = layer.register_forward_hook(hook, prepend=True)  # before transformers' hidden_states recorder
    try:
        with torch.no_grad(), safeguard.disabled(pipe):
            if family == "flux":
                pe, pooled, _ = pipe.encode_prompt(text, None, device=pipe.device)
                return pe, pooled
            out = pipe.encode_prompt(
                text, **({"prompt_2": None, "prompt_3": None} if family == "sd3" else {}), device=pipe.device,
                num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="",
            )  # fmt: skip
            return out[0], out[2]
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_other_families_steer_the_sae_encoder_slice_plus_on_prompts_minus_on_negatives(family, tmp_path):
    from tiny_pipelines import FACTORIES

    pipe = FACTORIES[family]()
    module, layer, width = first_layer(pipe, OWNER[family])
    sae = TopKSAE(SAEConfig(d_in=width, num_latents=4 * width, k=8), generator=torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path)
    prompt, negative = "a red star", "blurry, dark"
    kw = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=2, output_type="np")
    kw.update(true_cfg_scale=2.0) if family == "flux" else kw.update(guidance_scale=5.0)

    def images():
        return np.asarray(pipe(generator=torch.Generator().manual_seed(0), **kw).images)

    plain = images()
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=str(tmp_path), module=module, strength=0.0)
    assert np.array_equal(images(), plain)
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=str(tmp_path), module=module, strength=-2.0,
                   overwrite=True)  # fmt: skip
    vec = safeguard.api.get_guard(pipe).defenses[0].vector
    adapter = safeguard.adapters.get_adapter(pipe)
    path = adapter.pooled_layout[0]
    seen = []

    def grab(m, a, k):
        seen.append((k["encoder_hidden_states"].clone(), safeguard.adapters.base.get_path(k, path).clone()))

    handle = adapter.denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        guarded = images()
    finally:
        handle.remove()
    assert not np.array_equal(guarded, plain)
    pos, pos_pooled = encode_with(pipe, family, layer, vec, prompt)
    neg, neg_pooled = encode_with(pipe, family, layer, -vec, negative)
    if family == "flux":  # true CFG: a prompt pass, then a negative pass, per step
        expected = [(pos, pos_pooled), (neg, neg_pooled)] * 2
    else:  # batched guidance: [negative; prompt]
        expected = [(torch.cat([neg, pos]), torch.cat([neg_pooled, pos_pooled]))] * 2
    assert len(seen) == len(expected)
    for (ehs, pooled), (want_ehs, want_pooled) in zip(seen, expected):
        torch.testing.assert_close(ehs, want_ehs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pooled, want_pooled, atol=1e-6, rtol=1e-6)
    safeguard.unwrap(pipe)
    assert np.array_equal(images(), plain)


def test_sdxl_sae_over_both_encoders_splits_the_vector_between_their_layers(tmp_path):
    from tiny_pipelines import tiny_sdxl

    pipe = tiny_sdxl()
    (m1, layer1, w1), (m2, layer2, w2) = first_layer(pipe, "text_encoder"), first_layer(pipe, "text_encoder_2")
    sae = TopKSAE(SAEConfig(d_in=w1 + w2, num_latents=64, k=8), generator=torch.Generator().manual_seed(1))
    save_sae(sae, tmp_path)
    safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=str(tmp_path), module=f"{m1}+{m2}", strength=-2.0)
    vec = safeguard.api.get_guard(pipe).defenses[0].vector
    assert vec.shape == (w1 + w2,) and vec[:w1].norm() > 0 and vec[w1:].norm() > 0
    seen = denoiser_inputs(
        pipe, prompt="a red star", negative_prompt="blurry", num_inference_steps=1, guidance_scale=5.0
    )

    def encode(text, sign):
        hooks = [
            layer.register_forward_hook(
                lambda m, a, o, v=sign * v: (o[0] + v, *o[1:]) if isinstance(o, tuple) else o + v, prepend=True
            )
            for layer, v in ((layer1, vec[:w1]), (layer2, vec[w1:]))
        ]
        try:
            with torch.no_grad(), safeguard.disabled(pipe):
                return pipe.encode_prompt(text, device=pipe.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)[0]  # fmt: skip
        finally:
            for h in hooks:
                h.remove()

    torch.testing.assert_close(
        seen[0], torch.cat([encode("blurry", -1), encode("a red star", 1)]), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(safeguard.InvalidOptionError, match="expects width"):
        safeguard.wrap(pipe, concepts=["red"], method="sae_text", sae=str(tmp_path), module=m1, overwrite=True)
    safeguard.unwrap(pipe)


def test_gate_steers_only_prompts_whose_tokens_match_the_concept(setup):
    pipe, folder = setup
    prompts = ["a red star on a white background", "two blue squares"]

    def conditioning(**options):
        seen = []
        handle = pipe.unet.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True
        )
        try:
            images = run(pipe, prompt=prompts)
        finally:
            handle.remove()
        return seen[0], images

    kw = dict(concepts=["red"], method="sae_text", sae=folder, module=MODULE, strength=-2.0, overwrite=True)
    safeguard.wrap(pipe, **kw)
    with safeguard.disabled(pipe):
        plain, plain_images = conditioning()
    ungated, ungated_images = conditioning()
    safeguard.wrap(pipe, gate=-1.0, **kw)  # every prompt passes: exactly the ungated defense
    everything, everything_images = conditioning()
    assert torch.equal(everything, ungated) and np.array_equal(everything_images, ungated_images)
    assert safeguard.last_report(pipe).defenses[0].details["steered_prompts"] == [True, True]
    scores = safeguard.api.get_guard(pipe).defenses[0].concept_scores(prompts)
    assert scores[0] != scores[1]
    first = int(scores[1] > scores[0])  # the prompt that scores higher is the one steered
    safeguard.wrap(pipe, gate=float(scores.mean()), **kw)
    mixed, _ = conditioning()
    assert safeguard.last_report(pipe).defenses[0].details["steered_prompts"] == [i == first for i in range(2)]
    # rows: [negative 0, negative 1, prompt 0, prompt 1]; the other prompt and its negative are left alone
    for r in range(4):
        steered = r % 2 == first
        assert torch.equal(mixed[r], ungated[r] if steered else plain[r])
    safeguard.wrap(pipe, gate=1.0, **kw)  # nothing reaches cosine 1: the unguarded images
    assert np.array_equal(conditioning()[1], plain_images)
    with pytest.raises(safeguard.InvalidOptionError, match="gate"):
        safeguard.wrap(pipe, gate=1.5, **kw)
    safeguard.unwrap(pipe)


def test_flux_safree_then_sae_text_never_gives_the_prompt_pass_the_opposite_vector(tmp_path):
    from tiny_pipelines import FACTORIES

    from safeguard.defenses import SAETextConfig, SAFREEConfig

    pipe = FACTORIES["flux"]()
    module, layer, width = first_layer(pipe, "text_encoder_2")
    save_sae(TopKSAE(SAEConfig(d_in=width, num_latents=4 * width, k=8), generator=torch.Generator().manual_seed(0)),
             tmp_path)  # fmt: skip
    method = [
        SAFREEConfig(min_steps=17),  # filters the first of 3 steps only
        SAETextConfig(sae=str(tmp_path), module=module, strength=-2.0),
    ]
    safeguard.wrap(pipe, concepts=["red"], method=method)
    vec = safeguard.api.get_guard(pipe).defenses[1].vector
    seen = denoiser_inputs(
        pipe, prompt="a red star", negative_prompt="blurry, dark", true_cfg_scale=2.0, num_inference_steps=3
    )
    pos, _ = encode_with(pipe, "flux", layer, vec, "a red star")
    neg, _ = encode_with(pipe, "flux", layer, -vec, "blurry, dark")
    assert len(seen) == 6
    assert not torch.equal(seen[0], pos)  # step 0: SAFREE's filtered rows
    for i in (2, 4):  # later prompt passes: the +v encoding, never the -v one
        torch.testing.assert_close(seen[i], pos, atol=1e-6, rtol=1e-6)
    for i in (1, 3, 5):  # negative passes: -v
        torch.testing.assert_close(seen[i], neg, atol=1e-6, rtol=1e-6)
    safeguard.unwrap(pipe)
