"""Do more scary-word negatives (and the extra pairs) make the RepE harmful-request detector better?

The shipped ``harmful`` detector ``"both"`` (:mod:`safeguard.steering.detector`) sums two standardised cosines
with shrunk Fisher (LDA 0.7) directions, read on 104 harmful vs 104 matched harmless training requests plus 48
harmless requests with dangerous-sounding words. Adding the 240 extra training pairs did not help
(``detector_data_experiment.py``): its scary-word false positives rose, as if with more harmful data the
direction leant on alarming words and the 48 scary-word negatives were too few to hold it back. This script
tests that with 200 new training-only scary-word harmless prompts (``harmless_scary_words_extra.json``).

Variants (the training data of both pools' directions; everything else as ``safeguard.steering.build``):

- ``old``: the shipped data;
- ``old+scary``: + the 200 extra scary-word prompts as negatives;
- ``old+extra``: + the 240 extra pairs;
- ``old+extra+scary``: both.

Each variant is read with the LDA shrinkage shipped before (0.7) and with 0.3, 0.5 and 0.9 (``--shrinkage``: more data may
want less shrinkage). Each picks each pool's layer by validation + out-of-fold AUROC on its own data and forms the
``last``, ``prompt`` and ``both`` detectors (calibrate.py's rules). Fixed in advance, the comparison pool is
the same for all: out-of-fold (5 folds) scores of the 104 original harmful requests and the 24 validation
ones as positives; the 104 original harmless, the 48 original scary-word prompts, the 24 validation harmless and
the 200 extra scary-word prompts (out-of-fold where a variant trains on them, plainly out of sample where it
does not) as negatives. **Choice:** the highest TPR within FPR 0.05 on that pool (``common_tpr@5``), then the
fewest training prompts, then shrinkage 0.7. Also reported: each variant's own calibration (the threshold build.py would pick by
``TPR - 1.5 FPR``) and its false-positive rate on the extra scary-word prompts at that threshold. Held-out test
numbers (``*_info``) are information only and choose nothing.

    OMP_NUM_THREADS=2 python scripts/detector_negatives_experiment.py [--states /tmp/negatives.safetensors]

About 6 minutes on 2 CPU cores (``--states`` keeps the read states for a rerun).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from detector_common import (
    POOLS,
    cached_states,
    detector_metrics,
    lda_scores,
    prompt_sets,
    standardised_sum,
    write_result,
)

from safeguard.steering.calibrate import roc_points, select_condition_layer
from safeguard.steering.reading import projections

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_negatives.json"
BASE_SHRINKAGE = 0.7  # the detector's LDA shrinkage before this experiment (READING_VERSION 7)
VARIANTS = {
    "old": (False, False),
    "old+scary": (False, True),
    "old+extra": (True, False),
    "old+extra+scary": (True, True),
}


def pool_scores(
    s: dict[str, torch.Tensor], extra: bool, scary: bool, shrinkage: float = BASE_SHRINKAGE
) -> dict[str, torch.Tensor]:
    """Per-layer cosine scores ``[L, N]`` of one pool under one variant's training data.

    Negatives are ordered as build.py orders them: matched harmless (original, extra), then scary-word
    (original, extra). ``common_n`` holds the comparison pool's negatives: original training negatives
    (out-of-fold), then the 200 extra scary-word prompts (out-of-fold if trained on, else projected).
    """
    pos = [s["train_harmful"]] + ([s["extra_harmful"]] if extra else [])
    neg = [s["train_harmless"]] + ([s["extra_harmless"]] if extra else []) + [s["scary_train"]]
    neg += [s["scary_extra"]] if scary else []
    scores, dirs = lda_scores(s, torch.cat(pos, dim=1), torch.cat(neg, dim=1), shrinkage)
    oof_p, oof_n = scores["oof_p"], scores["oof_n"]
    n_h, n_xh, n_s = (
        s["train_harmless"].shape[1],
        s["extra_harmless"].shape[1] if extra else 0,
        s["scary_train"].shape[1],
    )
    orig_neg = torch.cat([torch.arange(n_h), torch.arange(n_h + n_xh, n_h + n_xh + n_s)])
    scary_extra = oof_n[:, n_h + n_xh + n_s :] if scary else projections(s["scary_extra"], dirs)
    return scores | {
        "common_p": oof_p[:, : s["train_harmful"].shape[1]],
        "common_n": oof_n[:, orig_neg],
        "scary_extra": scary_extra,
    }


def detector_row(views: list[dict[str, torch.Tensor]], labels: list[str]) -> dict:
    tot = standardised_sum(views)
    m = detector_metrics(tot)
    common = roc_points(
        torch.cat([tot["common_p"], tot["val_p"]]), torch.cat([tot["common_n"], tot["val_n"], tot["scary_extra"]])
    )
    return (
        {"views": labels}
        | m
        | {
            "common_tpr@3": common[0]["tpr"],
            "common_tpr@5": common[1]["tpr"],
            "common_tpr@8": common[2]["tpr"],
            "scary_extra_fpr": float((tot["scary_extra"] > m["threshold"]).float().mean()),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--shrinkage", nargs="*", type=float, default=[0.3, 0.5, 0.9], help="LDA shrinkages besides 0.7")
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    states = cached_states(
        args.states, list(prompt_sets(exclude=["extra2_harmful", "extra2_harmless", "scary_extra2"]))
    )

    runs: dict[str, dict] = {}
    grid = [(tag, BASE_SHRINKAGE) for tag in VARIANTS] + [
        (t, x) for t in VARIANTS for x in args.shrinkage if x != BASE_SHRINKAGE
    ]
    for tag, shrink in grid:
        extra, scary = VARIANTS[tag]
        views = {}
        for pool in POOLS:
            sc = pool_scores(states[pool], extra, scary, shrink)
            layer, _ = select_condition_layer(sc["val_p"], sc["val_n"], sc["oof_p"], sc["oof_n"])
            views[pool] = ({k: v[layer] for k, v in sc.items()}, f"{pool}@{layer}")
        n_train = sum(states["last"][k].shape[1] for k in ("train_harmful", "train_harmless", "scary_train"))
        n_train += sum(states["last"][k].shape[1] for k in ("extra_harmful", "extra_harmless") if extra)
        n_train += states["last"]["scary_extra"].shape[1] if scary else 0
        name = tag if shrink == BASE_SHRINKAGE else f"{tag}@{shrink}"
        for det, pools in (("last", ["last"]), ("prompt", ["prompt"]), ("both", list(POOLS))):
            runs[f"{name}:{det}"] = detector_row([views[p][0] for p in pools], [views[p][1] for p in pools]) | {
                "train_prompts": n_train,
                "shrinkage": shrink,
            }
        logging.info("%s done (%.0f s)", name, time.perf_counter() - t0)

    def choice_key(k: str) -> tuple:
        r = runs[k]
        return (round(r["common_tpr@5"], 6), -r["train_prompts"], r["shrinkage"] == BASE_SHRINKAGE)

    best = max(runs, key=choice_key)
    print("common = the same calibration pool for every variant (incl. the 200 extra scary-word negatives)")
    print("* = held-out test, information only")
    print(
        f"{'run':24s}{'views':>18s}{'val':>7s}{'oof':>7s}{'tpr@5':>7s}{'c@3':>7s}{'c@5':>7s}{'c@8':>7s}"
        f"{'c_tpr':>7s}{'c_fpr':>7s}{'sx_fpr':>7s} | {'auc*':>6s}{'tpr*':>6s}{'fpr_h*':>7s}{'fpr_s*':>7s}"
    )
    for name, r in runs.items():
        print(
            f"{name:24s}{','.join(r['views']):>18s}{r['val_auroc']:7.3f}{r['oof_auroc']:7.3f}{r['tpr@5']:7.3f}"
            f"{r['common_tpr@3']:7.3f}{r['common_tpr@5']:7.3f}{r['common_tpr@8']:7.3f}{r['calibration_tpr']:7.3f}"
            f"{r['calibration_fpr']:7.3f}{r['scary_extra_fpr']:7.3f} | {r['test_auroc_info']:6.3f}"
            f"{r['test_tpr_info']:6.3f}{r['test_fpr_harmless_info']:7.3f}{r['test_fpr_scary_info']:7.3f}"
        )
    print(f"\nchoice (common tpr@5, then fewer training prompts, then shrinkage 0.7): {best}")
    result = {
        "description": (
            "Harmful-request detectors of SmolLM2-135M-Instruct trained with or without 200 extra scary-word "
            "harmless negatives and the 240 extra pairs; compared on one fixed calibration pool (out-of-fold "
            "training + validation, the extra scary-word prompts as negatives). *_info fields read the held-out "
            "test split, information only."
        ),
        "shrinkage": BASE_SHRINKAGE,
        "counts": {k: int(v.shape[1]) for k, v in states["last"].items()},
        "choice": best,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
