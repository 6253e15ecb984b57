"""Safety versus speed on ShapesWorld: erasure and preservation against latency ratio, per concept.

Runs the ``safeguard eval`` harness for every registered defense (or the ones given) on concepts
``red`` and ``star`` and draws one Pareto plot per concept: mean erasure and preservation (judge
accuracy ratio) against the latency ratio to the unguarded pipeline measured in the same run, with
the unguarded pipeline at latency 1.0, preservation 1.0 and its own erasure (prompts whose
unguarded image already lacks the concept, e.g. unseen synonyms the model does not know).

    python benchmarks/safety_vs_speed.py                       # run the evals, then plot
    python benchmarks/safety_vs_speed.py --from-results benchmarks/results/eval   # plot existing JSONs
    python benchmarks/safety_vs_speed.py --quick --out /tmp/svs  # CI smoke: 2 prompts per category, 1 seed

Methods default to every registered defense that works on SD 1.x pipelines, plus the composition
``negative_prompt+sld`` (a ``+`` in a method name composes). Outputs ``pareto_<concept>.png`` and
``safety_vs_speed.csv`` under ``--out`` (default ``benchmarks/results/eval``). diffusers' own
``StableDiffusionPipelineSafe`` is compared with ``sld`` by ``benchmarks/sld_peer.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def default_methods() -> list[str]:
    import safeguard
    from safeguard.core.registry import get_defense_class

    names = [m for m in safeguard.available_methods() if "sd" in get_defense_class(m).families]
    return [*names, "negative_prompt+sld"] if {"negative_prompt", "sld"} <= set(names) else names


def run_evals(out: Path, concepts: list[str], methods: list[str], seeds: int, per_category: int = 12) -> None:
    from safeguard.eval.harness import format_metrics, run_eval
    from safeguard.models import shapes_pipeline

    pipe = shapes_pipeline()
    for method in methods:
        for concept in concepts:
            spec = method.split("+") if "+" in method else method
            result = run_eval(pipe, concept, method=spec, seeds=seeds, per_category=per_category, out_dir=out)
            print(format_metrics(result))


def load(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        if "metrics" not in r or "records" not in r or r.get("options"):  # ShapesWorld evals at defaults only
            continue
        m = r["metrics"]
        target = [x for x in r["records"] if x["category"] != "preservation"]
        unguarded_erasure = sum(not x["unguarded_shows"] for x in target) / len(target)
        rows.append(
            dict(
                concept=r["concept"], method=r["method"], erasure_mean=m["erasure"]["mean"], asr=m["asr"]["all"],
                preservation=m["preservation"]["accuracy_ratio"], latency_ratio=m["latency"]["ratio"],
                unguarded_erasure=unguarded_erasure,
                **{f"erasure_{k}": v for k, v in m["erasure"].items() if k != "mean"},
            )
        )  # fmt: skip
    return rows


def plot(rows: list[dict], concept: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["concept"] == concept]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "erasure_mean", "mean erasure (higher is safer)"),
        (axes[1], "preservation", "preservation: accuracy ratio"),
    ):
        base = (
            sel[0]["unguarded_erasure"] if key == "erasure_mean" and sel else 1.0
        )  # same prompts and seeds in every run
        ax.scatter([1.0], [base], marker="*", s=160, color="black", label="unguarded")
        for r in sel:
            ax.scatter(r["latency_ratio"], r[key], s=70)
            ax.annotate(
                r["method"], (r["latency_ratio"], r[key]), textcoords="offset points", xytext=(6, 4), fontsize=9
            )
        ax.set_xlabel("latency ratio to unguarded (same run)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"ShapesWorld, concept {concept!r}: safety vs speed (2 seeds x 12 prompts per category)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-results", type=Path, default=None, help="plot existing eval JSONs instead of running")
    p.add_argument("--concepts", nargs="+", default=["red", "star"])
    p.add_argument("--methods", nargs="+", default=None, help="default: every SD defense and negative_prompt+sld")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--per-category", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="2 prompts per category, 1 seed (a smoke run)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eval"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.per_category = 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results is None:
        run_evals(args.out, args.concepts, args.methods or default_methods(), args.seeds, args.per_category)
    rows = load(args.from_results or args.out)
    with (args.out / "safety_vs_speed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    for concept in args.concepts:
        plot(rows, concept, args.out / f"pareto_{concept}.png")
        print(f"wrote {args.out / f'pareto_{concept}.png'}")


if __name__ == "__main__":
    main()
