"""TopK SAE: encode/decode math, init, FVU, and the sparsify / SAELens / pickle checkpoint paths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeguard import InvalidOptionError, MissingWeightsError, SafeguardError, UnsafeCheckpointError
from safeguard.sae import (
    SAEConfig,
    SAEFormatError,
    SAEOutput,
    TopKSAE,
    convert_pickled_state_dict,
    fvu,
    load_sae,
    save_sae,
)

D_IN, LATENTS, K = 16, 48, 4


def make_sae(seed: int = 0, *, biases: bool = True, dtype: torch.dtype = torch.float32) -> TopKSAE:
    """A seeded SAE; with ``biases`` the biases are random too, so they matter in every check."""
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=D_IN, num_latents=LATENTS, k=K), generator=gen, dtype=dtype)
    if biases:
        with torch.no_grad():
            sae.encoder.bias.copy_(0.1 * torch.randn(LATENTS, generator=gen))
            sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=gen))
    return sae


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, D_IN, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(a: TopKSAE, b: TopKSAE, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a.encode_dense(x), b.encode_dense(x))
        assert torch.equal(a.encode_dense(x, topk=False), b.encode_dense(x, topk=False))
        assert torch.equal(a(x).sae_out, b(x).sae_out)


# ---------------------------------------------------------------------------- config


def test_config_validation_quotes_bad_values():
    with pytest.raises(InvalidOptionError, match="k=0"):
        SAEConfig(d_in=4, num_latents=8, k=0)
    with pytest.raises(InvalidOptionError, match=r"k=9 .*num_latents=8"):
        SAEConfig(d_in=4, num_latents=8, k=9)
    with pytest.raises(InvalidOptionError, match=r"d_in='4'"):
        SAEConfig(d_in="4", num_latents=8, k=2)
    with pytest.raises(InvalidOptionError, match="num_latents=True"):
        SAEConfig(d_in=4, num_latents=True, k=1)
    with pytest.raises(InvalidOptionError, match="normalize_decoder=1"):
        SAEConfig(d_in=4, num_latents=8, k=2, normalize_decoder=1)
    cfg = SAEConfig.from_expansion(d_in=16, expansion_factor=4, k=8)
    assert (cfg.num_latents, cfg.expansion_factor) == (64, 4.0)
    with pytest.raises(InvalidOptionError, match="whole number"):
        SAEConfig.from_expansion(d_in=3, expansion_factor=1.5, k=1)
    with pytest.raises(InvalidOptionError, match="SAEConfig"):
        TopKSAE({"d_in": 4})


# ---------------------------------------------------------------------------- module math


def test_shapes_on_batch_time_input():
    sae, x = make_sae(), inputs(2, 3)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (2, 3, K) and indices.dtype == torch.int64
    assert sae.decode(values, indices).shape == x.shape
    assert sae.encode_dense(x).shape == sae.encode_dense(x, topk=False).shape == (2, 3, LATENTS)
    assert sae.encode(x, k=7)[0].shape == (2, 3, 7)
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.sae_out.shape == x.shape and out.latent_acts.shape == out.latent_indices.shape == (2, 3, K)
    assert out.fvu.ndim == 0


def test_topk_keeps_exactly_k_largest_per_row():
    sae, x = make_sae(), inputs(4, 5)
    dense = sae.encode_dense(x)
    assert ((dense != 0).sum(-1) == K).all()
    pre = sae.encode_dense(x, topk=False)
    assert (pre >= 0).all() and ((pre > 0).sum(-1) > K).all()  # the test is meaningful: TopK drops some
    kth_largest = pre.topk(K, dim=-1).values[..., -1:]
    assert torch.equal(dense, torch.where(pre >= kth_largest, pre, torch.zeros_like(pre)))


def test_decoder_rows_unit_norm_and_tied_init():
    sae = make_sae(biases=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(LATENTS))
    assert torch.equal(sae.encoder.weight, sae.W_dec)
    assert not sae.encoder.bias.any() and not sae.b_dec.any()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(LATENTS, 1, generator=torch.Generator().manual_seed(3)) * 5 + 0.1)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(LATENTS))


def test_init_is_seeded_and_follows_dtype():
    assert torch.equal(make_sae(5).W_dec, make_sae(5).W_dec)
    assert not torch.equal(make_sae(5).W_dec, make_sae(6).W_dec)
    torch.manual_seed(0)
    a = TopKSAE(SAEConfig(D_IN, LATENTS, K))
    torch.manual_seed(0)
    assert torch.equal(a.W_dec, TopKSAE(SAEConfig(D_IN, LATENTS, K)).W_dec)
    sae = make_sae(dtype=torch.float64)
    assert sae.dtype == sae.encoder.weight.dtype == sae.b_dec.dtype == torch.float64
    out = sae(inputs(2, 3).double())
    assert out.sae_out.dtype == out.latent_acts.dtype == torch.float64


def test_b_dec_is_subtracted_before_encoding():
    sae, x = make_sae(), inputs(3, 2)
    manual = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    torch.testing.assert_close(sae.pre_acts(x), manual)
    without = torch.relu(x @ sae.encoder.weight.T + sae.encoder.bias)
    assert not torch.allclose(manual, without)


def test_sparse_and_dense_decoding_agree():
    sae, x = make_sae(), inputs(2, 7)
    codes = sae.encode_dense(x)
    torch.testing.assert_close(sae.decode(*sae.encode(x)), sae.decode_dense(codes))
    torch.testing.assert_close(sae.decode_dense(codes), codes @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae(x).sae_out, sae.decode_dense(codes))


def test_fvu_zero_for_perfect_one_for_mean():
    x = inputs(4, 6)
    assert fvu(x, x.clone()).item() == 0.0
    mean_row = x.reshape(-1, D_IN).mean(0)
    torch.testing.assert_close(fvu(x, mean_row.expand_as(x)), torch.tensor(1.0))
    assert fvu(x.half(), x.half()).dtype == torch.float32
    out = make_sae()(x)
    torch.testing.assert_close(out.fvu, fvu(x, out.sae_out))


def test_input_shape_and_k_errors():
    sae = make_sae()
    with pytest.raises(SAEFormatError, match=r"\[2, 15\].*d_in=16"):
        sae.encode(torch.zeros(2, 15))
    with pytest.raises(InvalidOptionError, match=r"k=49"):
        sae.encode(inputs(2), k=LATENTS + 1)
    with pytest.raises(SAEFormatError, match="num_latents=48"):
        sae.decode_dense(torch.zeros(2, LATENTS - 1))
    with pytest.raises(SAEFormatError, match="same shape"):
        sae.decode(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------- sparsify folders


def test_save_load_round_trip(tmp_path):
    sae, x = make_sae(), inputs(2, 5)
    folder = save_sae(sae, tmp_path / "sae")
    with safe_open(str(folder / "sae.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(["encoder.weight", "encoder.bias", "W_dec", "b_dec"])
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["format"] == "sparsify" and cfg["version"] == 1
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["normalize_decoder"]) == (D_IN, LATENTS, K, True)
    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert_same_outputs(sae, loaded, x)
    assert load_sae(folder / "sae.safetensors").cfg == sae.cfg  # a file path is accepted too
    assert load_sae(folder, k=2).encode(x)[0].shape[-1] == 2
    wide = load_sae(folder, dtype=torch.float64)
    assert wide.dtype == torch.float64 and wide.encoder.weight.dtype == torch.float64


def test_load_reads_plain_sparsify_config(tmp_path):
    """sparsify's own cfg.json: no format/version keys, num_latents=0 meaning d_in * expansion_factor."""
    sae = make_sae()
    folder = save_sae(sae, tmp_path / "layers.3")
    cfg = {"expansion_factor": 3, "normalize_decoder": True, "num_latents": 0, "k": K, "multi_topk": False}
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": D_IN}))
    assert load_sae(folder).cfg == sae.cfg
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": D_IN, "transcode": True}))
    with pytest.raises(SAEFormatError, match="transcode"):
        load_sae(folder)


def test_missing_files_raise_missing_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope"):
        load_sae(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match=r"cfg\.json"):
        load_sae(empty)
    folder = save_sae(make_sae(), tmp_path / "only_cfg")
    (folder / "sae.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"sae\.safetensors.*sae_weights\.safetensors") as info:
        load_sae(folder)
    assert str(folder) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_parent_folder_names_its_subfolders(tmp_path):
    save_sae(make_sae(), tmp_path / "multi" / "layers.0")
    save_sae(make_sae(), tmp_path / "multi" / "layers.1")
    with pytest.raises(MissingWeightsError, match=r"\['layers\.0', 'layers\.1'\]"):
        load_sae(tmp_path / "multi")


def test_wrong_shapes_and_keys_are_named(tmp_path):
    folder = save_sae(make_sae(), tmp_path / "bad")
    state = {name: t.clone() for name, t in make_sae().state_dict().items()}
    save_file({**state, "W_dec": torch.zeros(LATENTS, D_IN - 1)}, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match=r"'W_dec'.*\[48, 15\].*expected \[48, 16\]") as info:
        load_sae(folder)
    assert isinstance(info.value, SafeguardError) and isinstance(info.value, ValueError)
    del state["b_dec"]
    save_file(state, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match=r"lacks tensor\(s\) \['b_dec'\]"):
        load_sae(folder)
    save_file({**state, "b_dec": torch.zeros(D_IN), "W_skip": torch.zeros(2)}, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFormatError, match="W_skip"):
        load_sae(folder)


# ---------------------------------------------------------------------------- SAELens folders


def write_saelens(folder, sae: TopKSAE, *, flipped: bool, cfg_extra: dict | None = None) -> None:
    folder.mkdir(parents=True)
    w_enc, w_dec = sae.encoder.weight.detach(), sae.W_dec.detach()
    tensors = {
        "W_enc": w_enc if flipped else w_enc.T.contiguous(),  # SAELens: [d_in, d_sae]
        "b_enc": sae.encoder.bias.detach(),
        "W_dec": w_dec.T.contiguous() if flipped else w_dec,  # SAELens: [d_sae, d_in]
        "b_dec": sae.b_dec.detach(),
    }
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": LATENTS, "activation_fn_kwargs": {"k": K}}
    (folder / "cfg.json").write_text(json.dumps({**cfg, **(cfg_extra or {})}))


@pytest.mark.parametrize("flipped", [False, True])
def test_saelens_folder_loads_in_either_orientation(tmp_path, flipped):
    sae = make_sae()
    write_saelens(tmp_path / "lens", sae, flipped=flipped)
    loaded = load_sae(tmp_path / "lens")
    assert (loaded.cfg.d_in, loaded.cfg.num_latents, loaded.cfg.k) == (D_IN, LATENTS, K)
    assert_same_outputs(sae, loaded, inputs(2, 5))


def test_saelens_k_sources_and_errors(tmp_path):
    sae, x = make_sae(), inputs(3)
    write_saelens(tmp_path / "a", sae, flipped=False, cfg_extra={"activation_fn_kwargs": {}, "k": 6})
    assert load_sae(tmp_path / "a").cfg.k == 6
    write_saelens(tmp_path / "b", sae, flipped=False, cfg_extra={"activation_fn_kwargs": {}})
    with pytest.raises(SAEFormatError, match=r"k=") as info:
        load_sae(tmp_path / "b")
    assert "cfg.json" in str(info.value)
    assert_same_outputs(sae, load_sae(tmp_path / "b", k=K), x)
    write_saelens(tmp_path / "c", sae, flipped=False, cfg_extra={"architecture": "jumprelu"})
    with pytest.raises(SAEFormatError, match="jumprelu"):
        load_sae(tmp_path / "c")
    write_saelens(
        tmp_path / "d", sae, flipped=False, cfg_extra={"architecture": "standard", "activation_fn_kwargs": {}}
    )
    with pytest.warns(UserWarning, match="approximates"):
        load_sae(tmp_path / "d", k=K)
    write_saelens(tmp_path / "e", sae, flipped=False, cfg_extra={"d_sae": LATENTS + 1})
    with pytest.raises(SAEFormatError, match=r"'W_enc'.*\[16, 48\].*\[49, 16\]"):
        load_sae(tmp_path / "e")


def test_saelens_without_b_dec_on_input_is_folded(tmp_path):
    sae, x = make_sae(), inputs(4, 3)
    write_saelens(tmp_path / "lens", sae, flipped=False, cfg_extra={"apply_b_dec_to_input": False})
    loaded = load_sae(tmp_path / "lens")
    # SAELens with apply_b_dec_to_input=False: pre = relu(x @ W_enc + b_enc)
    pre = torch.relu(x @ sae.encoder.weight.T + sae.encoder.bias).detach()
    torch.testing.assert_close(loaded.encode_dense(x, topk=False), pre)
    vals, idx = pre.topk(K, dim=-1)
    torch.testing.assert_close(loaded(x).sae_out, (vals.unsqueeze(-1) * sae.W_dec.detach()[idx]).sum(-2) + sae.b_dec)


# ---------------------------------------------------------------------------- pickled checkpoints


_CALLS: list[str] = []


def _record_call() -> str:
    _CALLS.append("ran")
    return "ran"


class Smuggled:
    """Unpickling this would call _record_call: the loader must never get that far."""

    def __reduce__(self):
        return (_record_call, ())


def openai_style_state(sae: TopKSAE) -> dict:
    """The key layout of OpenAI's sparse_autoencoder (used by Concept Steerers' state_dict.pth)."""
    return {
        "pre_bias": sae.b_dec.detach().clone(),
        "latent_bias": sae.encoder.bias.detach().clone(),
        "encoder.weight": sae.encoder.weight.detach().clone(),
        "decoder.weight": sae.W_dec.detach().T.clone(),  # nn.Linear(num_latents, d_in).weight
        "stats_last_nonzero": torch.zeros(LATENTS, dtype=torch.long),
        "activation": "TopK",
        "activation_state_dict": {"k": K, "postact_fn": "ReLU"},
    }


def test_convert_pickled_state_dict_matches(tmp_path):
    sae, x = make_sae(), inputs(2, 4)
    torch.save(openai_style_state(sae), tmp_path / "state_dict.pth")
    converted = convert_pickled_state_dict(tmp_path / "state_dict.pth", tmp_path / "out")  # k read from the file
    assert converted.cfg == sae.cfg
    assert_same_outputs(sae, converted, x)
    assert_same_outputs(sae, load_sae(tmp_path / "out"), x)
    with safe_open(str(tmp_path / "out" / "sae.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(["encoder.weight", "encoder.bias", "W_dec", "b_dec"])


def test_convert_other_key_names_and_wrappers(tmp_path):
    sae, x = make_sae(), inputs(3)
    lens = {
        "W_enc": sae.encoder.weight.detach().T.clone(),
        "b_enc": sae.encoder.bias.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_pre": sae.b_dec.detach().clone(),
    }
    torch.save({"state_dict": {f"module.{n}": t for n, t in lens.items()}, "epoch": 3}, tmp_path / "w.pt")
    converted = convert_pickled_state_dict(tmp_path / "w.pt", tmp_path / "out", k=K)
    assert_same_outputs(sae, converted, x)


def test_convert_unmappable_keys_lists_them(tmp_path):
    torch.save({"weird.weight": torch.zeros(4, 2), "b_dec": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(SAEFormatError, match=r"weird\.weight \[4, 2\]") as info:
        convert_pickled_state_dict(tmp_path / "w.pt", tmp_path / "out", k=1)
    assert "encoder.weight" in str(info.value)
    state = openai_style_state(make_sae())
    del state["activation_state_dict"]
    torch.save(state, tmp_path / "nok.pt")
    with pytest.raises(SAEFormatError, match="k=32"):
        convert_pickled_state_dict(tmp_path / "nok.pt", tmp_path / "out")
    state["decoder.weight"] = torch.zeros(D_IN + 1, LATENTS)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(SAEFormatError, match=r"'decoder\.weight'.*\[17, 48\]"):
        convert_pickled_state_dict(tmp_path / "shape.pt", tmp_path / "out", k=K)


def test_convert_refuses_arbitrary_objects(tmp_path):
    torch.save({"W_dec": torch.zeros(2, 2), "payload": Smuggled()}, tmp_path / "evil.pth")
    _CALLS.clear()
    with pytest.raises(UnsafeCheckpointError, match="refuses to unpickle arbitrary objects"):
        convert_pickled_state_dict(tmp_path / "evil.pth", tmp_path / "out", k=1)
    assert _CALLS == []
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingWeightsError, match=r"missing\.pth"):
        convert_pickled_state_dict(tmp_path / "missing.pth", tmp_path / "out", k=1)
