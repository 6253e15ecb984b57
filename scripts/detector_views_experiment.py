"""Would more views (layers) or more training data make the RepE harmful-request detector better?

(Run against the detector shipped up to READING_VERSION 7; the one shipped since is the choice of
``detector_negatives_experiment.py``.) The shipped ``harmful`` guard steers a row when its detector score
exceeds a threshold. The shipped detector ``"both"`` sums two standardised cosines (:mod:`safeguard.steering.detector`): the last prompt
token's state at one layer and the mean over the request's tokens at another, each against a shrunk
Fisher (LDA) direction read on the training split. Its calibration ROC tops out near TPR 0.91 at
FPR 0.05, short of what a 90% refusal rate needs once some flagged replies fail to refuse.

This script reads every state once (both pools, every layer) and compares, with the calibration's
own rules (out-of-fold training scores, 5 folds, + validation scores; threshold maximising
``TPR - 1.5 FPR``):

- ``both``: the shipped form, the best layer of each pool by validation + out-of-fold AUROC;
- ``top-k``: the ``k`` best layers of each pool (same ranking), all standardised and summed;
- each of these with the 104 original training pairs and with the 240 extra training pairs added.

Choice metric (calibration data only): the best TPR within FPR 0.05 on out-of-fold + validation scores
(``tpr@5``), then val + out-of-fold AUROC. Test numbers (72 harmful vs 72 matched harmless + 52
scary-word harmless, threshold by the rule above) are for information only and choose nothing.

    OMP_NUM_THREADS=2 python scripts/detector_views_experiment.py [--out benchmarks/results/eval/repe_detector_views.json]

About 5 minutes on 2 CPU cores (``--states`` keeps the read states for a rerun).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from detector_common import (
    POOLS,
    detector_metrics,
    lda_scores,
    load_states,
    prompt_sets,
    read_pools,
    save_states,
    standardised_sum,
    write_result,
)

from safeguard.adapters import CausalLMAdapter
from safeguard.models import smollm2
from safeguard.steering.calibrate import auroc

LDA_SHRINKAGE = 0.7  # the detector shipped when this experiment ran (READING_VERSION 7)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_views.json"


def pool_scores(s: dict[str, torch.Tensor], extra: bool, shrinkage: float) -> dict[str, torch.Tensor]:
    """Per-layer cosine scores ``[L, N]`` of one pool: out-of-fold training, validation and test."""
    pos = [s["train_harmful"]] + ([s["extra_harmful"]] if extra else [])
    neg = [s["train_harmless"]] + ([s["extra_harmless"]] if extra else []) + [s["scary_train"]]
    return lda_scores(s, torch.cat(pos, dim=1), torch.cat(neg, dim=1), shrinkage)[0]


def ranking(sc: dict[str, torch.Tensor]) -> list[int]:
    """Layers by validation + out-of-fold AUROC, best first (calibrate.select_condition_layer's rule)."""
    L = sc["oof_p"].shape[0]
    key = {i: auroc(sc["val_p"][i], sc["val_n"][i]) + auroc(sc["oof_p"][i], sc["oof_n"][i]) for i in range(L)}
    return sorted(range(L), key=lambda i: -key[i])


def combine(scores: dict[str, dict[str, torch.Tensor]], views: list[tuple[str, int]]) -> dict:
    """The views' standardised cosines summed; calibration and (info) test metrics."""
    tot = standardised_sum([{k: v[layer] for k, v in scores[pool].items()} for pool, layer in views])
    return {"views": [{"pool": p, "layer": int(i)} for p, i in views]} | detector_metrics(tot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    states = load_states(args.states) if args.states and args.states.exists() else None
    if states is None:
        model, tok = smollm2()
        states = read_pools(CausalLMAdapter(model, tok), prompt_sets(exclude=["scary_extra"]))
        logging.info("read states in %.0f s", time.perf_counter() - t0)
        if args.states:
            save_states(states, args.states)

    runs: dict[str, dict] = {}
    for extra in (False, True):
        scores = {p: pool_scores(states[p], extra, LDA_SHRINKAGE) for p in POOLS}
        ranks = {p: ranking(scores[p]) for p in POOLS}
        tag = "old+extra" if extra else "old"
        for k in args.ks:
            for pools in (("last",), ("prompt",), POOLS):
                views = [(p, i) for p in pools for i in ranks[p][:k]]
                name = f"{tag}:{'+'.join(pools)}:top{k}"
                runs[name] = combine(scores, views) | {"extra": extra, "k": k, "pools": list(pools)}

    def choice_key(name: str) -> tuple:
        r = runs[name]
        return (round(r["tpr@5"], 6), r["val_auroc"] + r["oof_auroc"], -len(r["views"]))

    best = max(runs, key=choice_key)
    print("* = held-out test, information only")
    print(
        f"{'run':28s}{'views':>6s}{'val':>7s}{'oof':>7s}{'tpr@3':>7s}{'tpr@5':>7s}{'tpr@8':>7s}{'c_tpr':>7s}"
        f"{'c_fpr':>7s} | {'auc*':>6s}{'tpr*':>6s}{'fpr_h*':>7s}{'fpr_s*':>7s}"
    )
    for name, r in runs.items():
        print(
            f"{name:28s}{len(r['views']):6d}{r['val_auroc']:7.3f}{r['oof_auroc']:7.3f}{r['tpr@3']:7.3f}"
            f"{r['tpr@5']:7.3f}{r['tpr@8']:7.3f}{r['calibration_tpr']:7.3f}{r['calibration_fpr']:7.3f} | "
            f"{r['test_auroc_info']:6.3f}{r['test_tpr_info']:6.3f}{r['test_fpr_harmless_info']:7.3f}"
            f"{r['test_fpr_scary_info']:7.3f}"
        )
    print(f"\nchoice (tpr@5, then val+oof AUROC, then fewer views): {best}")
    result = {
        "description": (
            "Harmful-request detectors of SmolLM2-135M-Instruct with more views (the k best layers of each pool, "
            "standardised cosines summed) and with or without the 240 extra training pairs. Choice on out-of-fold "
            "training + validation scores only; *_info fields read the held-out test split, information only."
        ),
        "shrinkage": LDA_SHRINKAGE,
        "counts": {k: int(v.shape[1]) for k, v in states["last"].items()},
        "choice": best,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(result, Path(args.out))


if __name__ == "__main__":
    main()
