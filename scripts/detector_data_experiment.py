"""Does more training data make the RepE harmful-request detector (the condition direction) better?

The ``harmful`` guard steers only when the last prompt token's state at the condition layer scores
above a threshold along a shrunk Fisher (LDA) direction (:func:`safeguard.steering.reading.lda_directions`,
read in :mod:`safeguard.steering.build`). With 104 training pairs in 576 dimensions the direction may be
data-starved. This script reads every state once and compares, everything else equal (same states,
folds, scary-word negatives, layer rule and threshold rule as :mod:`safeguard.steering.calibrate`):

- ``old``: the 104 training pairs (+ 48 scary-word harmless prompts as negatives), shrinkage 0.7
  (the setting shipped up to READING_VERSION 7; its table then matched the shipped ``condition_table``);
- ``old+extra``: the same plus the 240 extra training pairs (``harmful_harmless_pairs_extra.json``);
- a shrinkage sweep (0.3, 0.5, 0.7, 0.9) on both, chosen on out-of-fold + validation AUROC only;
- a learning curve: old + the first k extra pairs of each category.

Per layer: out-of-fold training AUROC (5 folds, as calibrate.py), the same restricted to the
original 104 + 104 + 48 training prompts (comparable across data sizes: the extra items may be
easier or harder than the original ones), validation AUROC (24 harmful vs 24 harmless, as
calibrate.py). For information only, never used to choose anything: held-out test AUROC (72
harmful vs 72 harmless + 52 scary-word prompts) and the test TPR/FPR at the threshold that
calibrate.py's rule picks (the share of test prompts the guard would steer).

It also records the leakage check of the extra data (``data_leakage_check.py``: MiniLM cosine of each extra prompt to every
validation and test prompt).

    OMP_NUM_THREADS=1 python scripts/detector_data_experiment.py [--out benchmarks/results/eval/repe_detector_data.json]

About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from data_leakage_check import leakage
from detector_common import lda_scores, prompt_sets, read_pools, write_result

from safeguard.adapters import CausalLMAdapter
from safeguard.models import smollm2
from safeguard.steering import data
from safeguard.steering.build import SHIPPED_DIR
from safeguard.steering.calibrate import auroc, best_threshold, select_condition_layer

LDA_SHRINKAGE = 0.7  # the detector shipped when this experiment ran (READING_VERSION 7)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_data.json"
CATEGORIES = ("weapons", "cybercrime", "fraud", "drugs", "violence", "self_harm", "hate", "privacy")


def read_all(adapter: CausalLMAdapter) -> dict[str, torch.Tensor]:
    """Last-prompt-token states ``[L, N, d]`` of every prompt set, each set read on its own (as calibrate.py)."""
    sets = prompt_sets(exclude=["scary_extra"])
    return read_pools(adapter, sets, pools=("last",))["last"]


def extra_subset(states: torch.Tensor, per_category: int) -> torch.Tensor:
    """The first ``per_category`` extra pairs of each category (extra pairs are ordered by category, 30 each)."""
    cats = [p["category"] for p in data.extra_pairs()]
    seen: dict[str, int] = {}
    keep = []
    for i, c in enumerate(cats):
        seen[c] = seen.get(c, 0) + 1
        if seen[c] <= per_category:
            keep.append(i)
    return states[:, keep]


def evaluate(s: dict[str, torch.Tensor], extra_per_category: int, shrinkage: float) -> dict:
    """Per-layer detection table and calibrate.py's choices for one training set and shrinkage."""
    n_old, n_scary = s["train_harmful"].shape[1], s["scary_train"].shape[1]
    x_pos = extra_subset(s["extra_harmful"], extra_per_category)
    x_neg = extra_subset(s["extra_harmless"], extra_per_category)
    n_extra = x_pos.shape[1]
    pos = torch.cat([s["train_harmful"], x_pos], dim=1)
    neg = torch.cat([s["train_harmless"], x_neg, s["scary_train"]], dim=1)
    sc, _ = lda_scores(s, pos, neg, shrinkage)
    oof_p, oof_n, v_p, v_n = sc["oof_p"], sc["oof_n"], sc["val_p"], sc["val_n"]
    t_p, t_h, t_s = sc["test_p"], sc["test_h"], sc["test_s"]
    orig_neg = torch.cat([torch.arange(n_old), torch.arange(n_old + n_extra, n_old + n_extra + n_scary)])
    t_n = torch.cat([t_h, t_s], dim=1)
    layer, base = select_condition_layer(v_p, v_n, oof_p, oof_n)  # calibrate.py's rule and table
    table = [
        row
        | {
            "oof_auroc_orig": auroc(oof_p[row["layer"], :n_old], oof_n[row["layer"], orig_neg]),
            "test_auroc_info": auroc(t_p[row["layer"]], t_n[row["layer"]]),
            "test_auroc_harmless_info": auroc(t_p[row["layer"]], t_h[row["layer"]]),
            "test_auroc_scary_info": auroc(t_p[row["layer"]], t_s[row["layer"]]),
        }
        for row in base
    ]
    best = table[layer]
    thr, tpr, fpr = best_threshold(
        torch.cat([oof_p[layer], v_p[layer]]), torch.cat([oof_n[layer], v_n[layer]]), fp_weight=1.5
    )
    chosen = dict(best) | {
        "threshold": thr,
        "calibration_tpr": tpr,
        "calibration_fpr": fpr,
        "test_tpr_info": float((t_p[layer] > thr).float().mean()),
        "test_fpr_harmless_info": float((t_h[layer] > thr).float().mean()),
        "test_fpr_scary_info": float((t_s[layer] > thr).float().mean()),
        "val_misordered_pairs": round((1 - best["val_auroc"]) * v_p.shape[1] * v_n.shape[1], 1),
    }
    return {
        "train_pairs": n_old + n_extra,
        "extra_pairs": n_extra,
        "shrinkage": shrinkage,
        "chosen": chosen,
        "table": table,
        "_scores": {"val": (v_p[layer], v_n[layer]), "test": (t_p[layer], t_n[layer])},
    }


def paired_bootstrap(a: dict, b: dict, split: str, reps: int = 2000, seed: int = 0) -> dict[str, float]:
    """AUROC(b) - AUROC(a) at each one's chosen layer, resampling the same prompts for both."""
    g = torch.Generator().manual_seed(seed)
    ap, an = a["_scores"][split]
    bp, bn = b["_scores"][split]
    deltas = []
    for _ in range(reps):
        ip = torch.randint(len(ap), (len(ap),), generator=g)
        ineg = torch.randint(len(an), (len(an),), generator=g)
        deltas.append(auroc(bp[ip], bn[ineg]) - auroc(ap[ip], an[ineg]))
    d = torch.tensor(deltas)
    return {
        "delta": auroc(bp, bn) - auroc(ap, an),
        "ci95": [float(d.quantile(0.025)), float(d.quantile(0.975))],
        "p_le_0": float((d <= 0).float().mean()),
    }


def row(name: str, r: dict) -> str:
    c = r["chosen"]
    return (
        f"{name:26s}{r['train_pairs']:6d}{r['shrinkage']:6.1f}{c['layer']:6d}{c['val_auroc']:8.3f}{c['oof_auroc']:8.3f}"
        f"{c['oof_auroc_orig']:9.3f}{c['threshold']:8.3f} | {c['test_auroc_info']:7.3f}{c['test_tpr_info']:7.3f}"
        f"{c['test_fpr_harmless_info']:7.3f}{c['test_fpr_scary_info']:7.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--shrinkage", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = smollm2()
    states = read_all(CausalLMAdapter(model, tok))
    logging.info("read states in %.0f s", time.perf_counter() - t0)

    runs: dict[str, dict] = {}
    for shrink in sorted(set(args.shrinkage) | {LDA_SHRINKAGE}):
        runs[f"old@{shrink}"] = evaluate(states, 0, shrink)
        runs[f"old+extra@{shrink}"] = evaluate(states, 30, shrink)
    curve = {k: evaluate(states, k, LDA_SHRINKAGE) for k in (0, 5, 10, 15, 20, 25, 30)}

    def score(r: dict) -> float:  # the choice rule: validation + out-of-fold AUROC at the chosen layer
        return r["chosen"]["val_auroc"] + r["chosen"]["oof_auroc"]

    best_new = max((k for k in runs if k.startswith("old+extra@")), key=lambda k: score(runs[k]))
    best_old = max((k for k in runs if k.startswith("old@")), key=lambda k: score(runs[k]))
    base, new = runs[f"old@{LDA_SHRINKAGE}"], runs[f"old+extra@{LDA_SHRINKAGE}"]

    shipped = json.loads((SHIPPED_DIR / "harmful-mean_diff" / "config.json").read_text())
    repro = None  # the shipped vectors are read this way only up to READING_VERSION 7 (no extra data, shrinkage 0.7)
    if not shipped.get("reading", {}).get("extra_data", False):
        repro = max(
            max(abs(a["val_auroc"] - b["val_auroc"]), abs(a["oof_auroc"] - b["oof_auroc"]))
            for a, b in zip(shipped["calibration"]["condition_table"], base["table"])
        )

    hdr = (
        f"{'run':26s}{'pairs':>6s}{'shr':>6s}{'layer':>6s}{'val':>8s}{'oof':>8s}{'oof_orig':>9s}{'thr':>8s} | "
        f"{'test*':>7s}{'tpr*':>7s}{'fpr_h*':>7s}{'fpr_s*':>7s}"
    )
    print("Chosen condition layer per run (calibrate.py rules). * = held-out test, information only.")
    print(hdr)
    for name, r in runs.items():
        print(row(name, r))
    print(f"\nchoice by val+oof: old data -> {best_old}; old+extra -> {best_new}")
    if repro is not None:
        print(f"reproduces the shipped condition_table to {repro:.2e} (max |delta| of val/oof AUROC)")

    print(f"\nPer layer, shrinkage {LDA_SHRINKAGE}: old (104 pairs) vs old+extra (344 pairs). * = test, info only.")
    print(f"{'layer':>5s} {'val':>13s} {'oof':>13s} {'oof_orig':>13s} {'test*':>13s}")
    for a, b in zip(base["table"], new["table"]):
        cols = [f"{a[k]:.3f}->{b[k]:.3f}" for k in ("val_auroc", "oof_auroc", "oof_auroc_orig", "test_auroc_info")]
        print(f"{a['layer']:5d} " + " ".join(f"{c:>13s}" for c in cols))

    print(f"\nLearning curve (shrinkage {LDA_SHRINKAGE}): extra pairs per category -> chosen layer metrics")
    print(hdr)
    for k, r in curve.items():
        print(row(f"old+{k}/cat", r))

    for name, r in (("old", base), ("old+extra", new)):
        top = sorted(r["table"], key=lambda x: -(x["val_auroc"] + x["oof_auroc"]))[:5]
        print(
            f"mean over its 5 best layers ({name}): val {sum(x['val_auroc'] for x in top) / 5:.3f}, "
            f"oof_orig {sum(x['oof_auroc_orig'] for x in top) / 5:.3f}, "
            f"test* {sum(x['test_auroc_info'] for x in top) / 5:.3f}"
        )

    boot = {
        f"{b_name} vs old@{LDA_SHRINKAGE}": {
            split: paired_bootstrap(base, runs[b_name], split) for split in ("val", "test")
        }
        for b_name in sorted({f"old+extra@{LDA_SHRINKAGE}", best_new})
    }
    for k, v in boot.items():
        print(
            f"paired bootstrap {k}: val delta {v['val']['delta']:+.4f} CI95 [{v['val']['ci95'][0]:+.4f}, "
            f"{v['val']['ci95'][1]:+.4f}]; test* delta {v['test']['delta']:+.4f} CI95 "
            f"[{v['test']['ci95'][0]:+.4f}, {v['test']['ci95'][1]:+.4f}]"
        )

    leak = leakage()
    for k, v in leak.items():
        print(
            f"leakage {k:22s} n={v['n']:3d} mean {v['mean']:.3f} median {v['median']:.3f} p90 {v['p90']:.3f} "
            f"p99 {v['p99']:.3f} max {v['max']:.3f} >0.85: {v['n_over_0.85']}"
        )

    def clean(r: dict) -> dict:
        return {k: v for k, v in r.items() if not k.startswith("_")}

    result = {
        "description": (
            "Condition-direction (harmful-request detector) quality with the original 104 training pairs vs "
            "104 + 240 extra training pairs, SmolLM2-135M-Instruct, last prompt token, shrunk LDA. "
            "Choices use out-of-fold training + validation AUROC only; every *_info field reads the held-out "
            "test split and is for information only."
        ),
        "counts": {k: int(v.shape[1]) for k, v in states.items()},
        "choice": {"old": best_old, "old+extra": best_new},
        "reproduces_shipped_table_max_abs_delta": repro,
        "runs": {k: clean(v) for k, v in runs.items()},
        "learning_curve": {str(k): clean(v) for k, v in curve.items()},
        "bootstrap": boot,
        "leakage": leak,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(result, Path(args.out))


if __name__ == "__main__":
    main()
