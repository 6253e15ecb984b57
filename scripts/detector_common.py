"""Shared pieces of the harmful-request detector experiments (``scripts/detector_*_experiment.py``).

- :func:`prompt_sets`: every prompt set the experiments read, by name (training, extra training, validation,
  held-out test), each a list of raw requests (the chat template is applied when reading);
- :func:`read_pools`: last-token and request-mean states of those sets, read set by set as calibration does;
- :func:`save_states` / :func:`load_states`: a safetensors cache of them (``--states``), and :func:`cached_states`,
  which reads only the sets a cache lacks;
- :func:`lda_scores`: a shrunk Fisher direction per layer fitted on training states, its out-of-fold training
  scores and its validation / test scores;
- :func:`write_result`: the experiment's JSON result;
- :func:`standardised_sum` and :func:`detector_metrics`: a detector made of several views (each view's cosine
  standardised by its out-of-fold mean and std, then summed, as :mod:`safeguard.steering.detector` does for
  ``"both"``) and its calibration metrics (threshold by ``TPR - 1.5 FPR``, best TPR within FPR budgets) with
  the held-out test numbers as ``*_info`` fields, information only.

Score dictionaries use the keys ``oof_p`` / ``oof_n`` (out-of-fold training scores), ``val_p`` / ``val_n``
(validation) and ``test_p`` / ``test_h`` / ``test_s`` (held-out harmful, matched harmless, scary-word harmless);
other keys are carried through the sum.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeguard.adapters import CausalLMAdapter
from safeguard.steering import data
from safeguard.steering.calibrate import auroc, best_threshold, out_of_fold_scores, roc_points
from safeguard.steering.reading import collect_states, lda_directions, projections

POOLS = ("last", "prompt")


def prompt_sets(names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict[str, list[str]]:
    """``{set name: requests}``; ``names`` keeps only those sets (in this function's order), ``exclude`` drops some.

    Without ``names``: every set but the later held-out ones (``fresh_harmful``... ``scary_fresh8``) and the third
    extra file (``extra3_harmful``, ``extra3_harmless``, ``scary_extra3``), which are read only when named.
    """
    sources = {
        "train_harmful": lambda: [p["harmful"] for p in data.harmful_pairs("train")],
        "train_harmless": lambda: [p["harmless"] for p in data.harmful_pairs("train")],
        "scary_train": lambda: [p["prompt"] for p in data.scary_harmless("train")],
        "extra_harmful": lambda: [p["harmful"] for p in data.extra_pairs()],
        "extra_harmless": lambda: [p["harmless"] for p in data.extra_pairs()],
        "scary_extra": lambda: [p["prompt"] for p in data.extra_scary_harmless()],
        "extra2_harmful": lambda: [p["harmful"] for p in data.extra_pairs("extra2")],
        "extra2_harmless": lambda: [p["harmless"] for p in data.extra_pairs("extra2")],
        "scary_extra2": lambda: [p["prompt"] for p in data.extra_scary_harmless("extra2")],
        "val_harmful": lambda: [p["harmful"] for p in data.harmful_pairs("val")],
        "val_harmless": lambda: [p["harmless"] for p in data.harmful_pairs("val")],
        "test_harmful": lambda: [p["harmful"] for p in data.harmful_pairs("test")],
        "test_harmless": lambda: [p["harmless"] for p in data.harmful_pairs("test")],
        "scary_test": lambda: [p["prompt"] for p in data.scary_harmless("test")],
    }
    default = list(sources)  # the later held-out sets and extra3 (READING_VERSION 13) are read only when named
    sources["extra3_harmful"] = lambda: [p["harmful"] for p in data.extra_pairs("extra3")]
    sources["extra3_harmless"] = lambda: [p["harmless"] for p in data.extra_pairs("extra3")]
    sources["scary_extra3"] = lambda: [p["prompt"] for p in data.extra_scary_harmless("extra3")]
    for split in data.LATER:  # fresh_harmful, fresh_harmless, scary_fresh, ..., scary_fresh4 (whole files)
        sources[f"{split}_harmful"] = lambda s=split: [p["harmful"] for p in data.harmful_pairs(s)]
        sources[f"{split}_harmless"] = lambda s=split: [p["harmless"] for p in data.harmful_pairs(s)]
        sources[f"scary_{split}"] = lambda s=split: [p["prompt"] for p in data.scary_harmless(s)]
    keep = set(default if names is None else names) - set(exclude)
    unknown = (keep | set(exclude)) - set(sources)
    if unknown:
        raise KeyError(f"unknown prompt sets {sorted(unknown)}; known: {list(sources)}")
    return {k: read() for k, read in sources.items() if k in keep}


def read_pools(
    adapter: CausalLMAdapter, sets: dict[str, list[str]], pools: Sequence[str] = POOLS
) -> dict[str, dict[str, torch.Tensor]]:
    """``{pool: {set: [L, N, d]}}``: each set read on its own through the chat template (as calibration does)."""
    chat = adapter.chat_text
    _, layers = adapter.decoder_layers()
    prefix = adapter.chat_prefix_ids() if "prompt" in pools else None
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in pools}
    for name, prompts in sets.items():
        texts = [chat(p) for p in prompts]
        if "last" in pools:
            out["last"][name] = collect_states(adapter.model, adapter.tokenizer, texts, layers)[0]
        if "prompt" in pools:
            out["prompt"][name] = collect_states(
                adapter.model, adapter.tokenizer, texts, layers, position="prompt", prefix_ids=prefix
            )[0]
        logging.info("read %s (%d prompts)", name, len(texts))
    return out


def save_states(states: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    save_file({f"{p}/{k}": v.contiguous() for p, d in states.items() for k, v in d.items()}, path)


def load_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in load_file(path).items():
        pool, name = key.split("/", 1)
        out.setdefault(pool, {})[name] = v
    return out


def cached_states(path: Path | None, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Both pools' states of the prompt sets ``names`` (default: all): those in the cache at ``path`` loaded, the
    others read with SmolLM2 (and the cache rewritten when ``path`` is given)."""
    from safeguard.models import smollm2

    states = load_states(path) if path and path.exists() else {p: {} for p in POOLS}
    cached = [k for k in states["last"] if all(k in states[p] for p in POOLS)]
    missing = prompt_sets(names, exclude=cached)
    if missing:
        t0 = time.perf_counter()
        model, tok = smollm2()
        new = read_pools(CausalLMAdapter(model, tok), missing)
        for p in POOLS:
            states[p] |= new[p]
        logging.info("read %d sets in %.0f s", len(missing), time.perf_counter() - t0)
        if path:
            save_states(states, path)
    return states


def lda_scores(
    s: dict[str, torch.Tensor], pos: torch.Tensor, neg: torch.Tensor, shrinkage: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(scores, directions)``: per-layer cosine scores ``[L, N]`` of LDA directions fitted on ``pos`` / ``neg``.

    ``scores`` holds the out-of-fold training scores (5 folds, calibrate.py's folds) and the projections of the
    validation and test sets of ``s`` (one pool's ``{set: [L, N, d]}``); ``directions`` is the full fit ``[L, d]``.
    """

    def fit(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return lda_directions(p, n, shrinkage)

    dirs = fit(pos, neg)
    oof_p, oof_n = out_of_fold_scores(pos, neg, fit)
    held = {"val_p": "val_harmful", "val_n": "val_harmless", "test_p": "test_harmful"}
    held |= {"test_h": "test_harmless", "test_s": "scary_test"}
    return {"oof_p": oof_p, "oof_n": oof_n} | {k: projections(s[name], dirs) for k, name in held.items()}, dirs


def write_result(result: dict, path: Path) -> None:
    """Write an experiment's result as indented JSON (folders created) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def standardised_sum(views: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum over views of ``(score - c) / sd``, ``c`` and ``sd`` from the view's out-of-fold scores (both classes).

    Each view maps split keys to 1-D scores at its layer; keys missing from a view are left out of the result.
    """
    keys = set.intersection(*(set(v) for v in views))
    tot: dict[str, torch.Tensor] = {}
    for v in views:
        both = torch.cat([v["oof_p"], v["oof_n"]])
        c, sd = both.mean(), both.std().clamp_min(1e-6)
        for k in keys:
            tot[k] = tot.get(k, 0) + (v[k] - c) / sd
    return tot


def detector_metrics(tot: dict[str, torch.Tensor]) -> dict[str, float]:
    """Calibration metrics of summed scores (out-of-fold + validation) and test numbers (``*_info``) at its threshold."""
    cal_p, cal_n = torch.cat([tot["oof_p"], tot["val_p"]]), torch.cat([tot["oof_n"], tot["val_n"]])
    thr, tpr, fpr = best_threshold(cal_p, cal_n, fp_weight=1.5)
    roc = roc_points(cal_p, cal_n)
    return {
        "val_auroc": auroc(tot["val_p"], tot["val_n"]),
        "oof_auroc": auroc(tot["oof_p"], tot["oof_n"]),
        "threshold": thr,
        "calibration_tpr": tpr,
        "calibration_fpr": fpr,
        "tpr@3": roc[0]["tpr"],
        "tpr@5": roc[1]["tpr"],
        "tpr@8": roc[2]["tpr"],
        "test_auroc_info": auroc(tot["test_p"], torch.cat([tot["test_h"], tot["test_s"]])),
        "test_tpr_info": float((tot["test_p"] > thr).float().mean()),
        "test_fpr_harmless_info": float((tot["test_h"] > thr).float().mean()),
        "test_fpr_scary_info": float((tot["test_s"] > thr).float().mean()),
    }
