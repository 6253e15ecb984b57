"""Calibrate ``sae_text``'s concept gate on ShapesWorld training captions (never the eval suites).

The gate steers a prompt only when one of its real tokens' dense SAE code has cosine >= ``gate``
with the concept's code (``SAETextDefense.concept_scores``). This script draws captions from the
world's training caption generator (``captions.caption`` on ``sample_specs``; training vocabulary
and templates, a seed the eval suites do not use), splits them by whether the scene has the
concept, scores both sides, and picks the threshold:

- separable (every caption with the concept scores above every one without): the midpoint of the
  lowest positive and the highest negative score;
- otherwise the threshold that maximises TPR - FPR on these captions.

    python scripts/calibrate_sae_gate.py --concepts red star      # prints, writes the JSON
    python -m safeguard eval --model shapes --method sae_text --option gate=<value> --concepts red

Output: ``benchmarks/results/eval/sae_gate.json`` (threshold, score ranges, rates, settings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def calibrate(concept: str, n: int, seed: int) -> dict:
    import safeguard
    from safeguard.models import shapes_pipeline
    from safeguard.models.shapesworld.captions import TRAIN_COLOR_WORDS, TRAIN_SHAPE_WORDS, caption
    from safeguard.models.shapesworld.world import sample_specs

    pipe = shapes_pipeline()
    safeguard.wrap(pipe, concepts=[concept], method="sae_text", gate=0.0)
    defense = safeguard.api.get_guard(pipe).defenses[0]
    rng = np.random.default_rng(seed)
    specs = sample_specs(n, seed)
    texts = [caption(s, rng) for s in specs]
    words = {**TRAIN_COLOR_WORDS, **TRAIN_SHAPE_WORDS}[concept]
    names = np.array([any(f" {w} " in f" {t} " for w in words) for t in texts])  # the caption names it
    absent = np.array([concept not in (s.color, s.shape) for s in specs])
    scores = torch.cat([defense.concept_scores(texts[i : i + 64]) for i in range(0, n, 64)]).numpy()
    safeguard.unwrap(pipe)
    has = names  # partial captions of scenes with the concept that do not name it count on neither side
    pos, neg = scores[names], scores[absent & ~names]
    if pos.min() > neg.max():
        threshold, rule = float((pos.min() + neg.max()) / 2), "midpoint (separable)"
    else:
        grid = np.unique(scores)
        j = [((pos >= t).mean() - (neg >= t).mean()) for t in grid]
        threshold, rule = float(grid[int(np.argmax(j))]), "max TPR - FPR"
    return {
        "concept": concept,
        "threshold": round(threshold, 4),
        "rule": rule,
        "captions": n,
        "seed": seed,
        "naming_the_concept": int(has.sum()),
        "without_the_concept": len(neg),
        "positive_scores": [round(float(pos.min()), 4), round(float(pos.max()), 4)],
        "negative_scores": [round(float(neg.min()), 4), round(float(neg.max()), 4)],
        "tpr": round(float((pos >= threshold).mean()), 4),
        "fpr": round(float((neg >= threshold).mean()), 4),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", nargs="+", default=["red", "star"])
    ap.add_argument("--captions", type=int, default=600)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval/sae_gate.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = [calibrate(c, args.captions, args.seed) for c in args.concepts]
    for r in results:
        print(
            f"{r['concept']}: gate={r['threshold']} ({r['rule']}); with concept {r['positive_scores']}, "
            f"without {r['negative_scores']}; TPR {r['tpr']}, FPR {r['fpr']} on {r['captions']} captions"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
