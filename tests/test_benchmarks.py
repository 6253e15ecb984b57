"""Smoke test of benchmarks/latency.py: ``--quick`` on the tiny pipelines writes latency.json / .csv / .md
with the documented schema. Timings are never checked (they depend on the machine), only files, keys, types
and counts.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import safeguard
from safeguard.core.registry import get_defense_class

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "latency.py"
TINY = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
CALL_KEYS = {
    "total_s", "phases_s", "phase_calls", "hooks_s", "acted_steps", "report_guarded", "report_steps", "peak_mem_mb",
    "image_hw",
}  # fmt: skip


@functools.cache
def load_script():
    """benchmarks/latency.py as a module (benchmarks/ is not a package)."""
    name = "safeguard_benchmark_latency"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def expected_defenses(family: str) -> list[str]:
    names = [m for m in safeguard.available_methods() if family in get_defense_class(m).families]
    if {"negative_prompt", "sld"} <= set(names):
        names.append("negative_prompt+sld")
    if "safree" in names and family in ("sd", "sdxl"):  # its filter forced on, without and with re-attention
        names += ["safree (filter every step)", "safree (filter every step + re-attention)"]
    return names


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", *TINY, "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}"
    return out, res, json.loads((out / "latency.json").read_text())


def test_quick_run_writes_json_with_schema(quick_run):
    data = quick_run[2]
    assert data["schema"] == "safeguard.benchmarks.latency/1"
    assert data["errors"] == [] and data["interrupted"] is False
    s = data["settings"]
    assert s["quick"] is True and s["batches"] == [1, 2] and s["reps"] == 2 and s["steps"] == 2
    assert s["models"] == list(TINY) and s["device"] == "cpu" and s["dtype"] == "fp32"
    m = data["machine"]
    for key in ("tag", "cpu", "cores", "torch_threads", "device_name", "torch", "diffusers", "transformers",
                "python", "date", "git_commit"):  # fmt: skip
        assert key in m
    assert m["tag"].startswith("cpu-") and m["tag"].endswith("c")
    assert data["mem_kind"] in ("rss_peak_per_call", "rss_peak_process")

    expected = {
        (model, d, b) for model, fam in TINY.items() for d in expected_defenses(fam) for b in (1, 2)
    }  # fmt: skip
    # defenses that need weights trained for the model (an SAE) are skipped on random tiny models, with the reason
    skipped = {(k["model"], k["defense"]) for k in data["skipped"]}
    assert all(d in ("sae_text", "sae_unet", None) for _, d in skipped) and all(k["reason"] for k in data["skipped"])
    expected = {(m, d, b) for m, d, b in expected if (m, d) not in skipped}
    assert {(c["model"], c["defense"], c["batch"]) for c in data["cases"]} == expected
    if not expected_defenses("flux"):
        assert [k["model"] for k in data["skipped"] if k["defense"] is None] == ["tiny-flux"]

    for case in data["cases"]:
        assert case["family"] == TINY[case["model"]] and case["concept"] == "nudity" and case["steps"] == 2
        assert len(case["image_size"]) == 2 and is_number(case["wrap_s"])
        method = case["method"]  # a name, a composition list, or wrap options (the forced SAFREE rows)
        names = [method["method"]] if isinstance(method, dict) else method if isinstance(method, list) else [method]
        assert len(case["reps"]) == 2 and [r["first"] for r in case["reps"]] == ["unguarded", "guarded"]
        for rep in case["reps"]:
            assert is_number(rep["ratio"])
            for side, guarded in (("unguarded", False), ("guarded", True)):
                call = rep[side]
                assert set(call) == CALL_KEYS
                assert call["report_guarded"] is guarded  # disabled() really ran unguarded, and vice versa
                assert call["phase_calls"]["denoise"] == 2 and call["phase_calls"]["decode"] == 1
                assert call["phase_calls"]["text"] >= 1
                assert sorted(call["hooks_s"]) == sorted(names)
                assert all(is_number(v) for v in [call["total_s"], call["peak_mem_mb"], *call["phases_s"].values()])
                assert all(is_number(v) for v in call["hooks_s"].values())
                assert call["image_hw"] == case["image_size"]
            assert all(v == 0 for v in rep["unguarded"]["hooks_s"].values())
        sm = case["summary"]
        for side in ("unguarded", "guarded"):
            assert set(sm[side]) >= {"median", "min", "max", "iqr", "split_s_per_img", "hooks_s_per_img", "peak_mem_mb"}
            assert set(sm[side]["split_s_per_img"]) == {"text", "denoise", "decode", "other"}
        assert set(sm["ratio"]) == {"median", "min", "max", "of_medians"}
        assert sorted(sm["hooks_by_defense_s_per_img"]) == sorted(names)
        assert set(sm["extra_split_s_per_img"]) == {"text", "denoise", "decode"}


def test_quick_run_writes_csv_and_markdown(quick_run):
    out, res, data = quick_run
    latency = load_script()
    with (out / "latency.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == latency.CSV_COLUMNS
        rows = list(reader)
    assert [(r["model"], r["defense"], int(r["batch"])) for r in rows] == [
        (c["model"], c["defense"], c["batch"]) for c in data["cases"]
    ]
    for row in rows:
        float(row["unguarded_s_per_img"]), float(row["guarded_s_per_img"]), float(row["ratio_median"])
        assert row["mem_kind"] == data["mem_kind"]

    md = (out / "latency.md").read_text()
    header = "| model | defense | batch | steps | s/img unguarded | s/img guarded | ratio | peak memory |"
    assert header in md
    table = [line for line in md.splitlines() if line.startswith("| tiny-")]
    assert len(table) == len(data["cases"])
    assert header in res.stdout  # the table is printed at the end
    assert md == latency.render_markdown(data)


def test_render_rebuilds_outputs_from_json(quick_run, tmp_path, capsys):
    out = quick_run[0]
    latency = load_script()
    latency.main(["--render", str(out / "latency.json"), "--out", str(tmp_path)])
    assert (tmp_path / "latency.md").read_text() == (out / "latency.md").read_text()
    assert (tmp_path / "latency.csv").read_text() == (out / "latency.csv").read_text()
    assert "| model | defense |" in capsys.readouterr().out


def test_missing_shapes_weights_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    latency = load_script()

    def missing(device, dtype):
        raise safeguard.MissingWeightsError("no ShapesWorld weights (test)")

    monkeypatch.setitem(latency.MODELS, "shapes", dataclasses.replace(latency.MODELS["shapes"], build=missing))
    data = latency.main(["--quick", "--models", "shapes", "--out", str(tmp_path)])
    assert data["cases"] == []
    assert [k["model"] for k in data["skipped"]] == ["shapes"] and "weights" in data["skipped"][0]["reason"]
    captured = capsys.readouterr()
    assert "skipping shapes" in captured.out + captured.err
    assert json.loads((tmp_path / "latency.json").read_text())["skipped"] == data["skipped"]
    assert "shapes: weights missing" in (tmp_path / "latency.md").read_text()


LLM_SCRIPT = REPO / "benchmarks" / "llm.py"
LLM_VARIANTS = ["unguarded", "repe-conditional", "repe-passed", "repe-add", "repe-ablate", "steering-vectors-add"]


def test_llm_quick_run_writes_files_and_schema(tmp_path):
    """benchmarks/llm.py --quick (tiny random Llama, no SmolLM2): llm.json / .csv / .md and their schema."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(LLM_SCRIPT), "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}"
    data = json.loads((tmp_path / "llm.json").read_text())
    assert data["schema"] == "safeguard.benchmarks.llm/3"
    assert data["errors"] == [] and data["interrupted"] is False
    s = data["settings"]
    assert s["quick"] is True and s["batches"] == [1, 8] and s["reps"] == 2 and s["model"] == "tiny-llama"
    assert s["calibration"]["layers"] == [1] and s["calibration"]["condition_layer"] == 2
    assert data["machine"]["tag"].startswith("cpu-")
    peer_installed = importlib.util.find_spec("steering_vectors") is not None
    variants = LLM_VARIANTS if peer_installed else LLM_VARIANTS[:-1]
    assert [(c["batch"], c["variant"]) for c in data["cases"]] == [(b, v) for b in (1, 8) for v in variants]
    for case in data["cases"]:
        assert len(case["reps"]) == 2 and case["new_tokens"] == s["new_tokens"] and case["prompt_tokens"] > 0
        for rep in case["reps"]:
            assert all(is_number(rep[k]) for k in ("prefill_s", "decode_s", "full_s", "tokens_per_s", "prefill_ratio"))
            assert 0 < rep["prefill_s"] < rep["full_s"] and 0 < rep["decode_s"] < rep["full_s"]
            assert is_number(rep["step_s_median"]) and rep["step_s_median"] <= rep["decode_s"]
            assert is_number(rep["decode_ratio"])
            if case["variant"] == "unguarded":
                assert rep["prefill_ratio"] == rep["decode_ratio"] == 1.0
        sm = case["summary"]
        for key in ("prefill_s", "tokens_per_s", "prefill_ratio", "decode_ratio"):
            assert set(sm[key]) >= {"median", "min", "max"}
        assert set(sm["prefill_ratio"]) == set(sm["decode_ratio"]) == {"median", "min", "max", "of_medians"}
        fired = {"repe-conditional": 1.0, "repe-passed": 0.0}.get(case["variant"])  # passed: threshold above all
        assert sm["fired"] == fired

    spec = importlib.util.spec_from_file_location("safeguard_benchmark_llm", LLM_SCRIPT)
    llm = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = llm
    spec.loader.exec_module(llm)
    with (tmp_path / "llm.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == llm.CSV_COLUMNS
        assert [(int(r["batch"]), r["variant"]) for r in reader] == [(c["batch"], c["variant"]) for c in data["cases"]]
    md = (tmp_path / "llm.md").read_text()
    assert "| batch | variant | prefill | prefill x | decode tok/s | decode x | fired |" in md
    assert md == llm.render_markdown(data) and md.splitlines()[0] in res.stdout

    # hook cost of one decode step: every hook on the model, counted and timed per variant
    assert set(data["hook_cost"]) == {"1", "8"} and s["hook_rounds"] == 2 and s["hook_calls"] == 20
    for per in data["hook_cost"].values():
        assert list(per) == variants
        # unguarded: none; repe: the monitor's and the gates' pre-hooks plus one edit hook per edited layer
        hooks = {"unguarded": 0, "repe-conditional": 3, "repe-add": 3, "repe-ablate": 2 + 4, "steering-vectors-add": 1}
        hooks["repe-passed"] = 3  # the quick vectors calibrate no release window
        assert {v: c["hooks"] for v, c in per.items()} == {v: hooks[v] for v in variants}
        for c in per.values():
            assert len(c["rounds"]) == 2 and c["us_min"] <= c["us_median"] <= c["us_max"] and c["us_min"] > 0
    assert "| batch | variant | hooks | hook time per decode step | share of a decode step |" in md

    peer = data["peer"]
    if not peer_installed:
        assert peer["available"] is False and [k["variant"] for k in data["skipped"]] == ["steering-vectors-add"]
        pytest.skip("steering-vectors is not installed (pip install --no-deps steering-vectors): peer rows not checked")
    assert peer["available"] is True and peer["layers"] == [1] and data["skipped"] == []
    for batch in ("1", "8"):  # the peer adds exactly what repe's add mode adds (repe with skip_first=False)
        assert peer["check"][batch]["max_abs_logit_diff"] < 1e-4 and peer["check"][batch]["same_tokens"] is True
    assert set(data["peer_pairs"]) == {"1", "8"}
    for batch, pair in data["peer_pairs"].items():  # repe-add over the peer, repetition by repetition
        d = pair["decode_throughput"]
        ours = {
            r["rep"]: r["tokens_per_s"]
            for c in data["cases"]
            if c["variant"] == "repe-add" and str(c["batch"]) == batch
            for r in c["reps"]
        }
        theirs = {
            r["rep"]: r["tokens_per_s"]
            for c in data["cases"]
            if c["variant"] == "steering-vectors-add" and str(c["batch"]) == batch
            for r in c["reps"]
        }
        assert d["reps"] == 2 and d["ratios"] == pytest.approx([ours[i] / theirs[i] for i in sorted(ours)])
        assert d["ci95"][0] <= d["median"] <= d["ci95"][1] and d["share_at_least_1"] in (0.0, 0.5, 1.0)
    assert "ours / peer" in md


def test_sld_peer_quick_run_writes_files_and_schema(tmp_path):
    """benchmarks/sld_peer.py --quick: our sld beside diffusers' StableDiffusionPipelineSafe (files and schema only)."""
    pytest.importorskip("diffusers")
    from safeguard.models.shapes import shapes_pipeline  # noqa: F401  (the embedded weights ship in the package)

    cmd = [sys.executable, str(REPO / "benchmarks" / "sld_peer.py"), "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "sld_peer.json").read_text())
    assert data["schema"] == "safeguard.benchmarks.sld_peer/1" and data["settings"]["quick"] is True
    (row,) = data["rows"]
    assert row["batch"] == 1 and set(row["s_per_image"]) == {"unguarded", "ours", "diffusers"}
    assert all(is_number(v) for v in row["s_per_image"].values()) and is_number(
        row["ratio_ours_over_diffusers"]["median"]
    )
    assert row["max_pixel_diff_ours_vs_diffusers"] < 1e-4  # 2 steps: still in the warm-up, so the images agree
    assert set(data["erasure_direct"]) == {"prompts", "unguarded", "ours", "diffusers"}
    assert "ours / diffusers" in (tmp_path / "sld_peer.md").read_text()


def test_safety_vs_speed_quick_run_writes_evals_csv_and_plots(tmp_path):
    """benchmarks/safety_vs_speed.py --quick: one defense, the composition and the diffusers peer (files only)."""
    pytest.importorskip("matplotlib")
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "safety_vs_speed.py"), "--quick", "--concepts", "red",
        "--methods", "negative_prompt", "negative_prompt+sld", "--out", str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    names = ("red_negative_prompt.json", "red_negative_prompt+sld.json", "red_diffusers_safe.json",
             "red_diffusers_safe.png", "safety_vs_speed.csv", "pareto_red.png")  # fmt: skip
    for name in names:
        assert (tmp_path / name).is_file(), name
    comp = json.loads((tmp_path / "red_negative_prompt+sld.json").read_text())
    assert comp["method"] == "negative_prompt+sld" and comp["per_category"] == 2 and comp["seeds"] == 1
    rows = list(csv.DictReader((tmp_path / "safety_vs_speed.csv").open()))
    assert {r["method"] for r in rows} >= {"negative_prompt", "negative_prompt+sld", "diffusers_safe"}

    # diffusers' StableDiffusionPipelineSafe through the same harness: its schema plus `peer`, the same samples
    peer = json.loads((tmp_path / "red_diffusers_safe.json").read_text())
    assert set(peer) == set(comp) | {"peer"} and peer["method"] == "diffusers_safe" and peer["options"] == {}
    assert peer["per_category"] == 2 and peer["seeds"] == 1 and peer["last_report"] is None
    for key in ("erasure", "asr", "unguarded_shows", "n", "preservation", "latency"):
        assert set(peer["metrics"][key]) == set(comp["metrics"][key]), key
    assert peer["peer"]["preset"] == "medium" and peer["peer"]["kwargs"]["sld_guidance_scale"] == 1000
    assert peer["peer"]["safety_concept"].split(", ")[0] == "red" and peer["peer"]["num_inference_steps"] == 20
    samples = [(r["prompt"], r["category"], r["seed"], r["asked"]) for r in comp["records"]]
    assert [(r["prompt"], r["category"], r["seed"], r["asked"]) for r in peer["records"]] == samples
    assert [r["unguarded"] for r in peer["records"]] == [r["unguarded"] for r in comp["records"]]  # same baseline

    # --no-peer leaves it out of the CSV (and the plots) when re-plotting
    spec = importlib.util.spec_from_file_location("safeguard_benchmark_svs", REPO / "benchmarks" / "safety_vs_speed.py")
    svs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(svs)
    svs.main(["--from-results", str(tmp_path), "--no-peer", "--concepts", "red", "--out", str(tmp_path / "replot")])
    rows = list(csv.DictReader((tmp_path / "replot" / "safety_vs_speed.csv").open()))
    assert {r["method"] for r in rows} == {"negative_prompt", "negative_prompt+sld"}
    assert (tmp_path / "replot" / "pareto_red.png").is_file()


def test_kernels_quick_run_writes_files_and_schema(tmp_path):
    """benchmarks/kernels.py --quick: eager timings always; the fused columns say why they are empty on a CPU."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "kernels.py"),
        "--quick",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["schema"] == "safeguard.benchmarks.kernels/1" and data["settings"]["quick"] is True
    assert [(r["kernel"], r["shape"]) for r in data["rows"]] == [
        ("sld_guidance", [8, 4, 8, 8]),
        ("ablate_rows", [8, 1, 576]),
    ]
    for r in data["rows"]:
        assert all(is_number(r["eager_us"][k]) and r["eager_us"][k] > 0 for k in ("median", "min", "max"))
        assert (
            r["fused_us"] is None and r["speedup"] is None and r["fused_path"].startswith(("not timed", "triton not"))
        )
    with (tmp_path / "kernels.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "| kernel | case | shape |" in (tmp_path / "kernels.md").read_text()
