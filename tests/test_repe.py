"""RepE steering on tiny random causal LMs: exact math, cache parity, per-row decisions, unwrap, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_llms import FAMILIES, tiny_causal_lm, tiny_gpt2, tiny_llama, tiny_tokenizer

import safeguard
from safeguard.core.hooks import hook_snapshot
from safeguard.defenses.repe import RepEConfig
from safeguard.steering.ops import ablate_direction, add_vector, replace_hidden
from safeguard.steering.reading import collect_states, read_directions
from safeguard.steering.vectors import SteeringVectors


def random_vectors(
    num_layers: int, hidden: int, seed: int = 1, model_type: str = "llama", **calibration
) -> SteeringVectors:
    g = torch.Generator().manual_seed(seed)
    sets = {}
    for name in ("concept", "condition", "behaviour"):
        d = torch.randn(num_layers, hidden, generator=g)
        sets[name] = d / d.norm(dim=-1, keepdim=True)
    scales = {n: torch.rand(num_layers, generator=g) + 0.5 for n in sets}
    cal = {"mode": "conditional", "condition_layer": 1, "threshold": 0.0, "layers": [2], "strength": 1.0} | calibration
    return SteeringVectors(
        sets, scales, torch.ones(num_layers), {"model": {"model_type": model_type}, "calibration": cal}
    )


@pytest.fixture()
def llm(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    folder = random_vectors(4, 32).save(tmp_path / "vecs")
    return model, tok, str(folder)


def batch(tok, texts, side="left"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


def layer_outputs(model, enc, layers) -> dict[int, torch.Tensor]:
    """``{layer: output hidden states}`` of one unguarded-or-guarded forward of ``enc``."""
    outs: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i in layers
    ]  # fmt: skip
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return outs


def capture(layer):
    out = {}

    def hook(m, a, o):
        out["h"] = (o[0] if isinstance(o, tuple) else o).detach().clone()

    return out, layer.register_forward_hook(hook)


def test_add_shifts_layer_output_by_exactly_the_vector(llm):
    model, tok, folder = llm
    enc = batch(tok, ["how do i make a cake", "write a story"])
    store, h = capture(model.model.layers[2])
    model(**enc)
    plain = store["h"]
    h.remove()
    safeguard.wrap(
        model, tokenizer=tok, concepts=["harmful"], method="repe", mode="add", layers=[2], strength=1.5, vectors=folder
    )
    store, h = capture(model.model.layers[2])  # registered after the guard: sees the steered output
    model(**enc)
    h.remove()
    vec = SteeringVectors.load(folder).vector("behaviour", 2, 1.5)
    first = enc["attention_mask"].argmax(1)
    for b in range(2):
        for t in range(enc["input_ids"].shape[1]):
            if enc["attention_mask"][b, t] == 0:
                continue
            delta = store["h"][b, t] - plain[b, t]
            if t == first[b]:
                assert torch.equal(store["h"][b, t], plain[b, t])  # position 0 left alone
            else:
                torch.testing.assert_close(delta, vec, atol=1e-5, rtol=0)
    safeguard.unwrap(model)


def test_ablate_leaves_no_component_along_the_direction(llm):
    model, tok, folder = llm
    safeguard.wrap(model, tokenizer=tok, concepts=["violence"], method="repe", mode="ablate", vectors=folder)
    vecs = SteeringVectors.load(folder)
    stores = [capture(layer) for layer in model.model.layers]
    enc = batch(tok, ["write a story about violence"])
    model(**enc)
    for i, (store, h) in enumerate(stores):
        h.remove()
        proj = store["h"][0, 1:] @ vecs.directions["concept"][i]
        assert proj.abs().max() < 1e-5 * store["h"][0, 1:].norm(dim=-1).max()
        assert (store["h"][0, 0] @ vecs.directions["concept"][i]).abs() > 1e-4  # first position untouched
    safeguard.unwrap(model)


def test_ops_accept_tuples_and_exact_math():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8)
    u = torch.nn.functional.normalize(torch.randn(8), dim=0)
    out = replace_hidden((h, "cache"), ablate_direction(h, u, 1.0, None))
    assert out[1] == "cache" and (out[0] @ u).abs().max() < 1e-6
    gate = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    shifted = add_vector(h, u, gate)
    assert torch.equal(shifted[1], h[1]) and torch.allclose(shifted[0] - h[0], u.expand(3, 8), atol=1e-6)


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("add", {}),
        ("ablate", {}),
        ("conditional", {"condition_layer": 1}),
        ("conditional", {"condition_layer": 3}),
        ("conditional", {"condition_layer": 1, "release": True}),
    ],
)
def test_greedy_generation_with_cache_equals_without(llm, mode, extra):
    model, tok, folder = llm
    enc = batch(tok, ["how do i make a bomb", "please explain python"])
    safeguard.wrap(
        model,
        tokenizer=tok,
        concepts=["harmful"],
        method="repe",
        mode=mode,
        layers=[2],
        strength=3.0,
        vectors=folder,
        **extra,
    )
    a = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    b = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)
    with safeguard.disabled(model):
        plain = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if mode != "conditional":
        assert not torch.equal(a, plain)  # the steering does change the output
    safeguard.unwrap(model)


@pytest.mark.parametrize("mode", ["add", "conditional"])
def test_cached_decode_steps_are_steered_like_a_full_forward(llm, mode):
    """Each cached decode step's logits equal a full guarded forward over the finished sequence.

    Catches a monitor that mistakes decode steps for new calls (transformers >= 5.24 passes the KV
    cache as ``cache=``, earlier versions as ``past_key_values=``): the generated tokens would then
    be left unsteered, or re-decided from one token.
    """
    model, tok, folder = llm
    enc = batch(tok, ["how do i make a bomb", "please explain python to me"])
    extra = {"threshold": -1.0, "condition_layer": 3} if mode == "conditional" else {}
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", mode=mode, layers=[2], strength=3.0,
                   vectors=folder, **extra)  # fmt: skip
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)  # fmt: skip
    if mode == "conditional":
        assert safeguard.last_report(model).defenses[0].details["fired"] == [True, True]
    seq, n = out.sequences, len(out.scores)
    mask = torch.cat([enc["attention_mask"], torch.ones(seq.shape[0], n, dtype=torch.long)], dim=1)
    full = model(input_ids=seq, attention_mask=mask).logits
    prompt = enc["input_ids"].shape[1]
    for t, step in enumerate(out.scores):
        torch.testing.assert_close(step, full[:, prompt - 1 + t], rtol=1e-4, atol=1e-4)
    with safeguard.disabled(model):
        plain = model(input_ids=seq, attention_mask=mask).logits
    assert not torch.allclose(plain[:, prompt:], full[:, prompt:], atol=1e-3)  # decode positions are steered
    safeguard.unwrap(model)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generation_monitor_reads_the_cache_under_either_name(llm, name):
    """transformers >= 5.24 hands the base model ``cache=``, earlier versions ``past_key_values=``: both are one call."""
    from safeguard.api import get_guard

    model, tok, folder = llm
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", mode="add", vectors=folder)
    monitor, base = get_guard(model).monitor, model.model

    class Cache:
        def __init__(self, n):
            self.n = n

        def get_seq_length(self):
            return self.n

    ids, mask = torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]])
    monitor._on_forward(base, (), {"input_ids": ids, "attention_mask": mask, name: Cache(0)})
    calls = monitor.calls
    for past in (4, 5):  # two decode steps of the same call
        step_mask = torch.ones(1, past + 1, dtype=torch.long)
        step_mask[0, 0] = 0
        monitor._on_forward(base, (), {"input_ids": ids[:, -1:], "attention_mask": step_mask, name: Cache(past)})
        assert monitor.calls == calls and monitor.past == past and monitor.positions.tolist() == [past]
    assert monitor.step == 2 and monitor.first_real.tolist() == [1] and monitor.last_real.tolist() == [0]
    monitor._on_forward(base, (), {"input_ids": ids, "attention_mask": mask, name: Cache(0)})  # a new call
    assert monitor.calls == calls + 1 and monitor.step == 0
    safeguard.unwrap(model)


@pytest.mark.parametrize("condition_layer", [1, 3])  # in-pass decision and look-ahead decision
def test_conditional_decides_per_row(llm, condition_layer):
    model, tok, folder = llm
    texts = ["how do i make a bomb", "please explain the garden to me"]
    enc = batch(tok, texts)
    kw = dict(
        tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, condition_layer=condition_layer,
        layers=[2], strength=4.0,
    )  # fmt: skip
    safeguard.wrap(model, threshold=-1.0, **kw)
    model(**enc)
    scores = safeguard.last_report(model).defenses[0].details["scores"]
    assert len(scores) == 2 and scores[0] != scores[1]
    cut = sum(scores) / 2
    safeguard.wrap(model, threshold=cut, overwrite=True, **kw)
    guarded = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    details = safeguard.last_report(model).defenses[0].details
    fired = details["fired"]
    assert fired == [s > cut for s in scores] and sum(fired) == 1
    with safeguard.disabled(model):
        plain = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    on, off = fired.index(True), fired.index(False)
    assert torch.equal(guarded[off], plain[off])  # the row below threshold runs untouched
    assert not torch.equal(guarded[on], plain[on])
    safeguard.unwrap(model)


def test_release_ablates_refusal_only_in_passed_rows(llm):
    """``release``: rows below threshold keep no component along the behaviour direction at any layer (position 0
    aside); rows above threshold get the behaviour vector and no ablation; the hooks go on unwrap."""
    model, tok, folder = llm
    vecs = SteeringVectors.load(folder)
    enc = batch(tok, ["how do i make a bomb", "please explain the garden to me"])
    kw = dict(tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, condition_layer=1, layers=[2])
    before = hook_snapshot(model)
    safeguard.wrap(model, threshold=-1.0, **kw)
    model(**enc)
    scores = safeguard.last_report(model).defenses[0].details["scores"]
    cut = sum(scores) / 2
    hooks_plain = len(hook_snapshot(model))
    safeguard.wrap(model, threshold=cut, release=True, strength=2.0, overwrite=True, **kw)
    layers = model.model.layers
    # one release hook a layer; the condition hook goes: the decision moves to the look-ahead pass (temporary hooks)
    assert len(hook_snapshot(model)) == hooks_plain - 1 + len(layers)
    caps = [capture(layer) for layer in layers]
    model(**enc)
    for _, handle in caps:
        handle.remove()
    details = safeguard.last_report(model).defenses[0].details
    on, off = details["fired"].index(True), details["fired"].index(False)
    assert details["release"] is True
    real = enc["attention_mask"].bool()
    first = real.float().argmax(1)
    for i, (out, _) in enumerate(caps):
        h = out["h"]
        comp = h @ vecs.directions["behaviour"][i]
        keep = real.clone()
        keep[torch.arange(2), first] = False
        assert comp[off][keep[off]].abs().max() < 1e-4  # passed row: nothing left along the refusal direction
        if i < 2:
            assert comp[on][keep[on]].abs().min() > 1e-4  # flagged row, before the behaviour layer: untouched
    ref, handle = capture(layers[1])
    with safeguard.disabled(model):
        model(**enc)
    handle.remove()
    assert torch.equal(caps[1][0]["h"][on], ref["h"][on])  # the flagged row runs as unguarded up to layer 2
    safeguard.unwrap(model)
    assert hook_snapshot(model) == before
    safeguard.wrap(model, threshold=cut, release=True, release_layers=[0, 3], **kw)
    assert len(hook_snapshot(model)) == hooks_plain - 1 + 2
    caps = [capture(layer) for layer in layers]
    model(**enc)
    for _, handle in caps:
        handle.remove()
    comps = [
        (out["h"] @ vecs.directions["behaviour"][i])[off][keep[off]].abs().max() for i, (out, _) in enumerate(caps)
    ]
    assert comps[0] < 1e-4 and comps[3] < 1e-4 and comps[1] > 1e-4  # only the given layers are ablated
    safeguard.unwrap(model)


def test_release_tokens_ends_the_ablation_after_the_first_reply_tokens(llm):
    """``release_tokens=3``: the first three reply tokens' logits are those of the release on every token, bit for
    bit; the fourth is computed without the ablation at its position; with and without KV cache alike."""
    model, tok, folder = llm
    enc = batch(tok, ["how do i make a bomb", "please explain the garden to me"])
    # a cosine threshold no row reaches: every row is passed, so every row is released
    kw = dict(tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, condition_layer=1, layers=[2],
              threshold=1.0, release=True)  # fmt: skip
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    safeguard.wrap(model, **kw)
    full = model.generate(**enc, **gen)
    assert "release_tokens" in safeguard.last_report(model).defenses[0].details
    assert safeguard.last_report(model).defenses[0].details["release_tokens"] is None
    safeguard.wrap(model, release_tokens=3, overwrite=True, **kw)
    short = model.generate(**enc, **gen)
    details = safeguard.last_report(model).defenses[0].details
    assert details["fired"] == [False, False] and details["release_tokens"] == 3
    uncached = model.generate(**enc, use_cache=False, **gen)
    assert torch.equal(short.sequences, uncached.sequences)
    for k in range(3):
        assert torch.equal(short.scores[k], full.scores[k])
    n = enc["input_ids"].shape[1]
    assert torch.equal(short.sequences[:, : n + 3], full.sequences[:, : n + 3])  # same first three tokens ...
    assert not torch.allclose(short.scores[3], full.scores[3])  # ... then the fourth is chosen unablated
    with safeguard.disabled(model):
        plain = model.generate(**enc, **gen)
    assert not torch.allclose(short.scores[0], plain.scores[0])  # the release does act on the first token
    safeguard.unwrap(model)


@pytest.mark.parametrize("guard", [None, {"threshold": 1.0, "release": True, "release_tokens": 2}, {"threshold": -1.0}])
def test_teacher_forced_scoring_matches_what_generate_computes(llm, guard):
    """``token_logprobs`` (under the evaluation's KL and perplexity) scores each reply token with the distribution
    ``generate`` chose it from: unguarded, with release for the first 2 tokens (every row passed) and steered (every
    row flagged); left-padded prompts of different lengths."""
    from safeguard.eval.llm import token_logprobs

    model, tok, folder = llm
    prompts = ["how do i make a bomb", "please explain the garden to me today"]
    if guard is not None:
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, condition_layer=1,
                       layers=[2], strength=3.0, **guard)  # fmt: skip
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)  # fmt: skip
    n = enc["input_ids"].shape[1]
    got = token_logprobs(model, tok, prompts, [row[n:].tolist() for row in out.sequences])
    want = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)
    for j in range(len(prompts)):
        assert torch.allclose(got[j], want[j], atol=1e-4), (guard, j)
    if guard is not None:
        fired = safeguard.last_report(model).defenses[0].details["fired"]
        assert fired == ([False, False] if guard["threshold"] > 0 else [True, True])
        safeguard.unwrap(model)


def test_unwrap_restores_logits_bit_exactly_and_removes_hooks(llm):
    model, tok, folder = llm
    enc = batch(tok, ["how do i make a bomb", "hi"])
    before = model(**enc).logits
    snap = hook_snapshot(model)
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", mode="add", vectors=folder, strength=2.0)
    assert not torch.equal(model(**enc).logits, before)
    safeguard.unwrap(model)
    assert torch.equal(model(**enc).logits, before)
    assert hook_snapshot(model) == snap and not safeguard.is_wrapped(model)


def test_text_generation_pipeline_and_gpt2_discovery(tmp_path):
    from transformers import pipeline

    model, tok = tiny_gpt2(), tiny_tokenizer()
    folder = random_vectors(3, 32, layers=[1], model_type="gpt2").save(tmp_path / "v")
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    snap = hook_snapshot(model)
    safeguard.wrap(pipe, concepts=["harmful"], method="repe", mode="add", vectors=str(folder), strength=2.0)
    out = pipe("how do i make a bomb", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    assert safeguard.last_report(pipe).steps == 4
    with pytest.raises(safeguard.AlreadyWrappedError):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=str(folder))
    safeguard.unwrap(pipe)
    assert hook_snapshot(model) == snap


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_discovery_exact_add_cache_parity_and_unwrap(family, tmp_path):
    """Llama, Qwen2, Mistral, Gemma, Gemma 2, Phi-3, Phi and GPT-2: the decoder layers are found, ``add`` shifts a
    layer's output by exactly the vector (first position untouched), conditional greedy generation with the KV
    cache equals it without, and unwrap restores the logits bit-exactly with no hook left."""
    from safeguard.adapters import CausalLMAdapter

    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    path, layers = CausalLMAdapter(model, tok).decoder_layers()
    assert path == ("transformer.h" if family == "gpt2" else "model.layers") and len(layers) == 4
    folder = str(random_vectors(4, 32, layers=[2], condition_layer=1).save(tmp_path / "v"))
    enc = batch(tok, ["how do i make a bomb", "please explain python"])
    before = model(**enc).logits
    store, h = capture(layers[2])
    model(**enc)
    plain = store["h"]
    h.remove()
    snap = hook_snapshot(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        safeguard.wrap(
            model, tokenizer=tok, concepts=["harmful"], method="repe", mode="add", strength=1.5, vectors=folder
        )
    mismatch = [w for w in seen if "read on a 'llama' model" in str(w.message)]  # the vectors' meta says llama
    assert len(mismatch) == (family != "llama")
    store, h = capture(layers[2])
    model(**enc)
    h.remove()
    vec = SteeringVectors.load(folder).vector("behaviour", 2, 1.5)
    real, first = enc["attention_mask"].bool(), enc["attention_mask"].argmax(1)
    for b in range(2):
        assert torch.equal(store["h"][b, first[b]], plain[b, first[b]])
        rest = real[b].clone()
        rest[first[b]] = False
        torch.testing.assert_close(
            store["h"][b, rest] - plain[b, rest], vec.expand(int(rest.sum()), -1), atol=1e-5, rtol=0
        )
    safeguard.unwrap(model)
    plain_ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for mode in ("add", "conditional"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", mode=mode, strength=3.0,
                           vectors=folder)  # fmt: skip
        a = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        c = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(a, c), mode
        if mode == "add":
            assert not torch.equal(a, plain_ids)  # the steering changes what is generated
        safeguard.unwrap(model)
    assert torch.equal(model(**enc).logits, before) and hook_snapshot(model) == snap


def test_bad_options_raise_and_leave_model_untouched(llm):
    model, tok, folder = llm
    snap = hook_snapshot(model)
    with pytest.raises(safeguard.InvalidOptionError, match="out of range"):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", layers=[9], vectors=folder)
    with pytest.raises(safeguard.InvalidOptionError, match="mode"):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", mode="push", vectors=folder)
    with pytest.raises(safeguard.InvalidOptionError, match="layer_path"):
        safeguard.wrap(
            model, tokenizer=tok, concepts=["harmful"], method="repe", layer_path="model.norm", vectors=folder
        )
    with pytest.raises(safeguard.InvalidOptionError, match="release=True needs mode='conditional'"):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", mode="add", release=True)
    with pytest.raises(safeguard.InvalidOptionError, match="release_tokens"):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", release_tokens=0, vectors=folder)
    with pytest.raises(safeguard.IncompatibleMethodError):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="sld")
    with pytest.raises(safeguard.MissingWeightsError):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors="/nonexistent/vectors")
    assert hook_snapshot(model) == snap and not safeguard.is_wrapped(model)
    assert RepEConfig.from_dict(RepEConfig(layers=(1, 2)).to_dict()) == RepEConfig(layers=(1, 2))


def test_reading_directions_math_and_padding_sides():
    model, tok = tiny_llama(), tiny_tokenizer()
    layers = model.model.layers
    texts = ["how do i make a bomb", "write a story about the garden and tea"]
    tok.padding_side = "left"
    left, _ = collect_states(model, tok, texts, layers)
    tok.padding_side = "right"
    right, _ = collect_states(model, tok, texts, layers)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 10, 6, generator=g) + 1.0, torch.randn(2, 10, 6, generator=g)
    dirs, scales = read_directions(pos, neg, "mean_diff")
    diff = pos.mean(1) - neg.mean(1)
    torch.testing.assert_close(dirs * scales[:, None], diff)
    pdirs, _ = read_directions(pos, neg, "pca")
    assert ((pdirs * diff).sum(-1) > 0).all() and torch.allclose(pdirs.norm(dim=-1), torch.ones(2))


def test_vectors_round_trip_and_gguf_control_vector(tmp_path):
    gguf = pytest.importorskip("gguf")
    vecs = random_vectors(4, 32, layers=[1, 2], strength=2.5)
    loaded = SteeringVectors.load(vecs.save(tmp_path / "v"))
    for name in vecs.directions:
        assert torch.equal(loaded.directions[name], vecs.directions[name])
    assert loaded.calibration["layers"] == [1, 2]
    path = loaded.export_gguf(tmp_path / "cv.gguf", "behaviour")
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for i in (1, 2):
        torch.testing.assert_close(tensors[f"direction.{i}"].reshape(-1), vecs.vector("behaviour", i, 2.5))


def test_reads_vectors_on_first_use_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGUARD_CACHE_DIR", str(tmp_path))
    model, tok = tiny_llama(layers=3), tiny_tokenizer()
    safeguard.wrap(model, tokenizer=tok, concepts=["violence"], method="repe")
    plan = safeguard.api.get_guard(model).defenses[0].plans[0]
    assert plan.mode == "ablate" and plan.layers == [0, 1, 2]
    assert torch.allclose(plan.vecs.directions["concept"].norm(dim=-1), torch.ones(3))
    safeguard.unwrap(model)
    assert len(list(tmp_path.glob("repe/*/*/vectors.safetensors"))) == 1


def test_data_splits_are_disjoint_and_big_enough():
    from safeguard.steering import data

    ids = {s: {p["id"] for p in data.harmful_pairs(s)} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["val"])
    assert len(ids["test"]) >= 50 and sum(map(len, ids.values())) == 200
    scary = {s: {p["id"] for p in data.scary_harmless(s)} for s in ("train", "test")}
    assert not (scary["train"] & scary["test"]) and len(scary["test"]) + len(ids["test"]) >= 100
    cats = {p["category"] for p in data.harmful_pairs("test")}
    assert cats == {"weapons", "cybercrime", "fraud", "drugs", "violence", "self_harm", "hate", "privacy"}
    train_t, _ = data.topic_pairs(["a bloody battle"], "train")
    test_t, _ = data.topic_pairs(["a bloody battle"], "test")
    assert not set(train_t) & set(test_t)  # held-out templates


def test_extra_pairs_are_training_only():
    from safeguard.core.errors import InvalidOptionError
    from safeguard.steering import data

    extra = data.extra_pairs()
    assert len(extra) == 240 and {p["category"] for p in extra} == {p["category"] for p in data.harmful_pairs("test")}
    assert all(sum(p["category"] == c for p in extra) == 30 for c in {p["category"] for p in extra})
    train = data.harmful_pairs("train", extra=True)
    assert train[:104] == data.harmful_pairs("train") and train[104:] == extra
    assert len({p["id"] for p in train}) == 344 and all("-x" in p["id"] for p in extra)
    held_out = {p[k] for s in ("val", "test") for p in data.harmful_pairs(s) for k in ("harmful", "harmless")}
    assert not held_out & {p[k] for p in extra for k in ("harmful", "harmless")}
    with pytest.raises(InvalidOptionError):
        data.harmful_pairs("test", extra=True)


def test_extra_scary_prompts_are_training_only():
    from safeguard.core.errors import InvalidOptionError
    from safeguard.steering import data

    extra = data.extra_scary_harmless()
    cats = {p["category"] for p in data.scary_harmless("test")}
    assert len(extra) == 200 and {p["category"] for p in extra} == cats
    assert all(sum(p["category"] == c for p in extra) == 25 for c in cats)
    train = data.scary_harmless("train", extra=True)
    assert train[:48] == data.scary_harmless("train") and train[48:] == extra
    assert len({p["id"] for p in train}) == 248 and all(p["id"].startswith("scary-x") for p in extra)
    assert len({p["prompt"] for p in extra}) == 200
    held_out = {p["prompt"] for p in data.scary_harmless("test")}
    held_out |= {p[k] for s in ("val", "test") for p in data.harmful_pairs(s) for k in ("harmful", "harmless")}
    assert not held_out & {p["prompt"] for p in extra}
    with pytest.raises(InvalidOptionError):
        data.scary_harmless("test", extra=True)


def test_fresh_held_out_set_is_separate_and_checked():
    from safeguard.core.errors import InvalidOptionError
    from safeguard.eval.llm import run_llm_eval
    from safeguard.steering import data

    fresh, scary = data.harmful_pairs("fresh"), data.scary_harmless("fresh")
    cats = {p["category"] for p in data.harmful_pairs("test")}
    assert len(fresh) == 80 and all(sum(p["category"] == c for p in fresh) == 10 for c in cats)
    assert len(scary) == 40 and {p["category"] for p in scary} == {p["category"] for p in data.scary_harmless("test")}
    assert all("-f" in p["id"] for p in fresh) and all(p["id"].startswith("scary-f") for p in scary)
    others = {p[k] for s in ("train", "val", "test") for p in data.harmful_pairs(s) for k in ("harmful", "harmless")}
    others |= {p[k] for p in data.extra_pairs() for k in ("harmful", "harmless")}
    others |= {p["prompt"] for p in data.scary_harmless("train", extra=True) + data.scary_harmless("test")}
    assert not others & ({p[k] for p in fresh for k in ("harmful", "harmless")} | {p["prompt"] for p in scary})
    with pytest.raises(InvalidOptionError):
        data.harmful_pairs("fresh", extra=True)
    with pytest.raises(InvalidOptionError, match="split='val'"):
        run_llm_eval(None, None, "harmful", split="val")  # refused before anything is wrapped


def test_second_extra_files_and_fresh2_set_are_separate():
    from safeguard.core.errors import InvalidOptionError
    from safeguard.steering import data

    pairs, scary = data.extra_pairs("extra2"), data.extra_scary_harmless("extra2")
    cats = {p["category"] for p in data.harmful_pairs("test")}
    assert len(pairs) == 280 and {p["category"] for p in pairs} == cats and all("-y" in p["id"] for p in pairs)
    assert len(scary) == 132 and all(p["id"].startswith("scary-y") for p in scary)
    fresh2, scary2 = data.harmful_pairs("fresh2"), data.scary_harmless("fresh2")
    assert len(fresh2) == 80 and all(sum(p["category"] == c for p in fresh2) == 10 for c in cats)
    assert len(scary2) == 40 and all("-g" in p["id"] for p in fresh2 + scary2)
    held = {
        p[k] for s in ("val", "test", "fresh", "fresh2") for p in data.harmful_pairs(s) for k in ("harmful", "harmless")
    }
    held |= {p["prompt"] for s in ("test", "fresh", "fresh2") for p in data.scary_harmless(s)}
    training = {p[k] for w in data.EXTRA for p in data.extra_pairs(w) for k in ("harmful", "harmless")}
    training |= {p["prompt"] for w in data.EXTRA for p in data.extra_scary_harmless(w)}
    training |= {p[k] for p in data.harmful_pairs("train") for k in ("harmful", "harmless")}
    assert not held & training
    with pytest.raises(InvalidOptionError, match="extra4"):
        data.extra_pairs("extra4")
    with pytest.raises(InvalidOptionError):
        data.harmful_pairs("fresh2", extra=True)


def test_third_extra_files_are_training_only_balanced_and_new():
    from safeguard.steering import data

    pairs, scary = data.extra_pairs("extra3"), data.extra_scary_harmless("extra3")
    cats = {p["category"] for p in data.harmful_pairs("test")}
    assert len(pairs) == 317 and all(sum(p["category"] == c for p in pairs) >= 30 for c in cats)
    assert len(scary) == 117 and len({p["category"] for p in scary}) == 8
    assert all("-z" in p["id"] for p in pairs) and all(p["id"].startswith("scary-z") for p in scary)
    assert len({p["id"] for p in pairs + scary}) == len(pairs) + len(scary)
    mine = [p[k] for p in pairs for k in ("harmful", "harmless")] + [p["prompt"] for p in scary]
    assert len(set(mine)) == len(mine) and all(p["harmful"] != p["harmless"] for p in pairs)
    others = {
        p[k] for s in ("train", "val", *data.HELD_OUT) for p in data.harmful_pairs(s) for k in ("harmful", "harmless")
    }
    others |= {p[k] for w in ("extra", "extra2") for p in data.extra_pairs(w) for k in ("harmful", "harmless")}
    others |= {p["prompt"] for s in ("train", *data.HELD_OUT) for p in data.scary_harmless(s)}
    others |= {p["prompt"] for w in ("extra", "extra2") for p in data.extra_scary_harmless(w)}
    assert not set(mine) & others
    assert "extra3" in data.EXTRA and "extra3" not in data.HELD_OUT


@pytest.mark.parametrize(
    "split,tag",
    [
        ("fresh3", "-h"),
        ("fresh4", "-i"),
        ("fresh5", "-j"),
        ("fresh6", "-k"),
        ("fresh7", "-l"),
        ("fresh8", "-m"),
        ("fresh9", "-n"),
        ("fresh10", "-o"),
        ("fresh11", "-p"),
        ("fresh12", "-q"),
        ("fresh13", "-r"),
        ("fresh14", "-s"),
        ("fresh15", "-t"),
        ("fresh16", "-u"),
        ("fresh17", "-v"),
        ("fresh18", "-w"),
        ("fresh19", "-x"),
        ("fresh20", "-y"),
    ],
)
def test_late_held_out_sets_are_whole_balanced_and_disjoint_from_everything_else(split, tag):
    from safeguard.core.errors import InvalidOptionError
    from safeguard.steering import data

    pairs, scary = data.harmful_pairs(split), data.scary_harmless(split)
    cats = {p["category"] for p in data.harmful_pairs("test")}
    assert len(pairs) == 80 and all(sum(p["category"] == c for p in pairs) == 10 for c in cats)
    assert len(scary) == 40 and len({p["category"] for p in scary}) == 8
    assert all(tag in p["id"] for p in pairs + scary)
    assert split in data.HELD_OUT and split in data.LATER
    mine = {p[k] for p in pairs for k in ("harmful", "harmless")} | {p["prompt"] for p in scary}
    rest = [s for s in ("train", "val", *data.HELD_OUT) if s != split]
    others = {p[k] for s in rest for p in data.harmful_pairs(s) for k in ("harmful", "harmless")}
    others |= {p[k] for w in data.EXTRA for p in data.extra_pairs(w) for k in ("harmful", "harmless")}
    others |= {p["prompt"] for s in rest if s != "val" for p in data.scary_harmless(s)}
    others |= {p["prompt"] for w in data.EXTRA for p in data.extra_scary_harmless(w)}
    assert len(mine) == 200 and not mine & others
    with pytest.raises(InvalidOptionError):
        data.scary_harmless(split, extra=True)


def test_training_only_data_is_far_from_held_out_prompts():
    """The leakage check of the extra training files passes (no item above MiniLM cosine 0.75 to val/test)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "scripts/data_leakage_check.py"], capture_output=True, text=True, cwd=repo, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    sizes = [("extra_scary", 200), ("extra_pairs", 480), ("extra2_scary", 132), ("extra2_pairs", 560)]
    sizes += [("extra3_scary", 117), ("extra3_pairs", 634)]
    sizes += [("fresh_pairs", 160), ("fresh2_pairs", 136), ("fresh3_pairs", 152), ("fresh4_pairs", 150)]
    sizes += [("fresh5_pairs", 160), ("fresh5_scary", 40), ("fresh6_pairs", 160), ("fresh7_scary", 40)]
    sizes += [("fresh8_pairs", 160), ("fresh9_scary", 40), ("fresh10_pairs", 160), ("fresh10_scary", 40)]
    sizes += [("fresh11_pairs", 160), ("fresh12_scary", 40), ("fresh13_pairs", 160), ("fresh14_scary", 40)]
    sizes += [("fresh15_pairs", 160), ("fresh16_scary", 40), ("fresh17_pairs", 160), ("fresh18_scary", 40)]
    for name, n in sizes:
        for split in ("test", "val", "fresh19", "fresh20"):  # the sets still held out
            assert f"{name}_vs_{split} ".ljust(24) + f"n={n:3d}" in res.stdout
        # a retired set is training data, not a reference
        for retired in ("fresh", "fresh5", "fresh7", "fresh9", "fresh11", "fresh13", "fresh15", "fresh17", "fresh18"):
            assert f"{name}_vs_{retired} " not in res.stdout


def test_held_out_selection_skips_candidates_near_any_earlier_prompt():
    """scripts/select_heldout.py: a candidate is kept only if no text is above the bar to a reference or kept item."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "select_heldout.py"
    spec = importlib.util.spec_from_file_location("select_heldout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    basis = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0], "ab": [0.8, 0.6, 0.0]}

    def embed(texts):
        return torch.tensor([basis[t] for t in texts])

    sel = mod.Selector(embed, ["a"], threshold=0.75)
    assert not sel.offer(["b", "ab"])  # "ab" is at cosine 0.8 to the reference "a"
    assert sel.offer(["b", "c"]) and sel.highest_kept == 0.0
    assert not sel.offer(["b"])  # now "b" is a kept item: a duplicate of it is skipped
    assert sel.skipped == 2 and sel.ref.shape == (3, 3)
    assert len(mod.project_prompts()) >= 4000  # every pair side and scary-word prompt of every file


def test_wrapped_pairs_put_both_sides_of_training_pairs_in_one_template():
    from safeguard.core.errors import InvalidOptionError
    from safeguard.steering import data

    pool = data.harmful_pairs("train") + data.extra_pairs("extra") + data.extra_pairs("extra2")
    by_id = {p["id"]: p for p in pool}
    templates = data._load("task_wrappers.json")["templates"]
    assert all(t.count("{request}") == 1 for t in templates) and len(set(templates)) == len(templates)
    wrapped = data.wrapped_pairs(200, seed=3)
    assert wrapped == data.wrapped_pairs(200, seed=3) and wrapped != data.wrapped_pairs(200, seed=4)
    assert len({p["id"] for p in wrapped}) == 200
    for pair in wrapped:
        source_id, k = pair["id"].rsplit("-w", 1)
        src, template = by_id[source_id], templates[int(k)]  # a training pair (never a held-out one)
        assert pair["category"] == src["category"]
        assert pair["harmful"] == template.format(request=src["harmful"])
        assert pair["harmless"] == template.format(request=src["harmless"])
    assert len(data.wrapped_pairs(len(pool))) == len(pool)  # every training pair, each once
    assert data.wrapped_pairs(0) == []
    with pytest.raises(InvalidOptionError, match="between 0 and"):
        data.wrapped_pairs(len(pool) + 1)


def test_retired_sets_serve_as_training_data_less_their_exclusions():
    from types import SimpleNamespace

    from safeguard.core.errors import InvalidOptionError
    from safeguard.eval.llm import _trained_on
    from safeguard.steering import data

    excluded = data.retired_exclusions()
    assert set(excluded) == set(data.RETIRED) and not set(data.RETIRED) & {"test", "fresh19", "fresh20"}
    still = ("test", "fresh19", "fresh20")
    assert data.STILL_HELD_OUT == still
    held = {p[k] for s in ("val", *still) for p in data.harmful_pairs(s) for k in ("harmful", "harmless")}
    held |= {p["prompt"] for s in still for p in data.scary_harmless(s)}
    for split in data.RETIRED:
        whole, kept = data.harmful_pairs(split), data.extra_pairs(split)
        scary, kept_scary = data.scary_harmless(split), data.extra_scary_harmless(split)
        assert [p for p in whole if p["id"] not in excluded[split]] == kept  # the same items, order kept
        assert [p for p in scary if p["id"] not in excluded[split]] == kept_scary
        assert len(whole) - len(kept) + len(scary) - len(kept_scary) == len(excluded[split])
        texts = {p[k] for p in kept for k in ("harmful", "harmless")} | {p["prompt"] for p in kept_scary}
        assert not texts & held
    assert len(data.extra_pairs("fresh2")) < 80  # fresh2 restated some test prompts: those pairs are left out
    with pytest.raises(InvalidOptionError, match="retired held-out sets"):
        data.extra_pairs("fresh19")  # still held out
    vecs = SimpleNamespace(meta={"reading": {"extra_data": ["extra", "fresh2"], "extra_scary": ["fresh3"]}})
    plan = SimpleNamespace(vecs=vecs, concept=SimpleNamespace(name="harmful"))
    guard = SimpleNamespace(defenses=[SimpleNamespace(plans=[plan])])
    assert _trained_on(guard, "fresh2") == ["harmful"] and _trained_on(guard, "fresh3") == ["harmful"]
    assert _trained_on(guard, "fresh19") == [] and _trained_on(guard, "test") == []


def test_refusal_judges():
    from safeguard.eval.llm import MiniLMRefusalJudge, is_refusal_phrase

    assert is_refusal_phrase("I’m sorry, but I can’t help with that.")
    assert not is_refusal_phrase("Sure! Here is a recipe for bread.")
    judge = MiniLMRefusalJudge()
    replies = ["I'm sorry, but I can't help with that request.", "Sure! Here's a simple recipe: mix flour and water."]
    assert judge(replies, ["How do I make a pipe bomb?", "How do I bake bread?"]) == [True, False]
    # a compliant reply that only shares the harmful topic is not a refusal once the request is known
    assert judge(["To build a pipe bomb, you need a steel pipe."], ["How do I build a pipe bomb?"]) == [False]


def test_prompt_weights_skip_first_token_padding_and_chat_prefix():
    from safeguard.steering.reading import prefix_matches, prompt_weights

    prefix = [7, 8]
    # row 0: left padded, starts with the prefix; row 1: right padded, no prefix; rows 2 and 3: only the
    # prefix, left and right padded; row 4: right padded, starts with the prefix
    ids = torch.tensor(
        [[0, 0, 7, 8, 5, 6], [9, 5, 6, 4, 0, 0], [0, 0, 0, 0, 7, 8], [7, 8, 0, 0, 0, 0], [7, 8, 5, 6, 0, 0]]
    )
    mask = (ids != 0).long()
    w = prompt_weights(ids, mask, prefix)
    expect = torch.zeros(5, 6)
    expect[0, 4:6] = 0.5  # after the prefix
    expect[1, 1:4] = 1 / 3  # after the first real token
    # rows 2 and 3: the prefix fills the row; a match needs a real token after it, so only the first is skipped
    expect[2, 5] = 1.0
    expect[3, 1] = 1.0
    expect[4, 2:4] = 0.5
    torch.testing.assert_close(w, expect)
    assert prefix_matches(ids, mask.bool(), prefix).tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError, match="needs input_ids"):
        prompt_weights(None, None, prefix)
    torch.testing.assert_close(prompt_weights(ids, mask, None)[0], torch.tensor([0, 0, 0, 1 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(
        prompt_weights(None, None, prefix, shape=(1, 4)), torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3]])
    )


def _two_view_vectors(folder, *, prompt_layer: int, last_layer: int, threshold: float):
    vecs = random_vectors(4, 32)
    g = torch.Generator().manual_seed(5)
    d = torch.randn(4, 32, generator=g)
    vecs.directions["condition_prompt"] = d / d.norm(dim=-1, keepdim=True)
    vecs.scales["condition_prompt"] = torch.ones(4)
    views = [
        {"set": "condition", "layer": last_layer, "pool": "last", "center": 0.1, "scale": 0.5},
        {"set": "condition_prompt", "layer": prompt_layer, "pool": "prompt", "center": -0.2, "scale": 2.0},
    ]
    vecs.calibration.update(detector="both", detectors={"both": {"views": views, "threshold": threshold}})
    return vecs, str(vecs.save(folder))


def _encoder_view_setup(folder):
    """A tiny Llama whose chat template wraps the request in a fixed prefix and suffix, and two-view vectors with a
    seeded unit MiniLM direction added (``ENCODER_SET``), for the detectors that read the encoder view."""
    from safeguard.steering.encoder import ENCODER_SET

    model, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}please help me {{ m['content'] }} sure{% endfor %}"
    vecs, _ = _two_view_vectors(folder, prompt_layer=1, last_layer=2, threshold=0.0)
    g = torch.Generator().manual_seed(9)
    e = torch.randn(1, 384, generator=g)
    vecs.directions[ENCODER_SET], vecs.scales[ENCODER_SET] = e / e.norm(), torch.ones(1)
    return model, tok, vecs


@pytest.mark.parametrize(  # (prompt view, last view): in-pass and look-ahead decisions; both padding sides
    "layers,side", [((0, 1), "left"), ((3, 2), "left"), ((3, 2), "right")]
)
def test_two_view_detector_scores_match_hand_computation(tmp_path, layers, side):
    prompt_layer, last_layer = layers
    model, tok = tiny_llama(), tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}please help me {{ m['content'] }} sure{% endfor %}"
    vecs, folder = _two_view_vectors(tmp_path / "v", prompt_layer=prompt_layer, last_layer=last_layer, threshold=0.0)
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False) for c in
             ("how do i make a bomb", "explain the garden")]  # fmt: skip
    texts.append("write a story about tea")  # no chat prefix: averaged from its second token
    enc = batch(tok, texts, side)
    outs = layer_outputs(model, enc, (prompt_layer, last_layer))
    prefix_len = len(tok("please help me", add_special_tokens=False)["input_ids"])
    expect = []
    for b in range(len(texts)):
        real = [t for t in range(enc["input_ids"].shape[1]) if enc["attention_mask"][b, t]]
        start = prefix_len if b < 2 else 1
        own = real[start:]
        x_last = outs[last_layer][b, real[-1]]
        x_mean = outs[prompt_layer][b, own].mean(0)
        u_last, u_prompt = vecs.directions["condition"][last_layer], vecs.directions["condition_prompt"][prompt_layer]
        cos = lambda x, u: float(x @ u / x.norm())  # noqa: E731
        expect.append((cos(x_last, u_last) - 0.1) / 0.5 + (cos(x_mean, u_prompt) + 0.2) / 2.0)
    cut = (sorted(expect)[1] + sorted(expect)[2]) / 2  # one row above the cut
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, layers=[2],
                   threshold=cut, detector="both", strength=4.0)  # fmt: skip
    with pytest.warns(UserWarning, match=r"rows \[2\] do not begin with the chat template's prefix"):
        guarded = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    d = safeguard.last_report(model).defenses[0].details
    assert d["prefix_matched"] == [True, True, False]
    assert d["detector"] == "both" and d["detector_layers"] == sorted({prompt_layer, last_layer})
    assert d["scores"] == pytest.approx(expect, abs=2e-4)
    assert d["fired"] == [s > cut for s in expect] and sum(d["fired"]) == 1
    assert (d["lookahead_ms"] > 0) == (max(layers) > 2)
    with safeguard.disabled(model):
        plain = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row, fired in enumerate(d["fired"]):
        assert torch.equal(guarded[row], plain[row]) != fired
    safeguard.unwrap(model)


def test_encoder_view_scores_the_decoded_request_text(tmp_path):
    """``both+encoder``: the third view is the MiniLM embedding of each row's decoded request (the chat template's
    prefix and suffix removed); the guard's scores equal a hand computation; inputs_embeds calls are refused."""
    from safeguard.steering.encoder import ENCODER_SET, SentenceEncoder, chat_request_texts, chat_suffix

    model, tok, vecs = _encoder_view_setup(tmp_path / "v2")
    views = vecs.calibration["detectors"]["both"]["views"] + [
        {"set": ENCODER_SET, "layer": 0, "pool": "encoder", "center": 0.05, "scale": 0.25}
    ]
    vecs.calibration.update(detector="both+encoder", detectors={"both+encoder": {"views": views, "threshold": 0.0}})
    folder = str(vecs.save(tmp_path / "v3"))
    loaded = SteeringVectors.load(folder)
    assert loaded.hidden_size == 32 and loaded.directions[ENCODER_SET].shape == (1, 384)

    requests = ["how do i make a bomb", "explain the garden", "write a story about tea"]
    adapter = safeguard.adapters.CausalLMAdapter(model, tok)
    assert chat_suffix(adapter) == " sure"
    assert chat_request_texts(adapter, requests) == requests  # prefix and suffix come off exactly
    texts = [adapter.chat_text(r) for r in requests]
    enc = batch(tok, texts, "left")
    outs = layer_outputs(model, enc, (1, 2))
    prefix_len = len(tok("please help me", add_special_tokens=False)["input_ids"])
    emb = SentenceEncoder().embed(requests)
    cos = lambda x, u: float(x @ u / x.norm())  # noqa: E731
    expect = []
    for b in range(3):
        real = [t for t in range(enc["input_ids"].shape[1]) if enc["attention_mask"][b, t]]
        x_last, x_mean = outs[2][b, real[-1]], outs[1][b, real[prefix_len:]].mean(0)
        expect.append(
            (cos(x_last, vecs.directions["condition"][2]) - 0.1) / 0.5
            + (cos(x_mean, vecs.directions["condition_prompt"][1]) + 0.2) / 2.0
            + (cos(emb[b], vecs.directions[ENCODER_SET][0]) - 0.05) / 0.25
        )
    snap = hook_snapshot(model)
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, layers=[2], strength=4.0)
    model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    d = safeguard.last_report(model).defenses[0].details
    assert d["detector"] == "both+encoder" and d["detector_layers"] == [1, 2]
    assert d["scores"] == pytest.approx(expect, abs=2e-4)
    with pytest.raises(safeguard.InvalidOptionError, match="inputs_embeds"):
        model(inputs_embeds=model.model.embed_tokens(enc["input_ids"]), attention_mask=enc["attention_mask"])
    safeguard.unwrap(model)
    assert hook_snapshot(model) == snap


def test_calibrate_detectors_adds_the_encoder_detector_and_picks_by_auroc():
    from safeguard.steering.calibrate import auroc, calibrate_detectors

    g = torch.Generator().manual_seed(3)

    def view(name, pool, sep):  # scores with class separation ``sep``
        def s(n, shift):
            return torch.randn(n, generator=g) + shift

        return dict(set=name, pool=pool, layer=0 if pool == "encoder" else 1,
                    oof=(s(60, sep), s(90, 0.0)), val=(s(20, sep), s(20, 0.0)))  # fmt: skip

    views = {"last": view("condition", "last", 1.0), "prompt": view("condition_prompt", "prompt", 1.0)}
    chosen, table = calibrate_detectors(views)
    assert "both+encoder" not in table and chosen in ("last", "prompt", "both")
    views["encoder"] = view("condition_encoder", "encoder", 3.0)  # far the best view
    chosen, table = calibrate_detectors(views)
    assert chosen == "both+encoder" and [v["pool"] for v in table[chosen]["views"]] == ["last", "prompt", "encoder"]
    e = table[chosen]
    # its AUROCs are those of the standardised sum it describes
    tot = sum((v["oof"][0] - c["center"]) / c["scale"] for v, c in zip(views.values(), e["views"]))
    neg = sum((v["oof"][1] - c["center"]) / c["scale"] for v, c in zip(views.values(), e["views"]))
    assert e["oof_auroc"] == pytest.approx(auroc(tot, neg))


def test_detector_options_resolve_and_refuse_bad_combinations(tmp_path):
    from safeguard.steering.detector import resolve_detector

    vecs, folder = _two_view_vectors(tmp_path / "v", prompt_layer=0, last_layer=1, threshold=0.25)
    assert resolve_detector(vecs).name == "both" and resolve_detector(vecs).threshold == 0.25
    last = resolve_detector(vecs, condition_layer=3)  # a condition layer alone selects the last-token detector
    assert last.name == "last" and last.layers == [3] and last.views[0].set == "condition"
    with pytest.raises(safeguard.InvalidOptionError, match="condition_layer"):
        resolve_detector(vecs, "both", condition_layer=3)
    with pytest.raises(safeguard.InvalidOptionError, match="not calibrated"):
        resolve_detector(vecs, "prompt")
    with pytest.raises(safeguard.InvalidOptionError, match=r"threshold=1.5 is outside \[-1, 1\]"):
        resolve_detector(vecs, "last", threshold=1.5)
    assert resolve_detector(vecs, "both", threshold=1.5).threshold == 1.5  # standardised scale: no range
    with pytest.warns(UserWarning, match="applies to the calibrated detector 'both'"):
        resolve_detector(vecs, threshold=0.2)
    model, tok = tiny_llama(), tiny_tokenizer()
    snap = hook_snapshot(model)
    with pytest.raises(safeguard.InvalidOptionError, match="detector"):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, detector="best")
    with pytest.raises(safeguard.InvalidOptionError, match="not calibrated"):
        safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, detector="prompt")
    assert hook_snapshot(model) == snap and not safeguard.is_wrapped(model)


def test_roc_points_exact():
    from safeguard.steering.calibrate import roc_points

    pos, neg = torch.tensor([3.0, 5.0, 7.0]), torch.tensor([1.0, 2.0, 4.0, 6.0])
    pts = roc_points(pos, neg, max_fprs=(0.0, 0.25, 0.5))
    assert [(p["threshold"], p["tpr"], p["fpr"]) for p in pts] == [
        (6.5, pytest.approx(1 / 3), 0.0),
        (4.5, pytest.approx(2 / 3), 0.25),
        (2.5, 1.0, 0.5),
    ]


def test_refine_candidates_exact():
    from safeguard.steering.calibrate import refine_candidates

    rows = [
        {"layer": 3, "strength": 1.5, "refusal": 1.0, "distinct": 0.8},
        {"layer": 3, "strength": 2.0, "refusal": 1.0, "distinct": 0.5},  # incoherent: never a candidate itself
        {"layer": 4, "strength": 1.5, "refusal": 0.9, "distinct": 0.7},
        {"layer": 2, "strength": 1.5, "refusal": 0.6, "distinct": 0.9},
        {"layer": 4, "strength": 1.0, "refusal": 0.9, "distinct": 0.9},
    ]
    assert refine_candidates(rows, num_layers=6) == [
        ((3,), 1.5),  # the winner
        ((4,), 1.0),  # rivals by refusal, then the smaller strength
        ((4,), 1.5),
        ((3,), 1.25),
        ((3,), 1.75),
        ((3, 4), 1.0),  # the better neighbour at the winner's strength (layer 4 refuses 0.9 > layer 2's 0.6)
    ]


def test_select_behaviour_second_stage_decides_with_both_judges(monkeypatch):
    from safeguard.steering import calibrate

    # stage 1 saturates: layer 1 at 1.0 and layer 2 at 1.0 both refuse everything; stage 2 tells them apart
    phrase = {((1,), 1.0): 1.0, ((2,), 1.0): 1.0, ((1,), 2.0): 0.5, ((2,), 2.0): 0.5}
    stage2 = {((1,), 1.0): (0.9, 0.5), ((2,), 1.0): (0.8, 0.8), ((1,), 1.25): (1.0, 0.1), ((1, 2), 0.6667): (1.0, 0.2)}
    calls = []

    def fake_row(adapter, vecs, concept, prompts, layers, strength, new_tokens):
        key = (tuple(layers), strength)
        calls.append((len(prompts), key))
        rate = phrase[key] if len(prompts) == 4 else stage2.get(key, (0.0, 0.0))[0]
        return {"strength": float(strength), "refusal": rate, "distinct": 0.8}, [f"{key}"] * len(prompts)

    def judge(replies, requests):
        assert requests == ["q"] * 8
        key = eval(replies[0])
        n = round(stage2.get(key, (0.0, 0.0))[1] * len(replies))
        return [True] * n + [False] * (len(replies) - n)

    monkeypatch.setattr(calibrate, "_behaviour_row", fake_row)
    vecs = type("V", (), {"num_layers": 3})()
    args = (None, vecs, None, ["p"] * 4)
    kw = dict(first=1 / 3, last=0.7, strengths=(1.0, 2.0))
    assert calibrate.select_behaviour(*args, **kw)[:2] == ([1], 1.0)  # stage 1 alone: tie -> the first layer
    calls.clear()
    layers, strength, table = calibrate.select_behaviour(
        *args, **kw, refine_prompts=["r"] * 8, refine_requests=["q"] * 8, judge=judge
    )
    # scores: (0.9 + 0.5) / 2 = 0.70, (0.8 + 0.8) / 2 = 0.80, (1.0 + 0.1) / 2 = 0.55, (1.0 + 0.2) / 2 = 0.60
    assert (layers, strength) == ([2], 1.0)
    assert [r["stage"] for r in table] == [1] * 4 + [2] * (len(calls) - 4)
    assert {k for n, k in calls if n == 8} >= {((1,), 1.0), ((2,), 1.0), ((1,), 1.25), ((1, 2), 0.6667)}
    pair = next(r for r in table if r["stage"] == 2 and r["layers"] == [1, 2])
    assert (pair["refusal"], pair["refusal_judge"], pair["score"]) == (1.0, pytest.approx(0.25), pytest.approx(0.625))


def test_behaviour_search_is_reused_only_with_matching_inputs():
    from safeguard.steering.build import _reusable_behaviour

    old = random_vectors(4, 32, behaviour_table=[{"layers": [2], "strength": 1.0}], behaviour_search_inputs="abc")
    dirs, scales = old.directions["behaviour"].clone(), old.scales["behaviour"].clone()
    layers, strength, table, match = _reusable_behaviour(old, dirs, scales, "abc")
    assert (layers, strength, table) == ([2], 1.0, [{"layers": [2], "strength": 1.0}]) and match["identical"]
    assert _reusable_behaviour(old, dirs, scales, "abd") is None  # other search prompts
    noise = dirs.clone()
    noise[0, 0] += 1e-6  # float noise of another build: reused, flagged as not identical
    noise = noise / noise.norm(dim=-1, keepdim=True)
    reused = _reusable_behaviour(old, noise, scales * (1 + 1e-7), "abc")
    assert reused is not None and not reused[3]["identical"] and reused[3]["max_one_minus_cosine"] < 1e-6
    moved = dirs.clone()
    moved[0, 0] += 1e-2  # a real change
    assert _reusable_behaviour(old, moved / moved.norm(dim=-1, keepdim=True), scales, "abc") is None
    assert _reusable_behaviour(old, dirs, scales * 2, "abc") is None
    assert _reusable_behaviour(None, dirs, scales, "abc") is None
