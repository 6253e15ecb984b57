"""Does topic-broad training data (``*_extra2.json``) make the RepE harmful-request detector generalise better?

The READING_VERSION 8 detector (``"both"``: last token + request mean, LDA 0.3, trained on the original training
split, the 240 extra pairs and 248 scary-word negatives) reached calibration TPR 0.889 and caught 95.8% of the test
split's harmful requests but only 88.7% of the later fresh set's, whose topics the training data lacks. This script
asks whether 280 more pairs written for topic breadth (15-35 subtopics a category) and 132 more scary-word negatives
(``harmful_harmless_pairs_extra2.json``, ``harmless_scary_words_extra2.json``) close that gap, using calibration
data only.

Variants (the training data of both pools' directions; everything else as ``safeguard.steering.build``):

- ``v8``: the shipped data;
- ``v8+pairs2``: + the 280 topic-broad pairs;
- ``v8+pairs2+scary2``: + those pairs and the 132 scary-word prompts as negatives.

Each at LDA shrinkage 0.3 (shipped), 0.1 and 0.5 (``--shrinkage``). Each picks each pool's layer by validation +
out-of-fold AUROC on its own data and forms the ``last``, ``prompt`` and ``both`` detectors (calibrate.py's rules).

Fixed in advance, the comparison pool is the same for all: every training prompt of every variant (original, extra,
extra2 pairs; all scary-word negatives) plus validation. A variant's scores of prompts it trains on are out-of-fold
(5 folds); of prompts it does not train on, plain projections (out of sample). **Choice:** the highest TPR within
FPR 0.05 on that pool (``common_tpr@5``), then the fewest training prompts, then shrinkage 0.3. Reported with it:

- ``new_topic_tpr`` / ``new_topic_fpr``: for variants that do not train on extra2, the share of its harmful
  requests above the variant's own threshold (``TPR - 1.5 FPR`` on its own calibration) and of its harmless and
  scary-word prompts above it: how the detector meets topics it was not trained on, a calibration-side stand-in
  for the fresh set's gap;
- ``loco_tpr@5``: leave-one-category-out (train on seven harm categories, score the eighth, harmless and scary
  negatives split by fold as usual), the pooled TPR within FPR 0.05: transfer to an unseen category;
- held-out test numbers (``*_info``), information only; they choose nothing.

**Outcome (written after the run, and after the choice had been shipped and evaluated).** The rule chose
``v8+pairs2:prompt`` (0.863, against 0.861 for the runner-up and 0.838 for ``v8:both``) and it shipped as
READING_VERSION 9. It was the wrong choice, and the rule was flawed in a way visible beforehand: the common pool
scores the extra2 prompts out of fold for variants that train on them (topics they have seen) but out of sample
for ``v8`` (topics it has not), so it rewards training on the pool rather than generalising. The column meant to
measure transfer, ``loco_tpr@5``, ranked the other way (``v8:both`` 0.759, ``v8+pairs2+scary2:both`` 0.715,
``v8+pairs2:prompt`` 0.620), and the held-out sets agreed: flagged test-split requests fell from 95.8% to 87.5%
(refused 90.3% -> 83.3%) and fresh2 gave 87.5%. READING_VERSION 10 therefore ships the ``v8`` detector again (with
the release ablation). That reversal was made after reading the test split and fresh2 with version 9, so their
numbers for version 10 are not untouched. Lesson for the next data experiment: choose by a grouped (leave-topic-
or category-out) criterion, since new topics are what the held-out sets test.

    OMP_NUM_THREADS=2 python scripts/detector_breadth_experiment.py [--states /tmp/breadth.safetensors]

About 8 minutes on 2 CPU cores (``--states`` keeps the read states for a rerun).
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
    standardised_sum,
    write_result,
)

from safeguard.steering import data
from safeguard.steering.calibrate import roc_points, select_condition_layer
from safeguard.steering.reading import lda_directions, projections

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_breadth.json"
BASE_SHRINKAGE = 0.3  # the shipped detector's (READING_VERSION 8)
POS_SETS = ("train_harmful", "extra_harmful", "extra2_harmful")
NEG_SETS = ("train_harmless", "extra_harmless", "extra2_harmless", "scary_train", "scary_extra", "scary_extra2")
VARIANTS = {  # the sets each variant trains on
    "v8": ("train_harmful", "extra_harmful", "train_harmless", "extra_harmless", "scary_train", "scary_extra"),
    "v8+pairs2": (*POS_SETS, "train_harmless", "extra_harmless", "extra2_harmless", "scary_train", "scary_extra"),
    "v8+pairs2+scary2": POS_SETS + NEG_SETS,
}


def _category_labels() -> dict[str, list[str]]:
    """The harm category of each item of the pair sets (the scary-word sets have their own topics, not harms)."""
    return {
        "train_harmful": [p["category"] for p in data.harmful_pairs("train")],
        "extra_harmful": [p["category"] for p in data.extra_pairs()],
        "extra2_harmful": [p["category"] for p in data.extra_pairs("extra2")],
    } | {
        "train_harmless": [p["category"] for p in data.harmful_pairs("train")],
        "extra_harmless": [p["category"] for p in data.extra_pairs()],
        "extra2_harmless": [p["category"] for p in data.extra_pairs("extra2")],
    }


def pool_scores(s: dict[str, torch.Tensor], trained: tuple[str, ...], shrinkage: float) -> dict[str, torch.Tensor]:
    """Per-layer cosine scores ``[L, N]`` of one pool under one variant.

    Adds to :func:`lda_scores`'s keys ``common_p`` / ``common_n`` (every set of ``POS_SETS`` / ``NEG_SETS`` in
    order, out-of-fold where trained on, else projected) and ``new_p`` / ``new_n`` (the extra2 sets, projected,
    only when the variant does not train on them).
    """
    pos_names = [k for k in POS_SETS if k in trained]
    neg_names = [k for k in NEG_SETS if k in trained]
    scores, dirs = lda_scores(
        s, torch.cat([s[k] for k in pos_names], dim=1), torch.cat([s[k] for k in neg_names], dim=1), shrinkage
    )

    def gather(names: tuple[str, ...], oof: torch.Tensor, used: list[str]) -> torch.Tensor:
        offsets, at = {}, 0
        for k in used:
            offsets[k], at = at, at + s[k].shape[1]
        parts = [
            oof[:, offsets[k] : offsets[k] + s[k].shape[1]] if k in offsets else projections(s[k], dirs) for k in names
        ]
        return torch.cat(parts, dim=1)

    out = scores | {
        "common_p": gather(POS_SETS, scores["oof_p"], pos_names),
        "common_n": gather(NEG_SETS, scores["oof_n"], neg_names),
    }
    if "extra2_harmful" not in trained:
        out["new_p"] = projections(s["extra2_harmful"], dirs)
        out["new_n"] = projections(torch.cat([s["extra2_harmless"], s["scary_extra2"]], dim=1), dirs)
    return out


def loco_scores(
    s: dict[str, torch.Tensor], trained: tuple[str, ...], shrinkage: float, layer: int, cats: dict[str, list[str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-category-out scores at ``layer``: each harm category's pairs scored by a direction fitted without
    that category; scary-word negatives (no harm category) by 8 folds of their own, one left out with each category."""
    pos_names = [k for k in POS_SETS if k in trained]
    neg_names = [k for k in NEG_SETS if k in trained]
    lab_p = [c for k in pos_names for c in cats[k]]
    lab_n = [cats.get(k, [None] * s[k].shape[1]) for k in neg_names]
    lab_n = [c for part in lab_n for c in part]
    pos = torch.cat([s[k][layer : layer + 1] for k in pos_names], dim=1)
    neg = torch.cat([s[k][layer : layer + 1] for k in neg_names], dim=1)
    categories = sorted(set(lab_p))
    scary_idx = [i for i, c in enumerate(lab_n) if c is None]
    fold_of_scary = {i: j % len(categories) for j, i in enumerate(scary_idx)}
    out_p, out_n = torch.zeros(pos.shape[1]), torch.zeros(neg.shape[1])
    for f, cat in enumerate(categories):
        tp = torch.tensor([c == cat for c in lab_p])
        tn = torch.tensor([c == cat or (c is None and fold_of_scary[i] == f) for i, c in enumerate(lab_n)])
        d = lda_directions(pos[:, ~tp], neg[:, ~tn], shrinkage)
        out_p[tp] = projections(pos[:, tp], d)[0]
        out_n[tn] = projections(neg[:, tn], d)[0]
    return out_p, out_n


def detector_row(views: list[dict[str, torch.Tensor]], labels: list[str]) -> dict:
    tot = standardised_sum(views)
    m = detector_metrics(tot)
    common = roc_points(torch.cat([tot["common_p"], tot["val_p"]]), torch.cat([tot["common_n"], tot["val_n"]]))
    row = {"views": labels} | m | {f"common_tpr@{b}": common[i]["tpr"] for i, b in enumerate((3, 5, 8))}
    if "new_p" in tot:
        row["new_topic_tpr"] = float((tot["new_p"] > m["threshold"]).float().mean())
        row["new_topic_fpr"] = float((tot["new_n"] > m["threshold"]).float().mean())
    if "loco_p" in tot:
        row["loco_tpr@5"] = roc_points(tot["loco_p"], tot["loco_n"])[1]["tpr"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--shrinkage", nargs="*", type=float, default=[0.1, 0.5], help="LDA shrinkages besides 0.3")
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    states = cached_states(args.states)

    cats = _category_labels()
    runs: dict[str, dict] = {}
    grid = [(tag, BASE_SHRINKAGE) for tag in VARIANTS] + [
        (t, x) for t in VARIANTS for x in args.shrinkage if x != BASE_SHRINKAGE
    ]
    for tag, shrink in grid:
        trained = VARIANTS[tag]
        views = {}
        for pool in POOLS:
            sc = pool_scores(states[pool], trained, shrink)
            layer, _ = select_condition_layer(sc["val_p"], sc["val_n"], sc["oof_p"], sc["oof_n"])
            v = {k: t[layer] for k, t in sc.items()}
            v["loco_p"], v["loco_n"] = loco_scores(states[pool], trained, shrink, layer, cats)
            views[pool] = (v, f"{pool}@{layer}")
        n_train = sum(states["last"][k].shape[1] for k in trained)
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
    print("common = one calibration pool for every variant (all training prompts of all variants + validation)")
    print("new = extra2 prompts, out of sample, at the variant's own threshold; * = held-out test, information only")
    print(
        f"{'run':28s}{'views':>16s}{'val':>7s}{'oof':>7s}{'c@3':>7s}{'c@5':>7s}{'c@8':>7s}{'loco5':>7s}"
        f"{'c_tpr':>7s}{'c_fpr':>7s}{'new_t':>7s}{'new_f':>7s} | {'auc*':>6s}{'tpr*':>6s}{'fpr_h*':>7s}{'fpr_s*':>7s}"
    )
    for name, r in runs.items():
        nt = f"{r['new_topic_tpr']:7.3f}{r['new_topic_fpr']:7.3f}" if "new_topic_tpr" in r else f"{'-':>7s}{'-':>7s}"
        print(
            f"{name:28s}{','.join(r['views']):>16s}{r['val_auroc']:7.3f}{r['oof_auroc']:7.3f}"
            f"{r['common_tpr@3']:7.3f}{r['common_tpr@5']:7.3f}{r['common_tpr@8']:7.3f}{r['loco_tpr@5']:7.3f}"
            f"{r['calibration_tpr']:7.3f}{r['calibration_fpr']:7.3f}{nt} | {r['test_auroc_info']:6.3f}"
            f"{r['test_tpr_info']:6.3f}{r['test_fpr_harmless_info']:7.3f}{r['test_fpr_scary_info']:7.3f}"
        )
    print(f"\nchoice (common tpr@5, then fewer training prompts, then shrinkage 0.3): {best}")
    result = {
        "description": (
            "Harmful-request detectors of SmolLM2-135M-Instruct trained with or without the topic-broad extra2 pairs "
            "and scary-word prompts; compared on one fixed calibration pool (every variant's training prompts, "
            "out-of-fold where trained on, plus validation). new_topic_* read extra2 out of sample; loco_tpr@5 is "
            "leave-one-category-out. *_info fields read the held-out test split, information only."
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
