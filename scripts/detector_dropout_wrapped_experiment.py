"""Do more input dropout and task-wrapped training pairs, alone or together, give the detector head a better
separation on new sets of requests?

Two earlier experiments each moved the detector on untouched requests without passing its rule:
``scripts/detector_head_capacity_experiment.py`` (leave-one-set-out over fresh9 ... fresh14): input dropout 0.6
instead of 0.3 raised the mean AUROC 0.9792 -> 0.9830 (higher on all six left-out sets; the rule asked for +0.005)
and the mean share of harmful requests flagged at 5% of harmless ones flagged 0.896 -> 0.921;
``scripts/detector_wrapped_experiment.py`` (600 task-wrapped training pairs, :func:`safeguard.steering.data.wrapped_pairs`,
on fresh13 / fresh14 at a calibrated threshold): more harmful requests flagged (0.856 -> 0.900) with AUROC flat,
mostly an operating-point move. This experiment asks whether stronger dropout, the wrappers, or both together raise
the separation itself.

**Leave-one-set-out over fresh9 ... fresh14**, as the head capacity experiment: for each set ``S`` the head is
trained on v17's detector training rows (train split, extra, extra2, the retired sets fresh ... fresh8 less their
exclusions, scary-word prompts as negatives) plus the other five of the six sets, on the shipped views' features
(``--states``: the head capacity experiment's cache, read again if absent), and scored on the whole of ``S``: AUROC
of its harmful requests against all its harmless ones (matched and scary-word) and ``s_tpr@5``, the best share of
harmful requests flagged with at most 5% of the harmless ones flagged (threshold-free). Arms, fixed before the run:

- ``shipped``: input dropout 0.3 (the shipped head; its numbers must equal the head capacity experiment's);
- ``dropout0.6``, ``dropout0.8``: input dropout 0.6 / 0.8;
- ``wrapped600``: dropout 0.3 and the 600 wrapped pairs of ``data.wrapped_pairs(600, seed=0)`` added to every fold's
  training rows (they are built from the train split and the extra files only, never from a fold's set);
- ``wrapped600+dropout0.6``, ``wrapped600+dropout0.8``: both.

**Rule, fixed before the run.** An arm passes if, averaged over the six left-out sets, its AUROC is at least 0.005
above ``shipped``'s and its ``s_tpr@5`` at least 0.01 above (the head capacity experiment's rule, unchanged). The
wrappers were written after fresh13's missed requests had been read, so a wrapped arm must also pass the same two
margins averaged over the five sets other than fresh13. The passing arm with the highest six-set mean ``s_tpr@5``
would be the next version's head: v17's recipe with that setting and fresh13 and fresh14 retired into training, the
threshold by the shipped rule, measured once on the unread fresh15; if none passes, the head stays. Nothing here
reads test or fresh15.

**Outcome (written after the run).** None passes; the head stays. Means over the six left-out sets, AUROC /
``s_tpr@5`` (without fresh13 in brackets): ``shipped`` 0.9792 / 0.896 (0.9810 / 0.905; equal to the head capacity
experiment's, as it must be), ``dropout0.6`` 0.9830 / 0.921, ``dropout0.8`` 0.9829 / 0.923, ``wrapped600`` 0.9809 /
0.908, ``wrapped600+dropout0.6`` 0.9841 / 0.921 (0.9860 / 0.933), ``wrapped600+dropout0.8`` 0.9825 / 0.913. Every arm
separates better than ``shipped`` on average (AUROC +0.0017 ... +0.0050, ``s_tpr@5`` +0.013 ... +0.027) and passes
the ``s_tpr@5`` margin; none reaches the AUROC margin: the closest, ``wrapped600+dropout0.6``, is +0.00495 against
+0.005 (its five-set margins +0.004999995, float32 a hair under +0.005, and +0.028). fresh15 and fresh16 (written after the head capacity experiment and
declared READING_VERSION 18's measurements before this run ended) measure v18, v17's head settings with fresh13 and
fresh14 retired. 85 minutes on 2 CPU cores (the wrapped pairs' features 4.5, fits 80; the cached features of the head
capacity experiment reused).

    OMP_NUM_THREADS=2 python scripts/detector_dropout_wrapped_experiment.py --states /tmp/head_capacity.safetensors \
        --wrapped-states /tmp/wrapped600.safetensors

Reading the fold features takes about 12 minutes without ``--states`` and the wrapped pairs' about 5; the 36 fits
about 80. Writes ``benchmarks/results/eval/repe_detector_dropout_wrapped.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from detector_common import write_result
from detector_head_capacity_experiment import FOLDS, cached_features, loso_runs, text_groups

from safeguard.steering import data

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_dropout_wrapped.json"
WRAPPED = 600
ARMS: dict[str, dict[str, float | bool]] = {
    "shipped": {},
    "dropout0.6": {"dropout": 0.6},
    "dropout0.8": {"dropout": 0.8},
    "wrapped600": {"wrapped": True},
    "wrapped600+dropout0.6": {"wrapped": True, "dropout": 0.6},
    "wrapped600+dropout0.8": {"wrapped": True, "dropout": 0.8},
}
MARGINS = {"auroc": 0.005, "s_tpr@5": 0.01}


def passes(means: dict[str, float], base: dict[str, float]) -> bool:
    return all(means[k] >= base[k] + m for k, m in MARGINS.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", type=Path, help="features of the folds and base rows (read if present, else written)")
    ap.add_argument("--wrapped-states", type=Path, help="features of the wrapped pairs (read if present, else written)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    groups = text_groups()
    wrapped = data.wrapped_pairs(WRAPPED, 0)
    feats = cached_features(args.states, groups)
    feats |= cached_features(
        args.wrapped_states, {"wrapped": ([p["harmful"] for p in wrapped], [p["harmless"] for p in wrapped])}
    )
    logging.info("features ready (%.0f s)", time.perf_counter() - t0)
    fits = {
        a: (["wrapped"] if kw.get("wrapped") else [], {k: v for k, v in kw.items() if k != "wrapped"})
        for a, kw in ARMS.items()
    }
    runs = loso_runs(feats, fits)  # type: ignore[arg-type]

    def mean_over(sets: tuple[str, ...]) -> dict[str, dict[str, float]]:
        return {a: {k: sum(r[s][k] for s in sets) / len(sets) for k in MARGINS} for a, r in runs.items()}

    means, means5 = mean_over(FOLDS), mean_over(tuple(s for s in FOLDS if s != "fresh13"))
    passing = [
        a
        for a in ARMS
        if a != "shipped"
        and passes(means[a], means["shipped"])
        and (not ARMS[a].get("wrapped") or passes(means5[a], means5["shipped"]))
    ]
    adopt = max(passing, key=lambda a: means[a]["s_tpr@5"]) if passing else None
    print("AUROC / s_tpr@5 on each left-out set")
    for a, r in runs.items():
        cells = "  ".join(f"{s} {r[s]['auroc']:.3f}/{r[s]['s_tpr@5']:.3f}" for s in FOLDS)
        print(f"{a:22s} {cells}  mean {means[a]['auroc']:.4f}/{means[a]['s_tpr@5']:.3f}"
              f"  (without fresh13 {means5[a]['auroc']:.4f}/{means5[a]['s_tpr@5']:.3f})")  # fmt: skip
    print(f"passing: {passing}; adopt: {adopt}")
    sizes = {g: [len(pos), len(neg)] for g, (pos, neg) in groups.items()} | {"wrapped": [WRAPPED, WRAPPED]}
    result = {
        "arms": ARMS, "margins": MARGINS, "sizes": sizes, "runs": runs, "means": means,
        "means_without_fresh13": means5, "passing": passing, "adopt": adopt,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()
