"""Does a token-max view make the RepE harmful-request detector generalise to new categories better?

The shipped detector (READING_VERSION 10, ``"both"``) sums two standardised cosines: the last prompt token at
layer 21 and the mean over the request's own tokens at layer 18, each against a shrunk Fisher (LDA 0.3)
direction. On the later held-out sets it flagged only 87-89% of harmful requests, and the misses were mostly
requests whose harmful part is a short span inside benign-sounding context (first-person statements of intent,
fiction framings). A mean over the request dilutes such a span; the highest per-token cosine does not. This
script asks, on calibration data only, whether a *token-max* view helps:

- ``max@L``: the highest cosine, over the request's own tokens (the ``"prompt"`` pool's tokens), of the token
  state at layer ``L`` with the request-mean view's LDA direction at ``L`` (fitted on request means, as shipped);
- ``top3@L``: the mean of the three highest such cosines (less sensitive to one odd token).

``L`` is picked per pooling from layers 12-24 by validation + out-of-fold AUROC (calibrate.py's rule). Detectors
compared (views standardised by their out-of-fold scores and summed, as ``"both"``): ``v10`` (last@21 +
prompt@18, the shipped one), each new view alone, with ``last``, with ``prompt``, and with both. Data: the
shipped detector's training data (104 + 240 pairs, 48 + 200 scary-word negatives) and validation (24 + 24).
No held-out prompt is read.

Metrics per detector: validation and out-of-fold AUROC; best TPR within FPR 0.03 / 0.05 / 0.08 of the
out-of-fold + validation scores (``tpr@k``); ``loco_tpr@5``: leave-one-category-out (directions fitted without
one harm category's pairs, that category's pairs scored; scary-word negatives in 8 folds, one left out with each
category), the best TPR within FPR 0.05 of those scores: transfer to what the training data lacks.

**Rule, fixed before the run.** The candidate is the detector with the highest ``loco_tpr@5`` (ties: fewer
views). It replaces ``v10`` only if its ``loco_tpr@5`` beats v10's by at least 0.02 and its ``tpr@5`` is no
more than 0.01 below v10's; otherwise v10 stays. The untouched held-out set (``fresh3``) is read once, after.

**Outcome (written after the run).** v10 stays: no token-max detector beats it on any column. v10 reproduces the
shipped calibration (threshold 0.636, tpr@5 0.878; loco_tpr@5 0.759, as in ``detector_breadth_experiment.py``);
the best new one, ``last+prompt+top3``, reaches loco_tpr@5 0.756 and tpr@5 0.826, and ``max@21`` alone 0.331 /
0.438: the highest token cosine fires on single harmful-sounding words in harmless requests. Also checked
then, on the same scores, and not adopted: ``TPR - 1.5 FPR`` on the leave-one-category-out scores would lower
the threshold to 0.383 (calibration TPR 0.889 -> 0.910, FPR 0.054 -> 0.083); with the release window's residual
refusal on harmless calibration requests (18 of 312, ``release_experiment.py``) that predicts more than 10%
over-refusal, so the shipped threshold stays.

    OMP_NUM_THREADS=2 python scripts/detector_tokenmax_experiment.py [--states /tmp/tokenmax.safetensors]

About 5 minutes on 2 CPU cores (``--states`` keeps the read states for a rerun).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from detector_common import standardised_sum, write_result
from safetensors.torch import load_file, save_file

from safeguard.adapters import CausalLMAdapter
from safeguard.steering import data
from safeguard.steering.calibrate import auroc, best_threshold, roc_points, select_condition_layer
from safeguard.steering.reading import _layer_output, lda_directions, projections, prompt_weights

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_tokenmax.json"
SHRINKAGE = 0.3
LAYERS = tuple(range(12, 25))  # candidate layers of the new views (SmolLM2 has 30)
SHIPPED = {"last": 21, "prompt": 18}  # READING_VERSION 10's views
POS = ("train_harmful", "extra_harmful")
NEG = ("train_harmless", "extra_harmless", "scary_train", "scary_extra")
VAL = ("val_harmful", "val_harmless")


def sets() -> dict[str, tuple[list[str], list[str | None]]]:
    """``{name: (requests, harm categories or None)}`` of the shipped detector's training and validation data."""
    tr, va, ex = data.harmful_pairs("train"), data.harmful_pairs("val"), data.extra_pairs()
    cat = lambda ps: [p["category"] for p in ps]  # noqa: E731
    return {
        "train_harmful": ([p["harmful"] for p in tr], cat(tr)),
        "train_harmless": ([p["harmless"] for p in tr], cat(tr)),
        "extra_harmful": ([p["harmful"] for p in ex], cat(ex)),
        "extra_harmless": ([p["harmless"] for p in ex], cat(ex)),
        "scary_train": ([p["prompt"] for p in data.scary_harmless("train")], [None] * 48),
        "scary_extra": ([p["prompt"] for p in data.extra_scary_harmless()], [None] * 200),
        "val_harmful": ([p["harmful"] for p in va], cat(va)),
        "val_harmless": ([p["harmless"] for p in va], cat(va)),
    }


@torch.no_grad()
def read(adapter: CausalLMAdapter, texts: list[str], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Last-token states ``[L, N, d]``, request-mean states ``[L, N, d]``, every request token's state
    ``[L, M, d]`` and each token's row ``[M]``, at the decoder layers ``LAYERS`` (float32)."""
    model, tok = adapter.model, adapter.tokenizer
    _, layers = adapter.decoder_layers()
    prefix = adapter.chat_prefix_ids()
    grabbed: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: grabbed.__setitem__(i, _layer_output(o)))
        for i, layer in enumerate(layers)
    ]
    last, mean, toks, rows = [], [], [], []
    try:
        for b0 in range(0, len(texts), batch_size):
            enc = tok([adapter.chat_text(t) for t in texts[b0 : b0 + batch_size]], return_tensors="pt",
                      padding=True, add_special_tokens=False)  # fmt: skip
            model(**enc, use_cache=False)
            real = enc["attention_mask"].bool()
            T = real.shape[1]
            end = T - 1 - real.flip(1).to(torch.int8).argmax(dim=1)
            w = prompt_weights(enc["input_ids"], enc["attention_mask"], prefix)
            h = torch.stack([grabbed[i].float() for i in LAYERS])  # [L, B, T, d], the candidate layers only
            last.append(h[:, torch.arange(h.shape[1]), end])
            mean.append(torch.einsum("bt,lbtd->lbd", w, h))
            sel = w > 0
            toks.append(h[:, sel])
            rows.append(b0 + sel.nonzero()[:, 0])
    finally:
        for hk in hooks:
            hk.remove()
    return {"last": torch.cat(last, 1), "prompt": torch.cat(mean, 1), "tokens": torch.cat(toks, 1),
            "rows": torch.cat(rows)}  # fmt: skip


def cached(path: Path | None) -> dict[str, dict[str, torch.Tensor]]:
    if path and path.exists():
        flat = load_file(path)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in flat.items():
            name, part = k.split("/", 1)
            out.setdefault(name, {})[part] = v
        return out
    from safeguard.models import smollm2

    model, tok = smollm2()
    adapter = CausalLMAdapter(model, tok)
    out = {}
    for name, (texts, _) in sets().items():
        t0 = time.perf_counter()
        out[name] = read(adapter, texts)
        logging.info("read %s (%d prompts, %.0f s)", name, len(texts), time.perf_counter() - t0)
    if path:
        save_file({f"{n}/{k}": v.contiguous() for n, d in out.items() for k, v in d.items()}, path)
    return out


def token_pool(st: dict[str, torch.Tensor], dirs: torch.Tensor, how: str) -> torch.Tensor:
    """``[L, N]``: per row, the max (``"max"``) or top-3 mean (``"top3"``) of its tokens' cosines with ``dirs``."""
    cos = projections(st["tokens"], dirs)  # [L, M]
    n = int(st["prompt"].shape[1])
    rows = st["rows"]
    if how == "max":
        out = torch.full((cos.shape[0], n), -2.0)
        return out.scatter_reduce(1, rows.expand_as(cos), cos, reduce="amax")
    k = 3
    res = torch.empty(cos.shape[0], n)
    for r in range(n):
        c = cos[:, rows == r]
        res[:, r] = c.topk(min(k, c.shape[1]), dim=1).values.mean(1)
    return res


def subset(st: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``keep`` (bool ``[N]``) of one set's states, token rows renumbered."""
    idx = keep.nonzero()[:, 0]
    new = torch.full((keep.shape[0],), -1, dtype=torch.long)
    new[idx] = torch.arange(idx.numel())
    tsel = keep[st["rows"]]
    return {"last": st["last"][:, idx], "prompt": st["prompt"][:, idx], "tokens": st["tokens"][:, tsel],
            "rows": new[st["rows"][tsel]]}  # fmt: skip


def cat_states(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {k: torch.cat([p[k] for p in parts], 1) for k in ("last", "prompt", "tokens")}
    at, rows = 0, []
    for p in parts:
        rows.append(p["rows"] + at)
        at += int(p["prompt"].shape[1])
    return out | {"rows": torch.cat(rows)}


def view_scores(train_p: dict, train_n: dict, score: list[dict], pool: str) -> list[torch.Tensor]:
    """``[L, N]`` scores of each of ``score`` under ``pool``'s view fitted on ``train_p`` / ``train_n``."""
    fit_on = "last" if pool == "last" else "prompt"
    dirs = lda_directions(train_p[fit_on], train_n[fit_on], SHRINKAGE)
    if pool in ("last", "prompt"):
        return [projections(s[pool], dirs) for s in score]
    return [token_pool(s, dirs, pool) for s in score]


def folds_of(n: int, k: int = 5) -> list[torch.Tensor]:
    return [torch.arange(n) % k == f for f in range(k)]


def all_scores(st: dict, cats: dict, pool: str) -> dict[str, torch.Tensor]:
    """Out-of-fold, validation and leave-one-category-out scores ``[L, N]`` of one pool."""
    pos, neg = cat_states([st[k] for k in POS]), cat_states([st[k] for k in NEG])
    n_p, n_n = int(pos["prompt"].shape[1]), int(neg["prompt"].shape[1])
    n_layers = int(pos["last"].shape[0])
    oof_p, oof_n = torch.zeros(n_layers, n_p), torch.zeros(n_layers, n_n)
    for tp, tn in zip(folds_of(n_p), folds_of(n_n)):
        sp, sn = view_scores(subset(pos, ~tp), subset(neg, ~tn), [subset(pos, tp), subset(neg, tn)], pool)
        oof_p[:, tp], oof_n[:, tn] = sp, sn
    val_p, val_n = view_scores(pos, neg, [st["val_harmful"], st["val_harmless"]], pool)
    lab_p = [c for k in POS for c in cats[k]]
    lab_n = [c for k in NEG for c in cats[k]]
    categories = sorted(set(lab_p))
    scary = [i for i, c in enumerate(lab_n) if c is None]
    scary_fold = {i: j % len(categories) for j, i in enumerate(scary)}
    loco_p, loco_n = torch.zeros_like(oof_p), torch.zeros_like(oof_n)
    for f, c in enumerate(categories):
        tp = torch.tensor([x == c for x in lab_p])
        tn = torch.tensor([x == c or (x is None and scary_fold[i] == f) for i, x in enumerate(lab_n)])
        sp, sn = view_scores(subset(pos, ~tp), subset(neg, ~tn), [subset(pos, tp), subset(neg, tn)], pool)
        loco_p[:, tp], loco_n[:, tn] = sp, sn
    return {"oof_p": oof_p, "oof_n": oof_n, "val_p": val_p, "val_n": val_n, "loco_p": loco_p, "loco_n": loco_n}


def detector(views: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Metrics of the standardised sum of 1-D view scores (each standardised by its out-of-fold scores)."""
    tot = standardised_sum(views)
    cal_p, cal_n = torch.cat([tot["oof_p"], tot["val_p"]]), torch.cat([tot["oof_n"], tot["val_n"]])
    thr, tpr, fpr = best_threshold(cal_p, cal_n, fp_weight=1.5)
    roc, loco = roc_points(cal_p, cal_n), roc_points(tot["loco_p"], tot["loco_n"])
    return {
        "val_auroc": auroc(tot["val_p"], tot["val_n"]),
        "oof_auroc": auroc(tot["oof_p"], tot["oof_n"]),
        "loco_auroc": auroc(tot["loco_p"], tot["loco_n"]),
        "threshold": thr,
        "calibration_tpr": tpr,
        "calibration_fpr": fpr,
        **{f"tpr@{b}": roc[i]["tpr"] for i, b in enumerate((3, 5, 8))},
        **{f"loco_tpr@{b}": loco[i]["tpr"] for i, b in enumerate((3, 5, 8))},
    }


def candidate(runs: dict[str, dict], margin: float) -> tuple[str, bool]:
    """``(candidate, passes)``: the run with the highest ``loco_tpr@5`` (ties: fewer views), and whether it beats
    ``v10``'s by at least ``margin`` with ``tpr@5`` no more than 0.01 below (the experiments' fixed rule)."""
    cand = max(runs, key=lambda k: (round(runs[k]["loco_tpr@5"], 6), -len(runs[k]["views"])))
    base, c = runs["v10"], runs[cand]
    return cand, cand != "v10" and c["loco_tpr@5"] >= base["loco_tpr@5"] + margin and c["tpr@5"] >= base["tpr@5"] - 0.01


def print_runs(runs: dict[str, dict]) -> None:
    """One line per detector: validation / out-of-fold AUROC, calibration TPR within FPR 0.03 / 0.05 / 0.08, and the
    same for the leave-one-category-out scores."""
    w = max(len(",".join(r["views"])) for r in runs.values()) + 2
    n = max(len(k) for k in runs) + 2
    print(f"{'detector':{n}s}{'views':>{w}s}{'val':>7s}{'oof':>7s}{'t@3':>7s}{'t@5':>7s}{'t@8':>7s}"
          f"{'loco':>7s}{'l@3':>7s}{'l@5':>7s}{'l@8':>7s}")  # fmt: skip
    for name, r in runs.items():
        print(f"{name:{n}s}{','.join(r['views']):>{w}s}{r['val_auroc']:7.3f}{r['oof_auroc']:7.3f}{r['tpr@3']:7.3f}"
              f"{r['tpr@5']:7.3f}{r['tpr@8']:7.3f}{r['loco_auroc']:7.3f}{r['loco_tpr@3']:7.3f}"
              f"{r['loco_tpr@5']:7.3f}{r['loco_tpr@8']:7.3f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    st = cached(args.states)
    cats = {k: c for k, (_, c) in sets().items()}
    views: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    tables = {}
    for pool in ("last", "prompt", "max", "top3"):
        sc = all_scores(st, cats, pool)
        # score rows are LAYERS[0], LAYERS[1], ...
        if pool in SHIPPED:
            at = LAYERS.index(SHIPPED[pool])
        else:
            at = select_condition_layer(sc["val_p"], sc["val_n"], sc["oof_p"], sc["oof_n"])[0]
        layer = LAYERS[at]
        tables[pool] = [
            {"layer": lay, "val_auroc": auroc(sc["val_p"][i], sc["val_n"][i]),
             "oof_auroc": auroc(sc["oof_p"][i], sc["oof_n"][i])}
            for i, lay in enumerate(LAYERS)
        ]  # fmt: skip
        views[pool] = ({k: v[at] for k, v in sc.items()}, f"{pool}@{layer}")
        logging.info("%s view at layer %d (%.0f s)", pool, layer, time.perf_counter() - t0)
    combos = {"v10": ("last", "prompt")}
    for new in ("max", "top3"):
        combos |= {new: (new,), f"last+{new}": ("last", new), f"prompt+{new}": ("prompt", new),
                   f"last+prompt+{new}": ("last", "prompt", new)}  # fmt: skip
    runs = {
        name: {"views": [views[p][1] for p in pools]} | detector([views[p][0] for p in pools])
        for name, pools in combos.items()
    }
    cand, adopt = candidate(runs, margin=0.02)
    choice = cand if adopt else "v10"
    print_runs(runs)
    print(f"\ncandidate (highest loco_tpr@5): {cand}; choice by the rule: {choice}")
    write_result(
        {
            "description": (
                "Token-max views for the RepE harmful-request detector of SmolLM2-135M-Instruct, on the shipped "
                "detector's training and validation data only (no held-out prompt read): tpr@k from out-of-fold + "
                "validation scores, loco_* leave-one-category-out. Rule: the highest loco_tpr@5 replaces v10 only if "
                "it beats v10's by >= 0.02 with tpr@5 no more than 0.01 below."
            ),
            "shrinkage": SHRINKAGE,
            "counts": {k: int(v["prompt"].shape[1]) for k, v in st.items()},
            "layer_tables": tables,
            "runs": runs,
            "candidate": cand,
            "choice": choice,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
