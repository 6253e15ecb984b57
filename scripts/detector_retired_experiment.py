"""Do the read held-out sets, retired into training data, make the harmful-request detector generalise better?

The held-out sets ``fresh``, ``fresh2``, ``fresh3`` and ``fresh4`` (80 harmful / 80 matched harmless / 40 scary-word
harmless requests each, every one from a writer who saw no project file) have all been read by evaluations, so
none is untouched any more. Their misses are the detector's remaining gap (implied-harm requests: first-person
plans, fiction framings, business-email fraud), and they are the only data in the project written by writers
outside the training files' own process. This script asks whether adding them to the detector's training data
helps on a set of that kind it has not seen, with **leave-one-set-out**: for each of the four sets ``S``,

- ``v11``: READING_VERSION 11's detector rebuilt from its own training data (104 training + 240 extra pairs; 48 +
  200 scary-word prompts), validation pairs and rules (shrunk Fisher 0.3 per view; views ``last@21``,
  ``prompt@18`` and the request's MiniLM embedding, each standardised by its out-of-fold scores and summed;
  threshold by ``TPR - 1.5 FPR`` on out-of-fold + validation scores);
- ``retired``: the same, with the other three sets' pairs and scary-word prompts added to the training data
  (out-of-fold scores, standardisation and threshold recomputed on the larger set);
- ``retired+extra2`` (information): also the topic-broad ``extra2`` file, which READING_VERSION 9 used and 10 dropped;

each scored on ``S``: shares flagged at its own threshold (``tpr``: harmful; ``fpr_h``: matched harmless;
``fpr_s``: scary-word harmless), AUROC of harmful against both harmless kinds, and the best TPR on ``S`` within
FPR 0.05 there (``s_tpr@5``, threshold-free). Layers are fixed at version 11's (21 and 18); the encoder reads the
raw request (the guard decodes it from its tokens: equal on every training prompt checked).

**Rule, fixed before the run.** ``retired`` is adopted if, averaged over the four left-out sets, its ``tpr`` is at
least 0.02 above ``v11``'s while its mean flagged share of harmless requests (``fpr_h`` and ``fpr_s`` pooled) is
no more than 0.01 above, and its mean ``s_tpr@5`` is not lower. Adopted, the shipped detector is calibrated with
all four sets in its training data and measured on a new blind set (``fresh5``) written before that calibration.

**Outcome of the first run (written after it).** Not adopted, by a hair: ``retired`` raised the mean ``tpr`` from 0.888
to 0.934 and ``s_tpr@5`` from 0.887 to 0.928 (AUROC 0.976 to 0.981), but its pooled flagged share of harmless requests
rose from 0.0458 to 0.0563, 0.0004 (one request in 480) beyond the rule's 0.01: its threshold rule moved to a higher
calibration FPR (0.057-0.071 against 0.047). The information arm ``retired+extra2`` reached 0.913 / 0.050. The
``v11`` arm reproduces the evaluation's hook decisions on fresh4 (flagged 86.3% of harmful, 5.0% of matched harmless).

**Second look (rule written after the first run, before the second).** Every arm is also scored with the threshold
rule ``fpr<=0.05`` (the cut of the highest calibration TPR within calibration FPR 0.05, a fixed over-refusal budget
instead of a trade-off weight; runs named ``<arm> fpr<=0.05``). The candidate is the run with the highest mean ``tpr``
among those whose mean pooled flagged share is within ``v11``'s + 0.01 and whose mean ``s_tpr@5`` is not below
``v11``'s. This look is fitted to the four read sets, so the candidate only ships if it is then measured once on the
untouched ``fresh5`` set; that measurement, not this table, is the claim.

**Outcome of the second look.** The candidate is ``retired+extra2`` with the shipped threshold rule: mean ``tpr``
0.912 (``v11`` 0.888), pooled flagged harmless 0.050 (0.046), ``s_tpr@5`` 0.934 (0.887). ``retired fpr<=0.05``
(0.909 / 0.050) came second. The calibration with this training data (``scripts/calibrate_repe.py``, READING_VERSION
12) then chose other layers by its validation + out-of-fold AUROC rule (last token at 27, request mean at 16); the
same leave-one-set-out run at those layers (``--layers 27 16``, ``repe_detector_retired_layers27-16.json``; rule
fixed before it: keep the calibration's layers unless their mean ``tpr`` is lower or their pooled share exceeds
``v11``'s 0.046 + 0.01) gives ``retired+extra2`` 0.928 / 0.052 / 0.938, so the calibrated layers ship.

    OMP_NUM_THREADS=2 python scripts/detector_retired_experiment.py [--states /tmp/retired.safetensors]

About 6 minutes on 2 CPU cores (most of it reading states; ``--states`` keeps them for a rerun).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from detector_common import cached_states, standardised_sum, write_result

from safeguard.steering.calibrate import auroc, best_threshold, out_of_fold_scores, roc_points
from safeguard.steering.reading import lda_directions, projections

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_retired.json"
SHRINKAGE = 0.3
LAYERS = {"last": 21, "prompt": 18}  # READING_VERSION 11's views
BASE_POS = ["train_harmful", "extra_harmful"]
BASE_NEG = ["train_harmless", "extra_harmless", "scary_train", "scary_extra"]
EXTRA2_POS, EXTRA2_NEG = ["extra2_harmful"], ["extra2_harmless", "scary_extra2"]
# the four read held-out sets of this experiment (data.RETIRED has grown since: fresh5 joined in READING_VERSION 13)
RETIRED = ("fresh", "fresh2", "fresh3", "fresh4")
KEYS = ("tpr", "fpr_h", "fpr_s", "fpr_pooled", "auroc", "s_tpr@5")  # the metrics averaged over the left-out sets
RULES = {"tpr-1.5fpr": "", "fpr<=0.05": " fpr<=0.05"}  # threshold rules, and the suffix of their runs' names


def retired_sets(split: str) -> tuple[list[str], list[str]]:
    return [f"{split}_harmful"], [f"{split}_harmless", f"scary_{split}"]


def encoder_states(names: list[str]) -> dict[str, torch.Tensor]:
    """``{set: [1, N, 384]}``: the MiniLM sentence embeddings of each set's raw requests."""
    from detector_common import prompt_sets

    from safeguard.steering.encoder import SentenceEncoder

    enc = SentenceEncoder()
    return {k: enc.embed(v)[None] for k, v in prompt_sets(names).items()}


def view_pools(states: Path | None, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{pool: {set: [1, N, d]}}``: the sets' last-token and request-mean states at :data:`LAYERS` (read or loaded
    from the ``states`` cache) and their MiniLM embeddings (``"encoder"``)."""
    st = cached_states(states, names)
    pools = {p: {k: st[p][k][LAYERS[p] : LAYERS[p] + 1] for k in names} for p in LAYERS}
    pools["encoder"] = encoder_states(names)
    return pools


def print_means(runs: dict[str, dict[str, dict[str, float]]], width: int) -> dict[str, dict[str, float]]:
    """Print every arm's row per left-out set and its mean over them; return the means of :data:`KEYS`."""
    means = {a: {k: sum(r[k] for r in runs[a].values()) / len(runs[a]) for k in KEYS} for a in runs}
    print(f"{'arm':{width}s}{'held':8s}" + "".join(f"{k:>11s}" for k in ("thr", *KEYS)))
    for a in runs:
        for held, r in runs[a].items():
            print(f"{a:{width}s}{held:8s}{r['threshold']:11.3f}" + "".join(f"{r[k]:11.3f}" for k in KEYS))
        print(f"{a:{width}s}{'mean':8s}{'':11s}" + "".join(f"{means[a][k]:11.3f}" for k in KEYS))
    return means


def beats(c: dict[str, float], b: dict[str, float], tpr_gain: float, fpr_slack: float = 0.005) -> bool:
    """The later experiments' rule on mean metrics: ``c``'s tpr at least ``tpr_gain`` above ``b``'s, its pooled
    harmless flagged share at most ``fpr_slack`` above and its ``s_tpr@5`` not lower (1e-9 float tolerance)."""
    return (
        c["tpr"] >= b["tpr"] + tpr_gain - 1e-9
        and c["fpr_pooled"] <= b["fpr_pooled"] + fpr_slack + 1e-9
        and c["s_tpr@5"] >= b["s_tpr@5"] - 1e-9
    )


def view(states: dict[str, torch.Tensor], pos: list[str], neg: list[str], score: list[str]) -> dict[str, torch.Tensor]:
    """One view fitted on ``pos`` / ``neg`` sets: out-of-fold scores and the scores of the sets ``score``."""
    p = torch.cat([states[k] for k in pos], dim=1)
    n = torch.cat([states[k] for k in neg], dim=1)

    def fit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lda_directions(a, b, SHRINKAGE)

    oof_p, oof_n = out_of_fold_scores(p, n, fit)
    dirs = fit(p, n)
    return {"oof_p": oof_p[0], "oof_n": oof_n[0]} | {k: projections(states[k], dirs)[0] for k in score}


def detector(views: list[dict[str, torch.Tensor]], held: str, rule: str = "tpr-1.5fpr") -> dict[str, float]:
    """The standardised sum of the views, its threshold from out-of-fold + validation scores, scored on ``held``.

    ``rule``: ``"tpr-1.5fpr"`` (the shipped rule: the cut maximising ``TPR - 1.5 FPR``) or ``"fpr<=0.05"`` (the cut
    of the highest TPR whose calibration FPR stays within 0.05).
    """
    tot = standardised_sum(views)
    cal_p, cal_n = torch.cat([tot["oof_p"], tot["val_harmful"]]), torch.cat([tot["oof_n"], tot["val_harmless"]])
    if rule == "tpr-1.5fpr":
        thr, tpr, fpr = best_threshold(cal_p, cal_n, fp_weight=1.5)
    else:
        point = roc_points(cal_p, cal_n, max_fprs=(0.05,))[0]
        thr, tpr, fpr = point["threshold"], point["tpr"], point["fpr"]
    hp, hh, hs = tot[f"{held}_harmful"], tot[f"{held}_harmless"], tot[f"scary_{held}"]
    neg = torch.cat([hh, hs])
    return {
        "threshold": thr,
        "calibration_tpr": tpr,
        "calibration_fpr": fpr,
        "tpr": float((hp > thr).float().mean()),
        "fpr_h": float((hh > thr).float().mean()),
        "fpr_s": float((hs > thr).float().mean()),
        "fpr_pooled": float((neg > thr).float().mean()),
        "auroc": auroc(hp, neg),
        "s_tpr@5": roc_points(hp, neg)[1]["tpr"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    ap.add_argument("--layers", type=int, nargs=2, metavar=("LAST", "PROMPT"), default=(LAYERS["last"], LAYERS["prompt"]),
                    help="the layers of the last-token and request-mean views (default: version 11's, 21 18)")  # fmt: skip
    args = ap.parse_args()
    LAYERS.update(last=args.layers[0], prompt=args.layers[1])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    val = ["val_harmful", "val_harmless"]
    names = BASE_POS + BASE_NEG + EXTRA2_POS + EXTRA2_NEG + val
    names += [k for s in RETIRED for side in retired_sets(s) for k in side]
    pools = view_pools(args.states, names)
    arms = {"v11": ([], []), "retired": ([], []), "retired+extra2": (EXTRA2_POS, EXTRA2_NEG)}
    runs: dict[str, dict[str, dict[str, float]]] = {a + tag: {} for tag in RULES.values() for a in arms}
    for held in RETIRED:
        others = [s for s in RETIRED if s != held]
        score = val + [k for side in retired_sets(held) for k in side]
        for arm, (xp, xn) in arms.items():
            pos, neg = BASE_POS + xp, BASE_NEG + xn
            if arm != "v11":
                pos = pos + [k for s in others for k in retired_sets(s)[0]]
                neg = neg + [k for s in others for k in retired_sets(s)[1]]
            views = [view(pools[p], pos, neg, score) for p in ("last", "prompt", "encoder")]
            for rule in RULES:
                runs[arm + RULES[rule]].setdefault(held, detector(views, held, rule))
    means = print_means(runs, 26)
    b, c = means["v11"], means["retired"]
    adopt = c["tpr"] >= b["tpr"] + 0.02 and c["fpr_pooled"] <= b["fpr_pooled"] + 0.01 and c["s_tpr@5"] >= b["s_tpr@5"]
    print(f"\nadopt 'retired' by the rule: {adopt}")
    # the second look (rule written after the first run, before this one): the best mean tpr among the runs within
    # v11's pooled flagged share + 0.01 and not below its s_tpr@5
    ok = [a for a in runs if a != "v11" and means[a]["fpr_pooled"] <= b["fpr_pooled"] + 0.01 + 1e-9]
    ok = [a for a in ok if means[a]["s_tpr@5"] >= b["s_tpr@5"]]
    second = max(ok, key=lambda a: means[a]["tpr"]) if ok else None
    print(f"second look: candidate {second}")
    write_result(
        {
            "description": (
                "Leave-one-set-out over the read held-out sets fresh..fresh4: READING_VERSION 11's detector rebuilt "
                "on its own training data ('v11') against the same with the other three sets added to its training "
                "data ('retired'), each scored on the left-out set at its own calibrated threshold. Rule: adopt "
                "'retired' if its mean tpr is >= 0.02 higher, its mean pooled harmless flagged share <= 0.01 "
                "higher and its mean s_tpr@5 not lower."
            ),
            "layers": LAYERS,
            "runs": runs,
            "means": means,
            "adopt": adopt,
            "second_look_candidate": second,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
