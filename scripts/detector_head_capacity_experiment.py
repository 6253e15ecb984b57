"""Does a less fitted detector head generalise better to new sets of requests?

Every version since READING_VERSION 14 separates its training sets completely, with a wide empty band of head
logits around the threshold, while its untouched sets overlap across it (``benchmarks/results/eval/
repe_v17/repe_detector_heldout.png``: v17's AUROC is 1.000 on every retired set, 0.969 / 0.972 on fresh13 / fresh14). The head
(:func:`safeguard.steering.head.train_mlp_head`: three one-hidden-layer networks of 256 units, input dropout 0.3,
AdamW 1e-3 with weight decay 1e-2, 300 full-batch steps) may fit its training rows more than the task needs.

**Leave-one-set-out over the six newest read sets** fresh9 ... fresh14: for each set ``S``, the head is trained on
v17's detector training rows (train split, extra, extra2 and the retired sets fresh ... fresh12 less their
exclusions, their scary-word prompts as negatives) plus fresh13 and fresh14, all less ``S``, on the shipped views'
states (last token at layer 27, request mean at layer 14, MiniLM; :func:`safeguard.steering.head.head_features`), and
scored on the whole of ``S``: AUROC of its harmful requests against all its harmless ones (matched and scary-word)
and ``s_tpr@5``, the best share of harmful requests flagged with at most 5% of the harmless ones flagged
(threshold-free, so no threshold rule enters). Arms, fixed before the run:

- ``shipped``: the shipped settings;
- ``steps100`` and ``steps50``: the same, stopped after 100 / 50 steps;
- ``dropout0.6``: input dropout 0.6.

**Rule, fixed before the run.** An arm passes if, averaged over the six left-out sets, its AUROC is at least 0.005
above ``shipped``'s and its ``s_tpr@5`` at least 0.01 above. The passing arm with the highest mean ``s_tpr@5`` would
be the next version's head (v17's recipe with fresh13 and fresh14 retired, the threshold by the shipped rule),
measured once on the unread fresh15; if none passes, the head stays. Nothing here reads test or fresh15. fresh13
and fresh14 were read by v17's measurements and by two experiments (information there); here they are two of the
six folds.

**Outcome (written after the run).** None passes; the head stays. Means over the six left-out sets, AUROC /
``s_tpr@5``: ``shipped`` 0.9792 / 0.896, ``steps100`` 0.9776 / 0.877, ``steps50`` 0.9749 / 0.867, ``dropout0.6``
0.9830 / 0.921. Stopping early is worse on both. ``dropout0.6`` has the higher AUROC on all six sets (+0.0038 on
average, the rule asked for +0.005) and passes the ``s_tpr@5`` half (+0.025): a direction for a next experiment with
its own rule, not a choice made here. 40 minutes on 2 CPU cores (features 12, fits 28).

    OMP_NUM_THREADS=2 python scripts/detector_head_capacity_experiment.py [--states /tmp/head_capacity.safetensors]

Reading the states takes about 12 minutes on 2 CPU cores (``--states`` keeps them), the fits about 28. Writes
``benchmarks/results/eval/repe_detector_head_capacity.json``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path

import torch
from detector_common import write_result
from detector_heldout_scores import VECTORS, view_states
from safetensors.torch import load_file, save_file

from safeguard.adapters import CausalLMAdapter
from safeguard.steering import data
from safeguard.steering.calibrate import auroc, roc_points
from safeguard.steering.detector import resolve_detector
from safeguard.steering.head import head_features, train_mlp_head
from safeguard.steering.vectors import SteeringVectors

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_head_capacity.json"
FOLDS = ("fresh9", "fresh10", "fresh11", "fresh12", "fresh13", "fresh14")
ARMS: dict[str, dict[str, float]] = {
    "shipped": {},
    "steps100": {"steps": 100},
    "steps50": {"steps": 50},
    "dropout0.6": {"dropout": 0.6},
}


def text_groups() -> dict[str, tuple[list[str], list[str]]]:
    """``{group: (harmful, harmless)}``: ``base`` (always trained on) and each fold's set (scored whole)."""
    pos = [p["harmful"] for p in data.harmful_pairs("train")]
    neg = [p["harmless"] for p in data.harmful_pairs("train")] + [p["prompt"] for p in data.scary_harmless("train")]
    for which in ("extra", "extra2", *(s for s in data.RETIRED if s not in FOLDS)):
        pairs = data.extra_pairs(which)
        pos += [p["harmful"] for p in pairs]
        neg += [p["harmless"] for p in pairs] + [p["prompt"] for p in data.extra_scary_harmless(which)]
    groups = {"base": (pos, neg)}
    for s in FOLDS:  # whole sets (none of fresh9 ... fresh14 has an exclusion)
        pairs = data.harmful_pairs(s)
        groups[s] = (
            [p["harmful"] for p in pairs],
            [p["harmless"] for p in pairs] + [p["prompt"] for p in data.scary_harmless(s)],
        )
    return groups


def features(adapter: CausalLMAdapter, views, texts: list[str]) -> torch.Tensor:
    states = view_states(adapter, views, texts)
    return head_features([states[(v.set, v.layer, v.pool)] for v in views])


@functools.cache
def adapter_and_views() -> tuple[CausalLMAdapter, list]:
    """SmolLM2 and the shipped detector's views, loaded once, only when features have to be read."""
    from safeguard.models import smollm2

    model, tok = smollm2()
    return CausalLMAdapter(model, tok), resolve_detector(SteeringVectors.load(VECTORS)).views


def cached_features(path: Path | None, groups: dict[str, tuple[list[str], list[str]]]) -> dict[str, torch.Tensor]:
    """``{"<group>.pos" / "<group>.neg": features}``, read from ``path`` if it exists, else computed (and saved)."""
    if path and path.exists():
        return load_file(str(path))
    adapter, views = adapter_and_views()
    feats: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for g, (pos, neg) in groups.items():
        feats[f"{g}.pos"], feats[f"{g}.neg"] = features(adapter, views, pos), features(adapter, views, neg)
        logging.info("%s: %d + %d features (%.0f s)", g, len(pos), len(neg), time.perf_counter() - t0)
    if path:
        save_file({k: v.contiguous() for k, v in feats.items()}, str(path))
    return feats


def loso_runs(
    feats: dict[str, torch.Tensor], fits: dict[str, tuple[list[str], dict[str, float]]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{arm: {left-out set: {"auroc", "s_tpr@5"}}}``: for each fold, each arm's head trained on ``base``, the other
    folds and the arm's extra feature groups (``fits[arm] = (extra groups, train_mlp_head keywords)``)."""
    t0 = time.perf_counter()
    runs: dict[str, dict[str, dict[str, float]]] = {a: {} for a in fits}
    for held in FOLDS:
        train = ["base", *(s for s in FOLDS if s != held)]
        for arm, (extra, kw) in fits.items():
            p = torch.cat([feats[f"{g}.pos"] for g in train + extra])
            n = torch.cat([feats[f"{g}.neg"] for g in train + extra])
            head = train_mlp_head(p, n, **kw)  # type: ignore[arg-type]
            sp, sn = head(feats[f"{held}.pos"]), head(feats[f"{held}.neg"])
            runs[arm][held] = {"auroc": auroc(sp, sn), "s_tpr@5": roc_points(sp, sn, (0.05,))[0]["tpr"]}
        logging.info(
            "%s left out (%.0f s): %s", held, time.perf_counter() - t0,
            {a: (round(r[held]["auroc"], 4), round(r[held]["s_tpr@5"], 3)) for a, r in runs.items()},
        )  # fmt: skip
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", type=Path, help="safetensors file of the features (read if present, else written)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    groups = text_groups()
    feats = cached_features(args.states, groups)
    runs = loso_runs(feats, {a: ([], kw) for a, kw in ARMS.items()})
    means = {a: {k: sum(r[s][k] for s in FOLDS) / len(FOLDS) for k in ("auroc", "s_tpr@5")} for a, r in runs.items()}
    base = means["shipped"]
    passing = [
        a
        for a, m in means.items()
        if a != "shipped" and m["auroc"] >= base["auroc"] + 0.005 and m["s_tpr@5"] >= base["s_tpr@5"] + 0.01
    ]
    adopt = max(passing, key=lambda a: means[a]["s_tpr@5"]) if passing else None
    print("AUROC / s_tpr@5 on each left-out set")
    for a, r in runs.items():
        cells = "  ".join(f"{s} {r[s]['auroc']:.3f}/{r[s]['s_tpr@5']:.3f}" for s in FOLDS)
        print(f"{a:11s} {cells}  mean {means[a]['auroc']:.4f}/{means[a]['s_tpr@5']:.3f}")
    print(f"passing: {passing}; adopt: {adopt}")
    sizes = {g: [len(pos), len(neg)] for g, (pos, neg) in groups.items()}
    result = {"arms": ARMS, "sizes": sizes, "runs": runs, "means": means, "passing": passing, "adopt": adopt}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
