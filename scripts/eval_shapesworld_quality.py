"""Quality of the unguarded ShapesWorld model on held-out phrasings, as read by the judge.

Samples ``--n`` random scenes, captions each with a template never used in training
(``captions.HELDOUT_TEMPLATES``), generates at the pipeline defaults (or ``--guidance`` /
``--steps``), and reports colour, shape and background accuracy. The model card quotes this.

    python scripts/eval_shapesworld_quality.py --n 300 [--guidance 5.0 7.5] [--out benchmarks/results/shapes_quality.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from safeguard.eval.judge import ShapesJudge
from safeguard.models import shapes_pipeline
from safeguard.models.shapesworld.captions import heldout_caption
from safeguard.models.shapesworld.world import sample_specs


def evaluate(pipe, judge, specs, prompts, guidance: float, steps: int, batch: int = 25) -> dict:
    readings = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(specs), batch), desc=f"guidance {guidance}", mininterval=5):
        gens = [torch.Generator().manual_seed(10_000 + j) for j in range(i, min(i + batch, len(specs)))]
        out = pipe(
            prompts[i : i + batch], generator=gens, guidance_scale=guidance, num_inference_steps=steps, output_type="np"
        )
        readings += judge.read_many(out.images)
    seconds = time.perf_counter() - t0
    acc = {
        "color": float(np.mean([r.color == s.color for r, s in zip(readings, specs)])),
        "shape": float(np.mean([r.shape == s.shape for r, s in zip(readings, specs)])),
        "background": float(np.mean([r.background == s.background for r, s in zip(readings, specs)])),
    }
    acc["all_three"] = float(
        np.mean([(r.color, r.shape, r.background) == (s.color, s.shape, s.background) for r, s in zip(readings, specs)])
    )
    return dict(guidance=guidance, steps=steps, n=len(specs), accuracy=acc, seconds=seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--guidance", type=float, nargs="*", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/shapes_quality.json")
    args = p.parse_args()
    pipe = shapes_pipeline(weights_dir=args.weights_dir)
    judge = ShapesJudge()
    specs = sample_specs(args.n, 2024)
    rng = np.random.default_rng(2024)
    prompts = [heldout_caption(s, rng) for s in specs]
    steps = args.steps or pipe.default_num_inference_steps
    results = []
    for g in args.guidance or [pipe.default_guidance_scale]:
        r = evaluate(pipe, judge, specs, prompts, g, steps)
        results.append(r)
        a = r["accuracy"]
        print(
            f"guidance {g} steps {steps} on {r['n']} held-out samples: colour {a['color']:.3f} shape {a['shape']:.3f} "
            f"background {a['background']:.3f} all three {a['all_three']:.3f} ({r['seconds']:.0f} s)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(results=results, example_prompts=prompts[:10]), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
