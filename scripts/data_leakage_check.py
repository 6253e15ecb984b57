"""Leakage check of the training-only LLM data: how close is each item to a validation or test prompt?

The extra training files (``harmful_harmless_pairs_extra*.json``, ``harmless_scary_words_extra*.json``) and the
retired held-out sets (``fresh`` ... ``fresh18``, training data since READING_VERSION 12, fresh5 since 13, fresh6 and
fresh7 since 14, fresh8 and fresh9 since 15, fresh10 since 16, fresh11 and fresh12 since 17, fresh13 and fresh14
since 18, fresh15 and fresh16 since 19, fresh17 and fresh18 since 20) must not restate held-out
prompts, or the held-out numbers would measure memory. For every training prompt (the original training split,
both sides of the extra pairs, the extra scary-word prompts, of both extra files and of the retired sets less their
exclusions) this prints the distribution of its highest MiniLM cosine to the prompts of each set still held out
(validation; test; fresh19; fresh20: both sides of the pairs and the scary-word prompts) and lists every item above ``--max``
(0.75, the bar the files were written to). Exit status 1 if any item is above it. ``--write-exclusions`` first
rewrites ``retired_exclusions.json``: the retired sets' items above ``--max``, which their training use leaves out.

    python scripts/data_leakage_check.py [--max 0.75] [--write-exclusions] [--out benchmarks/results/eval/llm_data_leakage.json]

About 20 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from safeguard.steering import data

ROOT = Path(__file__).resolve().parent.parent


def held_out() -> dict[str, list[str]]:
    """The validation prompts and those of the sets still held out (test, and the later sets not retired), by split."""
    return {
        split: [t for p in data.harmful_pairs(split) for t in (p["harmful"], p["harmless"])]
        + ([p["prompt"] for p in data.scary_harmless(split)] if split != "val" else [])
        for split in dict.fromkeys(("test", "val", *data.STILL_HELD_OUT))  # test first, as before
    }


@torch.no_grad()
def exclusions(threshold: float = 0.75) -> dict[str, list[str]]:
    """``{retired set: ids}``: its pairs with a side, and its scary-word prompts, above ``threshold`` to a held-out prompt."""
    from safeguard.steering.encoder import SentenceEncoder

    embed = SentenceEncoder().embed
    ref = torch.cat([embed(texts) for texts in held_out().values()])
    out = {}
    for split in data.RETIRED:
        pairs, scary = data.harmful_pairs(split), data.scary_harmless(split)
        near = (embed([t for p in pairs for t in (p["harmful"], p["harmless"])]) @ ref.T).max(1).values > threshold
        s_near = (embed([p["prompt"] for p in scary]) @ ref.T).max(1).values > threshold
        out[split] = [p["id"] for i, p in enumerate(pairs) if near[2 * i] or near[2 * i + 1]]
        out[split] += [p["id"] for i, p in enumerate(scary) if s_near[i]]
    return out


def training_sets() -> dict[str, list[tuple[str, str]]]:
    """``{name: [(id, prompt)]}``: the training-only files (the retired held-out sets less their exclusions) and, as
    the reference, the original training split."""
    out: dict[str, list[tuple[str, str]]] = {}
    for which in (*data.EXTRA, *data.RETIRED):
        out[f"{which}_pairs"] = [(p["id"], t) for p in data.extra_pairs(which) for t in (p["harmful"], p["harmless"])]
        out[f"{which}_scary"] = [(p["id"], p["prompt"]) for p in data.extra_scary_harmless(which)]
    return out | {
        "old_train": [(p["id"], t) for p in data.harmful_pairs("train") for t in (p["harmful"], p["harmless"])]
        + [(p["id"], p["prompt"]) for p in data.scary_harmless("train")],
    }


@torch.no_grad()
def leakage(threshold: float = 0.75) -> dict[str, dict]:
    """``{"<set>_vs_<split>": stats}`` of each item's highest cosine to that split, and the items above ``threshold``."""
    from safeguard.eval.llm import MiniLMRefusalJudge

    embed = MiniLMRefusalJudge()._embed
    refs = {name: embed(texts) for name, texts in held_out().items()}
    out = {}
    for name, items in training_sets().items():
        e = embed([t for _, t in items])
        for split, r in refs.items():
            mx = (e @ r.T).max(1).values
            q = mx.quantile(torch.tensor([0.5, 0.9, 0.99]))
            over = [{"id": items[i][0], "cosine": round(float(mx[i]), 4)} for i in torch.nonzero(mx > threshold)[:, 0]]
            out[f"{name}_vs_{split}"] = {
                "n": len(mx),
                "mean": float(mx.mean()),
                "median": float(q[0]),
                "p90": float(q[1]),
                "p99": float(q[2]),
                "max": float(mx.max()),
                "n_over_0.75": int((mx > 0.75).sum()),
                "n_over_0.85": int((mx > 0.85).sum()),
                "over_threshold": over,
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=float, default=0.75, help="highest cosine allowed for a training-only item")
    ap.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    ap.add_argument("--write-exclusions", action="store_true",
                    help=f"first rewrite safeguard/data/llm/{data.EXCLUSIONS}: the retired sets' items above --max")  # fmt: skip
    args = ap.parse_args()
    if args.write_exclusions:
        excluded = exclusions(args.max)
        note = (
            f"Items of the retired held-out sets ({', '.join(data.RETIRED)}) left out of detector training: pairs with "
            f"a side, and scary-word prompts, above MiniLM cosine {args.max} to a validation or still-held-out prompt "
            f"({', '.join(data.STILL_HELD_OUT)}). Written by scripts/data_leakage_check.py --write-exclusions."
        )
        blob = {"version": 1, "description": note, "threshold": args.max, "excluded": excluded}
        (data.DATA_DIR / data.EXCLUSIONS).write_text(json.dumps(blob, indent=2) + "\n")
        print(f"wrote {data.EXCLUSIONS}: " + ", ".join(f"{k} {len(v)}" for k, v in excluded.items()))
    res = leakage(args.max)
    bad = 0
    for k, v in res.items():
        print(
            f"{k:23s} n={v['n']:3d} mean {v['mean']:.3f} median {v['median']:.3f} p90 {v['p90']:.3f} "
            f"p99 {v['p99']:.3f} max {v['max']:.3f}"
        )
        for item in v["over_threshold"]:
            print(f"  above {args.max}: {item['id']} ({item['cosine']:.3f})")
            bad += 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"max_allowed": args.max, "sets": res}, indent=1) + "\n")
    print("ok: no training-only item above the bar" if not bad else f"{bad} training-only items above {args.max}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
