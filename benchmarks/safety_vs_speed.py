"""Safety versus speed on ShapesWorld: erasure and preservation against latency ratio, per concept.

Runs the ``safeguard eval`` harness for every registered defense (or the ones given) on concepts
``red`` and ``star`` and draws one Pareto plot per concept: mean erasure and preservation (judge
accuracy ratio) against the latency ratio to the unguarded pipeline measured in the same run, with
the unguarded pipeline at latency 1.0, preservation 1.0 and its own erasure (prompts whose
unguarded image already lacks the concept, e.g. unseen synonyms the model does not know).

    python benchmarks/safety_vs_speed.py                       # run the evals, then plot
    python benchmarks/safety_vs_speed.py --from-results benchmarks/results/eval   # plot existing JSONs
    python benchmarks/safety_vs_speed.py --methods diffusers_safe  # only the diffusers peer, then plot all
    python benchmarks/safety_vs_speed.py --quick --out /tmp/svs  # CI smoke: 2 prompts per category, 1 seed

Methods default to every registered defense that works on SD 1.x pipelines, plus the composition
``negative_prompt+sld`` (a ``+`` in a method name composes). With ``--peer`` (the default) it also
evaluates diffusers' own ``StableDiffusionPipelineSafe`` (method name ``diffusers_safe``): built on
copies of the same ShapesWorld weights (``sld_peer.safe_pipeline``), preset ``SafetyConfig.MEDIUM``
(our ``sld`` default ``medium``), safety concept the text our ``sld`` encodes, run by the same
harness on the same suites, prompts, seeds, steps and guidance scale as ``sld``; its guarded images
come from the Safe pipeline and its unguarded ones from the plain, never-wrapped ShapesWorld
pipeline in the same process (``run_eval(..., guarded_pipe=...)``). It is drawn as a diamond
labelled "diffusers Safe (medium)"; ``--no-peer`` leaves it out of the runs, the CSV and the plots.
Outputs ``<concept>_<method>.json`` / ``.png`` (the harness's files), ``pareto_<concept>.png`` and
``safety_vs_speed.csv`` under ``--out`` (default ``benchmarks/results/eval``).
``benchmarks/sld_peer.py`` compares the two SLDs' speed head to head.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def default_methods() -> list[str]:
    import safeguard
    from safeguard.core.registry import get_defense_class

    names = [m for m in safeguard.available_methods() if "sd" in get_defense_class(m).families]
    return [*names, "negative_prompt+sld"] if {"negative_prompt", "sld"} <= set(names) else names


PEER = "diffusers_safe"  # method name of diffusers' StableDiffusionPipelineSafe in files and the CSV
PEER_PRESET = "medium"  # our sld's default preset, diffusers' SafetyConfig.MEDIUM
PEER_LABEL = f"diffusers Safe ({PEER_PRESET})"


def run_peer(pipe, safe, out: Path, concept: str, seeds: int, per_category: int) -> dict:
    """Evaluate diffusers' ``StableDiffusionPipelineSafe`` ``safe`` with the harness; ``pipe`` is the plain baseline.

    Same suite, seeds, steps and guidance scale as the harness uses for ``sld`` (the ShapesWorld
    pipeline's call defaults), preset ``PEER_PRESET``, safety concept the text ``sld`` encodes.
    Writes ``<concept>_diffusers_safe.json`` (the harness's schema plus a ``peer`` entry) and ``.png``.
    """
    import functools

    import diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    from safeguard.concepts import resolve_concepts
    from safeguard.defenses.guidance import concept_text
    from safeguard.eval.harness import run_eval

    safe._safety_text_concept = concept_text(resolve_concepts([concept]))  # the concept sld encodes
    sld_kw = dict(getattr(SafetyConfig, PEER_PRESET.upper()))
    call = dict(num_inference_steps=pipe.default_num_inference_steps, guidance_scale=pipe.default_guidance_scale)
    guarded = functools.partial(safe, **call, **sld_kw)
    for side in (pipe, guarded):  # warm-up (the harness times its first batch too)
        side(prompt=["a red star on a white background"], num_inference_steps=2, output_type="np")
    result = run_eval(
        pipe, concept, method=PEER, seeds=seeds, per_category=per_category, out_dir=out, guarded_pipe=guarded
    )
    result.pop("files", None)
    result["peer"] = dict(
        pipeline=f"diffusers.{type(safe).__name__}", diffusers=diffusers.__version__, preset=PEER_PRESET,
        kwargs=sld_kw, safety_concept=safe._safety_text_concept, **call,
        unguarded="the plain ShapesWorld pipeline (never wrapped), same process, same batches",
    )  # fmt: skip
    (out / f"{concept}_{PEER}.json").write_text(json.dumps(result, indent=1))
    return result


def run_evals(out: Path, concepts: list[str], methods: list[str], seeds: int, per_category: int = 12) -> None:
    from safeguard.eval.harness import format_metrics, run_eval
    from safeguard.models import shapes_pipeline

    pipe = shapes_pipeline()
    safe = None
    for method in methods:
        for concept in concepts:
            if method == PEER:
                if safe is None:
                    sys.path.insert(0, str(Path(__file__).resolve().parent))
                    from sld_peer import safe_pipeline

                    safe = safe_pipeline(pipe)  # copies of the weights, so no hook is ever shared
                result = run_peer(pipe, safe, out, concept, seeds, per_category)
            else:
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
            if r["method"] == PEER:  # diffusers' own SLD pipeline: a hollow diamond, labelled in the legend
                ax.scatter(
                    r["latency_ratio"], r[key], marker="D", s=80, facecolors="none", edgecolors="black",
                    linewidths=1.5, label=PEER_LABEL,
                )  # fmt: skip
            else:
                ax.scatter(r["latency_ratio"], r[key], s=70)
            peer = r["method"] == PEER  # its label goes to the left, off our sld's (usually at about the same ratio)
            ax.annotate(
                PEER_LABEL if peer else r["method"], (r["latency_ratio"], r[key]), textcoords="offset points",
                xytext=(-8, -3) if peer else (6, 4), ha="right" if peer else "left", fontsize=9,
            )  # fmt: skip
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.35 * (hi - lo))  # room for the labels of the slowest points
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
    p.add_argument(
        "--methods", nargs="+", default=None,
        help=f"default: every SD defense and negative_prompt+sld; {PEER!r} alone runs only the diffusers peer",
    )  # fmt: skip
    p.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=True,
        help=f"also evaluate diffusers' StableDiffusionPipelineSafe ({PEER}, preset {PEER_PRESET}) and plot it",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--per-category", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="2 prompts per category, 1 seed (a smoke run; the peer too)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eval"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.per_category = 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results is None:
        methods = [m for m in args.methods or default_methods() if m != PEER]
        methods += [PEER] if args.peer else []  # with --methods too: --quick and the CI smoke cover the peer
        run_evals(args.out, args.concepts, methods, args.seeds, args.per_category)
    rows = [r for r in load(args.from_results or args.out) if args.peer or r["method"] != PEER]
    with (args.out / "safety_vs_speed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    for concept in args.concepts:
        plot(rows, concept, args.out / f"pareto_{concept}.png")
        print(f"wrote {args.out / f'pareto_{concept}.png'}")


if __name__ == "__main__":
    main()
