"""Sampling speed of the embedded ShapesWorld model at its defaults (issue: ShapesWorld bars).

Prints and saves seconds per call for one image and for a batch of 8, median of N repetitions
after a warm-up, plus machine facts. Not a test: numbers depend on the machine.

    python benchmarks/shapes_speed.py [--reps 5] [--threads 2] [--out benchmarks/results/shapes_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from latency import machine_facts  # benchmarks/latency.py, beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/shapes_speed.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from safeguard.models import shapes_pipeline

    pipe = shapes_pipeline()
    results = {}
    for batch in (1, 8):
        prompts = ["a red star on a white background"] * batch
        pipe(prompts)  # warm-up
        times = []
        for r in range(args.reps):
            t0 = time.perf_counter()
            pipe(prompts, generator=torch.Generator().manual_seed(r))
            times.append(time.perf_counter() - t0)
        results[f"batch_{batch}"] = dict(
            median_s=statistics.median(times), min_s=min(times), max_s=max(times), reps=times
        )
        print(
            f"batch {batch}: median {statistics.median(times):.3f} s per call (min {min(times):.3f}, max {max(times):.3f})"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dict(
        defaults=dict(steps=pipe.default_num_inference_steps, guidance=pipe.default_guidance_scale), results=results,
        machine=machine_facts(torch.device("cpu")),
    )  # fmt: skip
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
