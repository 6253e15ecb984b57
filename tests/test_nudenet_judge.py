"""Plumbing of the NudeNet judge: input layout, output decoding, NMS (on synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from safeguard.eval import nudenet as nn


def test_preprocess_pads_to_square_and_scales():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x, w, h = nn.preprocess(img)
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32 and (w, h) == (200, 100)
    assert np.allclose(x[0, :, 10, 10], [1.0, 0.0, 0.0])  # RGB order, 0..1
    assert np.allclose(x[0, :, 300, 10], 0.0)  # bottom padding is black


def test_postprocess_decodes_box_in_image_pixels_and_suppresses_duplicates():
    out = np.zeros((1, 22, 5), dtype=np.float32)
    # anchor 0: FEMALE_BREAST_EXPOSED at centre (160, 80), 64x32 in model pixels, score 0.9
    out[0, :4, 0] = [160, 80, 64, 32]
    out[0, 4 + nn.LABELS.index("FEMALE_BREAST_EXPOSED"), 0] = 0.9
    # anchor 1: same box slightly shifted, lower score -> removed by NMS
    out[0, :4, 1] = [162, 81, 64, 32]
    out[0, 4 + nn.LABELS.index("FEMALE_BREAST_EXPOSED"), 1] = 0.5
    # anchor 2: below the minimum score -> dropped
    out[0, :4, 2] = [20, 20, 10, 10]
    out[0, 4 + nn.LABELS.index("FACE_MALE"), 2] = 0.1
    dets = nn.postprocess(out, width=640, height=320)
    assert len(dets) == 1
    d = dets[0]
    assert d["class"] == "FEMALE_BREAST_EXPOSED" and d["score"] == pytest.approx(0.9)
    # model 320 px <-> padded square of side 640: scale 2
    assert d["box"] == pytest.approx([2 * (160 - 32), 2 * (80 - 16), 128, 64])


def test_judge_runs_the_shipped_detector_on_synthetic_images():
    pytest.importorskip("onnxruntime")
    if not nn.nudenet_onnx_path().exists():
        pytest.skip("nudenet package not installed (pip install --no-deps nudenet)")
    judge = nn.NudeNetJudge()
    rng = np.random.default_rng(0)
    for img in (
        Image.new("RGB", (256, 256), (128, 128, 128)),
        Image.fromarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)),
    ):
        dets = judge.detect(img)
        assert isinstance(dets, list) and all(set(d) == {"class", "score", "box"} for d in dets)
        assert judge.is_unsafe(img) is False  # flat grey and noise show no body parts


def test_nudenet_eval_plumbing_on_a_tiny_pipeline():
    pytest.importorskip("onnxruntime")
    if not nn.nudenet_onnx_path().exists():
        pytest.skip("nudenet package not installed (pip install --no-deps nudenet)")
    from tiny_pipelines import tiny_sd

    import safeguard
    from safeguard.eval.harness import run_nudenet_eval

    pipe = tiny_sd()
    result = run_nudenet_eval(pipe, ["a person", "a beach"], ["nudity"], method="sld", seeds=1, progress=False)
    assert result["n"] == 2 and len(result["records"]) == 2
    assert result["unsafe_rate_unguarded"] == 0.0  # random 32x32 noise images show no body parts
    assert result["latency_ratio"] > 0 and not safeguard.is_wrapped(pipe)
