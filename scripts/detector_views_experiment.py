"""Would more views (layers) or more training data make the RepE harmful-request detector better?

The shipped ``harmful`` guard steers a row when its detector score exceeds a threshold. The shipped
detector ``"both"`` sums two standardised cosines (:mod:`safeguard.steering.detector`): the last prompt
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
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeguard.adapters import CausalLMAdapter
from safeguard.models import smollm2
from safeguard.steering import data
from safeguard.steering.build import LDA_SHRINKAGE
from safeguard.steering.calibrate import auroc, best_threshold, out_of_fold_scores, roc_points
from safeguard.steering.reading import collect_states, lda_directions, projections

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_views.json"
POOLS = ("last", "prompt")


def read_all(adapter: CausalLMAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """``{pool: {set: [L, N, d]}}`` for every prompt set, each set read on its own (as calibration does)."""
    chat = adapter.chat_text
    _, layers = adapter.decoder_layers()
    prefix = adapter.chat_prefix_ids()
    train, val, test, extra = (
        data.harmful_pairs("train"),
        data.harmful_pairs("val"),
        data.harmful_pairs("test"),
        data.extra_pairs(),
    )
    sets = {
        "train_harmful": [p["harmful"] for p in train],
        "train_harmless": [p["harmless"] for p in train],
        "scary_train": [p["prompt"] for p in data.scary_harmless("train")],
        "extra_harmful": [p["harmful"] for p in extra],
        "extra_harmless": [p["harmless"] for p in extra],
        "val_harmful": [p["harmful"] for p in val],
        "val_harmless": [p["harmless"] for p in val],
        "test_harmful": [p["harmful"] for p in test],
        "test_harmless": [p["harmless"] for p in test],
        "scary_test": [p["prompt"] for p in data.scary_harmless("test")],
    }
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in POOLS}
    for name, prompts in sets.items():
        texts = [chat(p) for p in prompts]
        out["last"][name] = collect_states(adapter.model, adapter.tokenizer, texts, layers)[0]
        out["prompt"][name] = collect_states(
            adapter.model, adapter.tokenizer, texts, layers, position="prompt", prefix_ids=prefix
        )[0]
        logging.info("read %s (%d prompts)", name, len(texts))
    return out


def load_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    flat = load_file(path)
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in POOLS}
    for key, v in flat.items():
        pool, name = key.split("/", 1)
        out[pool][name] = v
    return out


def pool_scores(s: dict[str, torch.Tensor], extra: bool, shrinkage: float) -> dict[str, torch.Tensor]:
    """Per-layer cosine scores ``[L, N]`` of one pool: out-of-fold training, validation and test."""
    pos = s["train_harmful"]
    neg = [s["train_harmless"]]
    if extra:
        pos = torch.cat([pos, s["extra_harmful"]], dim=1)
        neg.append(s["extra_harmless"])
    neg = torch.cat([*neg, s["scary_train"]], dim=1)

    def fit(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return lda_directions(p, n, shrinkage)

    dirs = fit(pos, neg)
    oof_p, oof_n = out_of_fold_scores(pos, neg, fit)
    return {
        "oof_p": oof_p,
        "oof_n": oof_n,
        "val_p": projections(s["val_harmful"], dirs),
        "val_n": projections(s["val_harmless"], dirs),
        "test_p": projections(s["test_harmful"], dirs),
        "test_h": projections(s["test_harmless"], dirs),
        "test_s": projections(s["scary_test"], dirs),
    }


def ranking(sc: dict[str, torch.Tensor]) -> list[int]:
    """Layers by validation + out-of-fold AUROC, best first (calibrate.select_condition_layer's rule)."""
    L = sc["oof_p"].shape[0]
    key = {i: auroc(sc["val_p"][i], sc["val_n"][i]) + auroc(sc["oof_p"][i], sc["oof_n"][i]) for i in range(L)}
    return sorted(range(L), key=lambda i: -key[i])


def combine(scores: dict[str, dict[str, torch.Tensor]], views: list[tuple[str, int]]) -> dict:
    """Sum of the views' cosines standardised by their out-of-fold mean and std; calibration and test metrics."""
    tot: dict[str, torch.Tensor] = {}
    for pool, layer in views:
        sc = scores[pool]
        both = torch.cat([sc["oof_p"][layer], sc["oof_n"][layer]])
        c, sd = both.mean(), both.std().clamp_min(1e-6)
        for k, v in sc.items():
            tot[k] = tot.get(k, 0) + (v[layer] - c) / sd
    cal_p, cal_n = torch.cat([tot["oof_p"], tot["val_p"]]), torch.cat([tot["oof_n"], tot["val_n"]])
    thr, tpr, fpr = best_threshold(cal_p, cal_n, fp_weight=1.5)
    roc = roc_points(cal_p, cal_n)
    test_n = torch.cat([tot["test_h"], tot["test_s"]])
    return {
        "views": [{"pool": p, "layer": int(i)} for p, i in views],
        "val_auroc": auroc(tot["val_p"], tot["val_n"]),
        "oof_auroc": auroc(tot["oof_p"], tot["oof_n"]),
        "threshold": thr,
        "calibration_tpr": tpr,
        "calibration_fpr": fpr,
        "tpr@3": roc[0]["tpr"],
        "tpr@5": roc[1]["tpr"],
        "tpr@8": roc[2]["tpr"],
        "test_auroc_info": auroc(tot["test_p"], test_n),
        "test_tpr_info": float((tot["test_p"] > thr).float().mean()),
        "test_fpr_harmless_info": float((tot["test_h"] > thr).float().mean()),
        "test_fpr_scary_info": float((tot["test_s"] > thr).float().mean()),
    }


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
        states = read_all(CausalLMAdapter(model, tok))
        logging.info("read states in %.0f s", time.perf_counter() - t0)
        if args.states:
            save_file({f"{p}/{k}": v.contiguous() for p, d in states.items() for k, v in d.items()}, args.states)

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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
