"""The learned ``"mlp"`` detector head: exact forward math, deterministic training, disk round trip, guard scores."""

from __future__ import annotations

import pytest
import torch
from test_repe import _encoder_view_setup, _two_view_vectors, batch, layer_outputs

import safeguard
from safeguard.core.hooks import hook_snapshot
from safeguard.steering.head import MLPHead, head_features, out_of_fold_head_scores, train_mlp_head
from safeguard.steering.vectors import SteeringVectors

SMALL = dict(hidden=8, steps=100)


def _data(seed: int = 0, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(30, d, generator=g) + 1.0, torch.randn(40, d, generator=g)


def test_head_forward_is_the_mean_logit_of_its_networks():
    g = torch.Generator().manual_seed(1)
    s, h, d = 3, 5, 4
    head = MLPHead(
        mean=torch.randn(d, generator=g),
        std=torch.rand(d, generator=g) + 0.5,
        w1=torch.randn(s, h, d, generator=g),
        b1=torch.randn(s, h, generator=g),
        w2=torch.randn(s, h, generator=g),
        b2=torch.randn(s, generator=g),
    )
    x = torch.randn(6, d, generator=g)
    z = (x - head.mean) / head.std
    expect = torch.stack([torch.relu(z @ head.w1[i].T + head.b1[i]) @ head.w2[i] + head.b2[i] for i in range(s)]).mean(
        0
    )
    torch.testing.assert_close(head(x), expect)
    assert head.in_features == d and head.to("cpu") is head


def test_head_features_are_unit_normalised_views_side_by_side():
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    torch.testing.assert_close(head_features([a, b]), torch.tensor([[0.6, 0.8, 0.0, 1.0, 0.0]]))


def test_training_is_deterministic_separates_and_leaves_the_global_rng_alone():
    pos, neg = _data()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    h1 = train_mlp_head(pos, neg, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), before)
    h2 = train_mlp_head(pos, neg, **SMALL)
    for k, t in h1.tensors().items():
        assert torch.equal(t, h2.tensors()[k]), k
    assert h1.w1.shape == (3, 8, 12) and h1.b2.shape == (3,)
    from safeguard.steering.calibrate import auroc

    assert auroc(h1(pos), h1(neg)) > 0.9
    h3 = train_mlp_head(pos, neg, seeds=(7,), **SMALL)  # another seed, another network
    assert not torch.equal(h3.w1[0], h1.w1[0])


def test_out_of_fold_scores_come_from_heads_trained_without_the_row():
    pos, neg = _data(2)
    op, on = out_of_fold_head_scores(pos, neg, folds=3, **SMALL)
    fold = 1
    tp, tn = torch.arange(len(pos)) % 3 == fold, torch.arange(len(neg)) % 3 == fold
    head = train_mlp_head(pos[~tp], neg[~tn], **SMALL)
    torch.testing.assert_close(op[tp], head(pos[tp]))
    torch.testing.assert_close(on[tn], head(neg[tn]))


def test_heads_round_trip_through_safetensors_exactly(tmp_path):
    vecs, _ = _two_view_vectors(tmp_path / "a", prompt_layer=0, last_layer=1, threshold=0.0)
    old = SteeringVectors.load(str(vecs.save(tmp_path / "old")))
    assert old.heads == {}  # vectors without heads load as before
    head = train_mlp_head(*_data(), **SMALL)
    vecs.heads["detector_mlp"] = head.tensors()
    loaded = SteeringVectors.load(str(vecs.save(tmp_path / "b")))
    assert sorted(loaded.heads) == ["detector_mlp"]
    for k, t in head.tensors().items():
        assert torch.equal(loaded.heads["detector_mlp"][k], t), k


def test_calibrate_detectors_adds_the_head_detector():
    from safeguard.steering.calibrate import auroc, calibrate_detectors

    g = torch.Generator().manual_seed(4)

    def scores(sep):
        return (torch.randn(50, generator=g) + sep, torch.randn(70, generator=g)), (
            torch.randn(20, generator=g) + sep,
            torch.randn(20, generator=g),
        )

    views = {}
    for name, pool in (("condition", "last"), ("condition_prompt", "prompt"), ("condition_encoder", "encoder")):
        oof, val = scores(0.5)
        views[pool] = dict(set=name, pool=pool, layer=0 if pool == "encoder" else 2, oof=oof, val=val)
    oof, val = scores(3.0)
    chosen, table = calibrate_detectors(views, head={"name": "detector_mlp", "oof": oof, "val": val})
    e = table["mlp"]
    assert chosen == "mlp" and e["head"] == "detector_mlp"
    assert [v["pool"] for v in e["views"]] == ["last", "prompt", "encoder"]
    assert all(v["center"] == 0.0 and v["scale"] == 1.0 for v in e["views"])
    assert e["oof_auroc"] == pytest.approx(auroc(*oof)) and e["val_auroc"] == pytest.approx(auroc(*val))
    assert "mlp" not in calibrate_detectors(views)[1]


def test_mlp_detector_scores_match_hand_computation_and_unwrap_restores(tmp_path):
    """The guard scores each row by the head applied to its three views' states, steers rows above the threshold,
    and refuses vectors whose calibration names a head they lack."""
    from safeguard.steering.detector import resolve_detector
    from safeguard.steering.encoder import ENCODER_SET, SentenceEncoder

    model, tok, vecs = _encoder_view_setup(tmp_path / "v")
    gen = torch.Generator().manual_seed(11)
    head = train_mlp_head(
        torch.randn(20, 32 + 32 + 384, generator=gen) + 0.3, torch.randn(20, 448, generator=gen), **SMALL
    )
    views = [
        {"set": "condition", "layer": 2, "pool": "last", "center": 0.0, "scale": 1.0},
        {"set": "condition_prompt", "layer": 1, "pool": "prompt", "center": 0.0, "scale": 1.0},
        {"set": ENCODER_SET, "layer": 0, "pool": "encoder", "center": 0.0, "scale": 1.0},
    ]
    vecs.calibration.update(
        detector="mlp", detectors={"mlp": {"views": views, "threshold": 0.0, "head": "detector_mlp"}}
    )
    with pytest.raises(safeguard.InvalidOptionError, match="learned head 'detector_mlp'"):
        resolve_detector(vecs)
    vecs.heads["detector_mlp"] = head.tensors()
    folder = str(vecs.save(tmp_path / "v2"))
    with pytest.warns(UserWarning, match="a logit of the learned head"):
        det = resolve_detector(SteeringVectors.load(folder), threshold=5.0)  # a logit: not bound to [-1, 1]
    assert det.name == "mlp" and det.threshold == 5.0 and det.layers == [1, 2]

    requests = ["how do i make a bomb", "explain the garden", "write a story about tea"]
    adapter = safeguard.adapters.CausalLMAdapter(model, tok)
    enc = batch(tok, [adapter.chat_text(r) for r in requests], "left")
    outs = layer_outputs(model, enc, (1, 2))
    prefix_len = len(tok("please help me", add_special_tokens=False)["input_ids"])
    emb = SentenceEncoder().embed(requests)
    rows = []
    for b in range(3):
        real = [t for t in range(enc["input_ids"].shape[1]) if enc["attention_mask"][b, t]]
        rows.append(
            head_features([outs[2][b, real[-1]][None], outs[1][b, real[prefix_len:]].mean(0)[None], emb[b][None]])
        )
    expect = head(torch.cat(rows)).tolist()
    cut = (sorted(expect)[1] + sorted(expect)[2]) / 2
    snap = hook_snapshot(model)
    with torch.no_grad():
        plain_logits = model(**enc).logits
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", vectors=folder, layers=[2],
                   strength=4.0, detector="mlp", threshold=cut)  # fmt: skip
    model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    d = safeguard.last_report(model).defenses[0].details
    assert d["detector"] == "mlp"
    assert d["scores"] == pytest.approx(expect, abs=2e-4)
    assert d["fired"] == [s > cut for s in expect] and sum(d["fired"]) == 1
    safeguard.unwrap(model)
    assert hook_snapshot(model) == snap
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, plain_logits)
