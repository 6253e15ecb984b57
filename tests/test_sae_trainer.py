"""SAE training pipeline: activation collection (text encoder / UNet), chunked storage, the
dataset reader, TopK training with AuxK, resumption, and the ``safeguard sae`` CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipelines import tiny_bert_sd, tiny_sd

from safeguard import InvalidOptionError, MissingWeightsError
from safeguard.sae import (
    ActivationDataset,
    TopKSAE,
    TrainConfig,
    collect_activations,
    list_modules,
    load_sae,
    train_sae,
    write_activations,
)
from safeguard.sae import trainer as trainer_module
from safeguard.sae.trainer import _step_losses

PROMPTS = ["a cat", "a red star on a white background", "x", "two blue squares"]
UNET_MODULE = "unet.up_blocks.1.attentions.0"  # CrossAttnUpBlock2D at 16x16, 8 channels


def chunk_rows_of(folder) -> list[int]:
    meta = json.loads((folder / "meta.json").read_text())
    sizes = [load_file(str(folder / c["file"]))["acts"].shape[0] for c in meta["chunks"]]
    assert sizes == [c["rows"] for c in meta["chunks"]]
    return sizes


def stored(folder) -> tuple[torch.Tensor, torch.Tensor | None]:
    meta = json.loads((folder / "meta.json").read_text())
    parts = [load_file(str(folder / c["file"])) for c in meta["chunks"]]
    acts = torch.cat([p["acts"] for p in parts]).float()
    steps = torch.cat([p["timestep"] for p in parts]) if "timestep" in parts[0] else None
    return acts, steps


# ---------------------------------------------------------------------------- collection


@pytest.mark.parametrize(
    "factory, module, layer",
    [(tiny_sd, "layers.0", 1), (tiny_bert_sd, "layer.0", 1)],
    ids=["clip", "bert"],
)
def test_text_encoder_rows_are_the_real_tokens(tmp_path, factory, module, layer):
    pipe = factory(0)
    # the first encoder layer (CLIP nests it under text_model. in transformers 4, not 5)
    module = "text_encoder." + next(n for n, _ in pipe.text_encoder.named_modules() if n.endswith("encoder." + module))
    tok = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = tok.attention_mask.bool()
    if factory is tiny_bert_sd:  # independent count: non-[PAD] ids
        assert int(mask.sum()) == int((tok.input_ids != pipe.tokenizer.pad_token_id).sum())
    else:  # CLIP pads with EOS: real tokens run up to and including the first EOS
        first_eos = (tok.input_ids == pipe.tokenizer.eos_token_id).int().argmax(dim=1)
        assert int(mask.sum()) == int((first_eos + 1).sum())

    meta = collect_activations(pipe, module, PROMPTS, tmp_path, chunk_rows=7, batch_size=3, progress=False)
    assert meta["complete"] and meta["kind"] == "text" and meta["rows"] == int(mask.sum())
    assert meta["d"] == pipe.text_encoder.config.hidden_size and not meta["has_timestep"]
    sizes = chunk_rows_of(tmp_path)
    assert max(sizes) <= 7 and all(s == 7 for s in sizes[:-1]) and sum(sizes) == meta["rows"]

    acts, steps = stored(tmp_path)
    assert steps is None
    use_mask = getattr(pipe.text_encoder.config, "use_attention_mask", False)
    with torch.no_grad():
        hidden = pipe.text_encoder(
            tok.input_ids, attention_mask=tok.attention_mask if use_mask else None, output_hidden_states=True
        ).hidden_states[layer]
    torch.testing.assert_close(acts, hidden[mask].half().float())


def test_sdxl_layers_of_both_encoders_concatenate_per_token(tmp_path):
    from tiny_pipelines import tiny_sdxl

    pipe = tiny_sdxl(0)
    names = [
        f"{enc}." + next(n for n, _ in getattr(pipe, enc).named_modules() if n.endswith(f"layers.{i}"))
        for enc, i in (("text_encoder", 0), ("text_encoder_2", 1))
    ]
    meta = collect_activations(pipe, "+".join(names), PROMPTS, tmp_path, batch_size=3, progress=False)
    acts, _ = stored(tmp_path)
    expected = []
    for enc, tok, layer in ((pipe.text_encoder, pipe.tokenizer, 1), (pipe.text_encoder_2, pipe.tokenizer_2, 2)):
        t = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = enc(t.input_ids, output_hidden_states=True).hidden_states[layer]
        expected.append(hidden[t.attention_mask.bool()])
    assert meta["d"] == 32 and meta["rows"] == expected[0].shape[0]
    torch.testing.assert_close(acts, torch.cat(expected, -1).half().float())
    with pytest.raises(InvalidOptionError, match="only layers of different text encoders"):
        collect_activations(pipe, names[0] + "+unet.up_blocks.0", PROMPTS, tmp_path / "x", progress=False)


def _reference_unet_rows(pipe, prompts, batch_size, steps, guidance, keep):
    """Rows of UNET_MODULE captured by hand: ``keep`` = "cond" / "uncond" / "all" of the batch."""
    rows, calls = [], []
    module = pipe.unet.get_submodule(UNET_MODULE.removeprefix("unet."))
    state = {}

    def hook(_m, _a, out):
        h = out[0]
        n = state["n"]
        h = {"cond": h[n:], "uncond": h[:n], "all": h}[keep]
        rows.append(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]))
        calls.append(state["call"])
        state["call"] += 1

    handle = module.register_forward_hook(hook)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            state.update(n=len(batch), call=0)
            gens = [torch.Generator().manual_seed(start + i) for i in range(len(batch))]
            pipe(batch, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    finally:
        handle.remove()
    return torch.cat(rows), calls


def test_unet_rows_keep_the_conditional_half_per_position_and_step(tmp_path):
    pipe = tiny_sd(0)
    prompts = PROMPTS[:3]
    meta = collect_activations(
        pipe, UNET_MODULE, prompts, tmp_path, chunk_rows=300, steps=2, guidance_scale=5.0, batch_size=2, progress=False
    )
    h = w = 16
    assert meta["kind"] == "denoiser" and meta["d"] == 8 and meta["has_timestep"]
    assert meta["rows"] == len(prompts) * 2 * h * w  # H*W rows per image per step, conditional half only
    assert meta["denoiser_calls"] == 2 and len(meta["timesteps"]) == 2
    sizes = chunk_rows_of(tmp_path)
    assert max(sizes) <= 300 and all(s == 300 for s in sizes[:-1])

    acts, steps = stored(tmp_path)
    cond, _ = _reference_unet_rows(pipe, prompts, 2, 2, 5.0, "cond")
    uncond, _ = _reference_unet_rows(pipe, prompts, 2, 2, 5.0, "uncond")
    torch.testing.assert_close(acts, cond.half().float())
    assert not torch.allclose(acts, uncond.half().float(), atol=1e-3)
    # step index per row: batch of 2 images x 256 positions at step 0, then step 1; then the last prompt
    per = h * w
    expected = torch.cat(
        [torch.full((2 * per,), 0), torch.full((2 * per,), 1), torch.full((per,), 0), torch.full((per,), 1)]
    )
    assert steps.dtype == torch.int16 and torch.equal(steps.long(), expected)


def test_unet_rows_without_guidance_and_max_rows(tmp_path):
    pipe = tiny_sd(0)
    meta = collect_activations(
        pipe, UNET_MODULE, PROMPTS[:2], tmp_path / "a", steps=2, guidance_scale=1.0, progress=False
    )
    assert meta["rows"] == 2 * 2 * 256
    acts, _ = stored(tmp_path / "a")
    ref, _ = _reference_unet_rows(pipe, PROMPTS[:2], 16, 2, 1.0, "all")
    torch.testing.assert_close(acts, ref.half().float())

    meta = collect_activations(pipe, UNET_MODULE, PROMPTS, tmp_path / "b", steps=2, max_rows=300, progress=False)
    assert meta["rows"] == 300 and meta["complete"]


def test_collect_reuses_complete_restarts_partial_and_rejects_changes(tmp_path):
    pipe = tiny_bert_sd(0)
    module = "text_encoder.encoder.layer.0"
    meta = collect_activations(pipe, module, PROMPTS, tmp_path, progress=False)
    chunk = tmp_path / meta["chunks"][0]["file"]
    stamp = chunk.stat().st_mtime_ns
    assert collect_activations(pipe, module, PROMPTS, tmp_path, progress=False) == meta
    assert chunk.stat().st_mtime_ns == stamp  # not collected again

    with pytest.raises(InvalidOptionError, match="other settings"):
        collect_activations(pipe, module, PROMPTS[:2], tmp_path, progress=False)
    assert collect_activations(pipe, module, PROMPTS[:2], tmp_path, overwrite=True, progress=False)["prompts"] == 2

    # an interrupted collection (complete: false, stray chunks) is cleared and redone
    partial = json.loads((tmp_path / "meta.json").read_text()) | {"complete": False}
    (tmp_path / "meta.json").write_text(json.dumps(partial))
    (tmp_path / "chunk_00007.safetensors").write_bytes(b"junk")
    with pytest.raises(MissingWeightsError, match="incomplete"):
        ActivationDataset(tmp_path)
    again = collect_activations(pipe, module, PROMPTS, tmp_path, progress=False)
    assert again["complete"] and not (tmp_path / "chunk_00007.safetensors").exists()
    assert again["rows"] == meta["rows"]


def test_module_names_are_checked():
    pipe = tiny_sd(0)
    with pytest.raises(InvalidOptionError, match="up_blocks"):
        collect_activations(pipe, "unet.up_block.1", PROMPTS, "unused", progress=False)
    with pytest.raises(InvalidOptionError, match="vae"):
        collect_activations(pipe, "vae.decoder", PROMPTS, "unused", progress=False)
    names = list_modules(pipe, max_depth=2)
    assert "unet.up_blocks.1" in names and any(n.startswith("text_encoder.") for n in names)
    assert not any(n.startswith("vae") for n in names)


# ---------------------------------------------------------------------------- dataset


def test_dataset_split_and_shuffled_batches(tmp_path):
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    write_activations(x, tmp_path, chunk_rows=100, dtype=torch.float32)
    ds = ActivationDataset(tmp_path, holdout=0.1, chunks_in_memory=3, seed=1)
    assert (ds.rows, ds.train_rows, ds.heldout_rows, ds.d) == (1000, 900, 100, 3)
    assert ds.steps_per_epoch(64) == 14
    batches = list(ds.train_batches(64, epoch=0))
    seen = torch.cat(batches)[:, 0].long()
    assert len(batches) == 14 and all(b.shape == (64, 3) for b in batches)
    assert seen.unique().numel() == 14 * 64 and int(seen.max()) < 900  # each training row at most once
    assert not torch.equal(seen, seen.sort().values)  # shuffled
    assert all(torch.equal(a, b) for a, b in zip(list(ds.train_batches(64, epoch=0, skip=5)), batches[5:]))
    assert not torch.equal(torch.cat(list(ds.train_batches(64, epoch=1))), torch.cat(batches))
    held = torch.cat(list(ds.heldout_batches(32)))[:, 0].long()
    assert torch.equal(held, torch.arange(900, 1000))
    torch.testing.assert_close(ds.mean(), torch.full((3,), 449.5))
    small = list(ActivationDataset(tmp_path, holdout=0.1).train_batches(4096))
    assert len(small) == 1 and small[0].shape == (900, 3)


# ---------------------------------------------------------------------------- training


def sparse_data(n=8192, d=32, latents=64, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(latents, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(latents, generator=g)[:k] for _ in range(n)])
    codes = torch.zeros(n, latents).scatter_(1, idx, 0.5 + 2 * torch.rand(n, k, generator=g))
    return codes @ dictionary + 0.3 * torch.randn(d, generator=g), dictionary


def test_training_recovers_a_sparse_dictionary(tmp_path):
    x, dictionary = sparse_data()
    write_activations(x, tmp_path / "acts", chunk_rows=1000)
    ds = ActivationDataset(tmp_path / "acts", holdout=0.1)
    cfg = TrainConfig(num_latents=64, k=4, batch_size=256, max_steps=400, device="cpu")
    result = train_sae(ds, cfg, tmp_path / "sae", progress=False)
    m = result.metrics
    assert m["fvu"] < 0.2 and m["eval_split"] == "heldout" and m["eval_rows"] == ds.heldout_rows
    assert 0 < m["l0"] <= 4 and 0 <= m["dead_share"] <= 1 and 0 <= m["heldout_dead_share"] <= 1
    assert m["steps"] == result.step == 400 and m["lr"] == pytest.approx(2e-4 / (64 / 16384) ** 0.5)
    cos = (result.sae.W_dec.detach() @ dictionary.T).max(dim=0).values
    assert int((cos > 0.9).sum()) >= 58  # (almost) every true atom has a decoder row
    torch.testing.assert_close(result.sae.W_dec.detach().norm(dim=1), torch.ones(64))

    folder = tmp_path / "sae"
    for name in ("cfg.json", "sae.safetensors", "metrics.json", "trainer_state.safetensors", "trainer_state.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "metrics.json").read_text()) == m
    loaded = load_sae(folder)
    torch.testing.assert_close(loaded(x[:50]).sae_out, result.sae(x[:50]).sae_out)


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    x, _ = sparse_data(n=1000, d=16, latents=32, k=3)
    write_activations(x, tmp_path / "acts", chunk_rows=300, dtype=torch.float32)
    ds = ActivationDataset(tmp_path / "acts", holdout=0.1)  # 900 train rows: 3 steps per epoch
    base = dict(num_latents=32, k=3, batch_size=256, dead_rows=512, device="cpu", checkpoint_every=0)
    whole = train_sae(ds, TrainConfig(**base, max_steps=40), tmp_path / "whole", progress=False)

    first = train_sae(ds, TrainConfig(**base, max_steps=17), tmp_path / "split", progress=False)
    assert first.step == 17 and first.resumed_from == 0
    state = json.loads((tmp_path / "split" / "trainer_state.json").read_text())
    assert state["counters"]["step"] == 17 and state["counters"]["epoch"] == 5
    second = train_sae(ds, TrainConfig(**base, max_steps=40), tmp_path / "split", progress=False)
    assert second.resumed_from == 17 and second.step == 40
    for name, param in whole.sae.named_parameters():
        assert torch.equal(param, dict(second.sae.named_parameters())[name]), name
    assert second.metrics["fvu"] == whole.metrics["fvu"] < first.metrics["fvu"]

    # Ctrl-C mid-run saves a checkpoint; running again finishes identically
    calls = {"n": 0}
    real = trainer_module._remove_parallel_grad

    def interrupt_at_step_9(sae):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        real(sae)

    monkeypatch.setattr(trainer_module, "_remove_parallel_grad", interrupt_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        train_sae(ds, TrainConfig(**base, max_steps=40), tmp_path / "ctrlc", progress=False)
    monkeypatch.setattr(trainer_module, "_remove_parallel_grad", real)
    resumed = train_sae(ds, TrainConfig(**base, max_steps=40), tmp_path / "ctrlc", progress=False)
    assert resumed.resumed_from == 8 and resumed.metrics["fvu"] == whole.metrics["fvu"]

    done = train_sae(ds, TrainConfig(**base, max_steps=40), tmp_path / "split", progress=False)
    assert done.resumed_from == 40 and done.metrics["fvu"] == second.metrics["fvu"]
    with pytest.raises(InvalidOptionError, match="cannot resume"):
        train_sae(ds, TrainConfig(**{**base, "k": 4}, max_steps=50), tmp_path / "split", progress=False)
    fresh = train_sae(
        ds, TrainConfig(**{**base, "k": 4}, max_steps=5), tmp_path / "split", resume=False, progress=False
    )
    assert fresh.resumed_from == 0 and fresh.step == 5


def test_auxk_loss_trains_dead_latents_only():
    sae = TopKSAE(TrainConfig(num_latents=32, k=2).sae_config(8), generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    _, auxk, _ = _step_losses(sae, x, dead)
    assert auxk > 0
    auxk.backward()
    grad = sae.encoder.weight.grad.abs().sum(dim=1)
    assert grad[:10].sum() > 0 and grad[10:].sum() == 0
    _, none, _ = _step_losses(sae, x, torch.zeros(32, dtype=torch.bool))
    assert none == 0


def test_train_config_validation():
    with pytest.raises(InvalidOptionError, match="k"):
        TrainConfig(k=0)
    with pytest.raises(InvalidOptionError, match="auxk_alpha"):
        TrainConfig(auxk_alpha=-1.0)
    with pytest.raises(InvalidOptionError, match="unknown"):
        TrainConfig.from_dict({"kk": 3})
    cfg = TrainConfig(expansion_factor=4, k=8)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.sae_config(16).num_latents == 64
    assert cfg.resolved_lr(16384) == pytest.approx(2e-4)


# ---------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    from safeguard.cli import main

    for argv in (["sae", "--help"], ["sae", "train", "--help"], ["sae", "collect", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "collect" in out and "--expansion" in out and "--module" in out


def test_cli_collect_and_train_end_to_end(tmp_path, capsys):
    from safeguard.cli import main

    folder = tmp_path / "pipe"
    tiny_bert_sd(0).save_pretrained(folder)
    common = ["--model", str(folder), "--device", "cpu", "--quiet", "--prompts", "24"]
    out = tmp_path / "te"
    train = ["--expansion", "2", "--k", "4", "--steps", "30", "--batch-size", "64"]
    rc = main(["sae", "train", *common, "--module", "text_encoder.encoder.layer.0", "--out", str(out), *train])
    assert rc == 0
    meta = json.loads((out / "activations" / "meta.json").read_text())
    assert meta["complete"] and meta["prompts"] == 24 and meta["d"] == 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["num_latents"] == 64 and metrics["k"] == 4
    assert "held-out FVU" in capsys.readouterr().out
    assert load_sae(out).cfg.num_latents == 64

    acts = tmp_path / "unet"
    unet = ["--module", UNET_MODULE, "--denoise-steps", "2", "--max-rows", "1000"]
    rc = main(["sae", "collect", *common, *unet, "--out", str(acts)])
    assert rc == 0
    assert json.loads((acts / "meta.json").read_text())["rows"] == 1000
