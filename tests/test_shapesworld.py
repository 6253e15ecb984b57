"""ShapesWorld: renderer and captions, the judge, the shipped model's loader, the eval harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safeguard.eval.color_rule import read_color
from safeguard.models.shapesworld import captions
from safeguard.models.shapesworld.world import (
    BACKGROUNDS,
    COLORS,
    SceneSpec,
    render,
    render_many,
    sample_specs,
)


def test_renderer_is_deterministic_from_seed():
    a, b = render_many(sample_specs(50, 7)), render_many(sample_specs(50, 7))
    assert a.shape == (50, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_many(sample_specs(50, 8)))


def test_render_follows_the_world_contract():
    for bg, rgb in BACKGROUNDS.items():
        img = render(SceneSpec(bg, "red", "circle", size=0.4, cx=0.3, cy=0.3))
        assert tuple(img[-1, -1]) == rgb  # far corner is plain background
    img = render(SceneSpec("white", "blue", "square", size=0.6))
    assert tuple(img[32, 32]) == COLORS["blue"]  # object centre is the exact palette colour
    with pytest.raises(ValueError, match="off the canvas"):
        SceneSpec("white", "blue", "square", size=0.7, cx=0.1)
    with pytest.raises(ValueError):
        SceneSpec("white", "blue", "square", size=0.9)


def test_colour_rule_reads_every_render_exactly():
    specs = sample_specs(600, 3)
    for img, spec in zip(render_many(specs), specs):
        r = read_color(img)
        assert (r.color, r.background) == (spec.color, spec.background)


def test_heldout_words_never_appear_in_training_captions():
    rng = np.random.default_rng(0)
    train = [captions.caption(s, rng) for s in sample_specs(3000, 1)]
    heldout_words = [
        w
        for table in (captions.HELDOUT_COLOR_WORDS, captions.HELDOUT_SHAPE_WORDS, captions.HELDOUT_BG_WORDS)
        for ws in table.values()
        for w in ws
    ]
    for word in heldout_words:
        assert not any(f" {word} " in f" {c} " for c in train), word
    import re

    for tpl in captions.HELDOUT_TEMPLATES:
        fragment = max((f.strip() for f in re.split(r"\{[a-z]\}", tpl)), key=len)  # e.g. "in front of a"
        assert len(fragment) > 4 and not any(fragment in c for c in train), tpl
    assert sum(c == "" for c in train) == 0  # empty captions are added by the trainer's dropout, not here


def test_judge_accuracy_on_clean_renders():
    from safeguard.eval.judge import ShapesJudge

    specs = sample_specs(500, 12345)
    readings = ShapesJudge().read_many(render_many(specs))
    shape_acc = np.mean([r.shape == s.shape for r, s in zip(readings, specs)])
    assert shape_acc >= 0.99
    assert all(r.color == s.color and r.background == s.background for r, s in zip(readings, specs))


@pytest.fixture(scope="module")
def shapes():
    from safeguard.models import shapes_pipeline

    return shapes_pipeline()


def test_loader_works_offline_with_defaults(shapes, monkeypatch):
    from diffusers import StableDiffusionPipeline

    assert isinstance(shapes, StableDiffusionPipeline)
    assert shapes.default_num_inference_steps <= 25
    img = shapes("a red star on a white background", generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_eval_harness_end_to_end(shapes, tmp_path):
    from safeguard.eval.harness import format_metrics, run_eval

    result = run_eval(
        shapes,
        "red",
        method="negative_prompt",
        seeds=1,
        per_category=2,
        batch_size=10,
        out_dir=tmp_path,
        progress=False,
    )
    m = result["metrics"]
    assert set(m["erasure"]) == {"direct", "seen_synonyms", "unseen_synonyms", "indirect", "mean"}
    assert all(0.0 <= v <= 1.0 for v in m["erasure"].values())
    assert m["latency"]["ratio"] > 0 and m["preservation"]["n"] == 2
    assert (tmp_path / "red_negative_prompt.json").exists() and (tmp_path / "red_negative_prompt.png").exists()
    assert "erasure" in format_metrics(result)
