"""With today's training data, does another classifier family beat the shipped detector's shrunk Fisher sum?

The shipped ``harmful`` detector (READING_VERSION 13) sums three standardised cosines with shrunk Fisher (LDA 0.3)
directions: the last prompt token at layer 27, the request-mean state at layer 16 and the request's MiniLM
embedding. The classifier families were last compared (``scripts/detector_readers_experiment.py``) on 104 training
pairs; the detector now trains on about seven times that (train, extra, extra2 and the read later sets), where a
classifier with more capacity may generalise better. Its gap is on the two newest sets (AUROC 0.93 on fresh6 and
fresh7 against 0.99 on the others), whose harmless sides are near-misses of their harmful ones.

Leave-one-set-out over the seven read later sets fresh ... fresh7: each arm trains on v13's training data plus the
other six sets (their training copies, less exclusions) and is scored on the whole left-out set at a threshold
chosen as the shipped calibration chooses it (the cut maximising ``TPR - 1.5 FPR`` on out-of-fold + validation
scores). Arms:

- ``lda-sum``: v13's recipe (the baseline);
- ``lda-multi``: the same sum over seven views: last token at layers 21, 24, 27, request mean at 12, 16, 20, MiniLM;
- ``logreg``: L2 logistic regression on the concatenated three views (each state unit-normalised, then each
  feature standardised on the training rows), classes weighted equally, penalty chosen among 1e-3, 1e-2, 1e-1 by
  5-fold out-of-fold AUROC on the training rows;
- ``mlp``: the same features into a one-hidden-layer network (256 ReLU units, dropout 0.3, AdamW weight decay
  1e-2, 300 full-batch steps at 1e-3, classes weighted equally), the mean logit of three seeds.

Out-of-fold scores (for the threshold) use the shipped calibration's five folds.

**Rule, fixed before the run.** A candidate arm passes if, averaged over the seven left-out sets, its ``tpr`` is at
least 0.02 above ``lda-sum``'s, its pooled harmless flagged share no more than 0.005 above and its ``s_tpr@5`` not
lower (``beats``), and averaged over fresh6 and fresh7 alone its ``tpr`` is not lower and its pooled harmless share
no more than 0.005 above. The passing arm with the highest mean ``tpr`` would become READING_VERSION 14's detector
(trained on all seven sets), measured once on fresh8; if none passes, no version is built. Nothing here reads test
or fresh8.

    OMP_NUM_THREADS=2 python scripts/detector_family_experiment.py [--states /tmp/family.safetensors]

**Outcome (written after the run).** ``mlp`` passes and is adopted (``logreg`` passes too, with a lower mean
``tpr``); ``lda-multi`` does not. Means over the seven left-out sets, ``lda-sum`` -> ``mlp``: harmful flagged 0.877
-> 0.934, matched harmless 0.068 -> 0.054, scary-word harmless 0.046 -> 0.011, pooled 0.061 -> 0.039, AUROC 0.969 ->
0.987, ``s_tpr@5`` 0.879 -> 0.936; over fresh6 and fresh7 alone: harmful 0.831 -> 0.887, pooled harmless 0.125 ->
0.071, AUROC 0.935 -> 0.971. ``logreg``: 0.911 / 0.057 / 0.978 (fresh6 + fresh7: 0.856 / 0.088 / 0.956); ``lda-multi``
0.861 / 0.060 / 0.969. READING_VERSION 14 is the ``mlp`` detector trained on all seven sets (their training copies
less the exclusions against test and fresh8). The run used an in-script copy of the head's training that
:func:`safeguard.steering.head.train_mlp_head` now replaces (same construction and seeds; scores equal within 1e-6
on a random check).

Reading the states takes about 25 minutes, and each left-out set about 10 (most of it the MLP and logistic fits) on 2 CPU cores (``--states`` keeps the states for a rerun).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from detector_common import cached_states, write_result
from detector_extra3_experiment import BASE_NEG, BASE_POS, READ, add_training_copies, left_out_sets
from detector_retired_experiment import KEYS, beats, detector, encoder_states, print_means, retired_sets, view

from safeguard.steering.calibrate import auroc
from safeguard.steering.head import class_weighted_targets, feature_standardisation, out_of_fold, train_mlp_head

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_family.json"
ALL_READ = (*READ, "fresh6", "fresh7")
NEW = ("fresh6", "fresh7")
SHIPPED_VIEWS = ("last@27", "prompt@16", "encoder")
MULTI_VIEWS = ("last@21", "last@24", "last@27", "prompt@12", "prompt@16", "prompt@20", "encoder")
PENALTIES = (1e-3, 1e-2, 1e-1)
FOLDS = 5  # the calibration's folds (row index mod 5)
Scorer = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def pools_at(states: dict[str, dict[str, torch.Tensor]], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{view: {set: [1, N, d]}}`` for every view of :data:`MULTI_VIEWS` (``pool@layer`` slices, MiniLM)."""
    out = {}
    for v in MULTI_VIEWS:
        if v == "encoder":
            continue
        pool, layer = v.split("@")
        out[v] = {k: states[pool][k][int(layer) : int(layer) + 1] for k in names}
    out["encoder"] = encoder_states(names)
    return out


def features(pools: dict[str, dict[str, torch.Tensor]], sets: list[str]) -> torch.Tensor:
    """``[N, D]``: the shipped views' unit-normalised states of ``sets`` side by side."""
    cols = []
    for v in SHIPPED_VIEWS:
        x = torch.cat([pools[v][k][0] for k in sets])
        cols.append(x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.cat(cols, dim=1)


def fit_logreg(p: torch.Tensor, n: torch.Tensor, penalty: float) -> Callable[[torch.Tensor], torch.Tensor]:
    mu, sd = feature_standardisation(torch.cat([p, n]))
    y, w = class_weighted_targets(len(p), len(n))
    x, y, w = ((torch.cat([p, n]) - mu) / sd).double(), y.double(), w.double()
    coef = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = x @ coef[:-1] + coef[-1]
        loss = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
        loss = loss + 0.5 * penalty * coef[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    c = coef.detach()
    return lambda z: (((z - mu) / sd).double() @ c[:-1] + c[-1]).float()


def logreg(p: torch.Tensor, n: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """L2 logistic regression, the penalty chosen by out-of-fold AUROC on the training rows."""
    aurocs = {}
    for lam in PENALTIES:
        op, on = out_of_fold(p, n, lambda a, b, lam=lam: fit_logreg(a, b, lam), FOLDS)
        aurocs[lam] = auroc(op, on)
    best = max(PENALTIES, key=lambda lam: aurocs[lam])
    logging.info("logreg penalty %g (out-of-fold AUROC %s)", best, {k: round(v, 4) for k, v in aurocs.items()})
    return fit_logreg(p, n, best)


def mlp(p: torch.Tensor, n: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean logit of three one-hidden-layer networks (seeds 0, 1, 2): :func:`safeguard.steering.head.train_mlp_head`."""
    return train_mlp_head(p, n)


def family_view(
    pools: dict[str, dict[str, torch.Tensor]], pos: list[str], neg: list[str], score: list[str], fit: Scorer
) -> dict[str, torch.Tensor]:
    """A classifier over the concatenated views as one "view": out-of-fold scores and scores of ``score``."""
    p, n = features(pools, pos), features(pools, neg)
    oof_p, oof_n = out_of_fold(p, n, fit, FOLDS)
    f = fit(p, n)
    return {"oof_p": oof_p, "oof_n": oof_n} | {k: f(features(pools, [k])) for k in score}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    read_names = [k for s in ALL_READ for side in retired_sets(s) for k in side]
    names = BASE_POS + BASE_NEG + ["val_harmful", "val_harmless"] + read_names
    pools = pools_at(cached_states(args.states, names), names)
    add_training_copies(pools, read_names, ALL_READ)
    runs: dict[str, dict[str, dict[str, float]]] = {a: {} for a in ("lda-sum", "lda-multi", "logreg", "mlp")}
    for held in ALL_READ:
        score, pos, neg = left_out_sets(held, read=ALL_READ)
        runs["lda-sum"][held] = detector([view(pools[v], pos, neg, score) for v in SHIPPED_VIEWS], held)
        runs["lda-multi"][held] = detector([view(pools[v], pos, neg, score) for v in MULTI_VIEWS], held)
        runs["logreg"][held] = detector([family_view(pools, pos, neg, score, logreg)], held)
        runs["mlp"][held] = detector([family_view(pools, pos, neg, score, mlp)], held)
        logging.info(
            "%s left out (%.0f s): %s",
            held,
            time.perf_counter() - t0,
            {a: (round(r[held]["tpr"], 3), round(r[held]["fpr_pooled"], 3)) for a, r in runs.items()},
        )
    means = print_means(runs, 11)
    new_means = {a: {k: sum(runs[a][s][k] for s in NEW) / len(NEW) for k in KEYS} for a in runs}
    b, bn = means["lda-sum"], new_means["lda-sum"]
    passing = [
        a
        for a in runs
        if a != "lda-sum"
        and beats(means[a], b, tpr_gain=0.02)
        and new_means[a]["tpr"] >= bn["tpr"] - 1e-9
        and new_means[a]["fpr_pooled"] <= bn["fpr_pooled"] + 0.005 + 1e-9
    ]
    adopt = max(passing, key=lambda a: means[a]["tpr"]) if passing else None
    print("\nmeans over fresh6 and fresh7:")
    for a, m in new_means.items():
        print(f"  {a:11s}" + "".join(f" {k} {m[k]:.3f}" for k in KEYS))
    print(f"\npassing the rule: {passing}; adopt: {adopt}")
    write_result(
        {
            "description": (
                "Leave-one-set-out over fresh..fresh7: READING_VERSION 13's detector recipe ('lda-sum') against "
                "the same LDA sum over seven views ('lda-multi'), L2 logistic regression ('logreg') and a small MLP "
                "('mlp') on the concatenated three views, each trained on v13's data plus the other six read sets "
                "and scored on the left-out set at its own calibrated threshold. Rule: a candidate passes if its "
                "mean tpr is >= 0.02 higher, its mean pooled harmless flagged share <= 0.005 higher and its mean "
                "s_tpr@5 not lower, and over fresh6 and fresh7 its mean tpr not lower and its pooled harmless "
                "share <= 0.005 higher; the best passing one would become READING_VERSION 14's detector."
            ),
            "runs": runs,
            "means": means,
            "means_fresh6_fresh7": new_means,
            "passing": passing,
            "adopt": adopt,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
