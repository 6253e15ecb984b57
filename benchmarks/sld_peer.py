"""Our ``sld`` beside diffusers' own ``StableDiffusionPipelineSafe`` on the ShapesWorld model.

Both run Safe Latent Diffusion at the same preset on the same weights (separate copies, so no
hook is shared), the same prompts and the same seeds, interleaved in one process with a plain
unguarded pipeline as the baseline. Reported per batch size: seconds per image (median of the
repetitions), the ratio ours / diffusers (median of per-repetition ratios, with min-max), each
one's ratio to unguarded, the largest pixel difference between the two guarded images, and on
the ShapesWorld suite's direct prompts for the concept the judge's erasure rate for both.

    python benchmarks/sld_peer.py                      # batch 1 and 4, 5 reps, 20 steps, preset medium
    python benchmarks/sld_peer.py --quick              # CI smoke: batch 1, 2 reps, 2 steps (files and schema)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import machine_facts

import safeguard
from safeguard.concepts import resolve_concepts
from safeguard.defenses.guidance import concept_text


def safe_pipeline(base):
    """diffusers' ``StableDiffusionPipelineSafe`` on copies of ``base``'s modules (no hook is shared), no checker."""
    from diffusers import StableDiffusionPipelineSafe

    safe = StableDiffusionPipelineSafe(
        vae=copy.deepcopy(base.vae), text_encoder=copy.deepcopy(base.text_encoder), tokenizer=base.tokenizer,
        unet=copy.deepcopy(base.unet), scheduler=type(base.scheduler).from_config(base.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    safe.set_progress_bar_config(disable=True)
    return safe


def build(steps: int):
    from safeguard.models import shapes_pipeline

    plain = shapes_pipeline()
    ours = shapes_pipeline()
    base = shapes_pipeline()
    safe = safe_pipeline(base)
    for p in (plain, ours):
        p.set_progress_bar_config(disable=True)
    return plain, ours, safe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="medium", choices=["weak", "medium", "strong", "max"])
    ap.add_argument("--concept", default="red")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.steps = [1], 2, 2
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    from safeguard.eval.judge import ShapesJudge
    from safeguard.eval.suites import build_suite

    torch.manual_seed(0)
    machine = machine_facts(torch.device("cpu"))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / machine["tag"])
    out.mkdir(parents=True, exist_ok=True)
    plain, ours, safe = build(args.steps)
    safeguard.wrap(ours, concepts=[args.concept], method="sld", preset=args.preset)
    sld_kw = dict(getattr(SafetyConfig, args.preset.upper()))
    safe._safety_text_concept = concept_text(resolve_concepts([args.concept]))  # the concept ours encodes
    guidance = 5.0
    suite = [p.prompt for p in build_suite(args.concept, per_category=12) if p.category == "direct"]

    def call(which: str, prompts: list[str], seed: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        kw = dict(num_inference_steps=args.steps, guidance_scale=guidance, generator=gen, output_type="np")
        if which == "diffusers":
            return np.asarray(safe(prompts, **kw, **sld_kw).images)
        return np.asarray((plain if which == "unguarded" else ours)(prompts, **kw).images)

    rows = []
    variants = ("unguarded", "ours", "diffusers")
    total = len(args.batch) * (args.reps + 1) * len(variants)
    bar = tqdm(total=total, desc="sld vs diffusers")
    for b in args.batch:
        prompts = (suite * b)[:b]
        times: dict[str, list[float]] = {v: [] for v in variants}
        images: dict[str, np.ndarray] = {}
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            order = variants if rep % 2 == 0 else variants[::-1]
            for v in order:
                t0 = time.perf_counter()
                images[v] = call(v, prompts, seed=rep)
                if rep:
                    times[v].append((time.perf_counter() - t0) / b)
                bar.update(1)
        ratio = [o / d for o, d in zip(times["ours"], times["diffusers"])]
        rows.append(
            {
                "batch": b,
                "s_per_image": {v: statistics.median(t) for v, t in times.items()},
                "ratio_ours_over_diffusers": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)},
                "ratio_to_unguarded": {
                    v: statistics.median([x / u for x, u in zip(times[v], times["unguarded"])])
                    for v in ("ours", "diffusers")
                },
                "max_pixel_diff_ours_vs_diffusers": float(np.abs(images["ours"] - images["diffusers"]).max()),
                "raw_s_per_image": times,
            }
        )
    bar.close()
    judge = ShapesJudge()
    n = 4 if args.quick else len(suite)
    erasure = {}
    for v in ("unguarded", "ours", "diffusers"):
        imgs = np.concatenate([call(v, suite[i : i + 8][: n - i], seed=100 + i) for i in range(0, n, 8)])
        erasure[v] = sum(r.color != args.concept and r.shape != args.concept for r in judge.read_many(imgs)) / len(imgs)
    result = {
        "schema": "safeguard.benchmarks.sld_peer/1",
        "machine": machine,
        "settings": {"batch": args.batch, "reps": args.reps, "steps": args.steps, "preset": args.preset, "concept": args.concept,
                     "guidance": guidance, "quick": args.quick, "diffusers_kwargs": sld_kw,
                     "concept_text": safe._safety_text_concept},
        "rows": rows,
        "erasure_direct": {"prompts": n, **erasure},
    }  # fmt: skip
    (out / "sld_peer.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# `sld` vs diffusers `StableDiffusionPipelineSafe` ({machine['tag']}, ShapesWorld, preset {args.preset}, "
        f"concept {args.concept!r}, {args.steps} steps, {args.reps} reps)",
        "",
        "| batch | s/img unguarded | s/img ours | s/img diffusers | ours / diffusers | ours / unguarded | diffusers / unguarded | max pixel diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, q = r["s_per_image"], r["ratio_ours_over_diffusers"]
        lines.append(
            f"| {r['batch']} | {s['unguarded']:.3f} | {s['ours']:.3f} | {s['diffusers']:.3f} | {q['median']:.3f} "
            f"({q['min']:.2f}-{q['max']:.2f}) | {r['ratio_to_unguarded']['ours']:.2f} | "
            f"{r['ratio_to_unguarded']['diffusers']:.2f} | {r['max_pixel_diff_ours_vs_diffusers']:.1e} |"
        )
    lines += ["", f"Erasure of {args.concept!r} on the suite's {n} direct prompts (judge): unguarded "
              f"{erasure['unguarded']:.2f}, ours {erasure['ours']:.2f}, diffusers {erasure['diffusers']:.2f}."]  # fmt: skip
    lines += [
        "",
        "Where the images differ: diffusers encodes the safety concept without the attention mask "
        "(`pipeline_stable_diffusion_safe.py`: `self.text_encoder(safety_concept_input.input_ids)`), while it "
        "encodes the prompt with the mask when `text_encoder.config.use_attention_mask` is set, as the embedded "
        "model's BERT encoder does; `sld` encodes the concept exactly as the prompt. On CLIP encoders (no mask) the "
        "two agree to 1e-4 (tests/test_wrap_api.py). Before the warm-up ends the images are identical.",
    ]
    (out / "sld_peer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'sld_peer.json'}, {out / 'sld_peer.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
