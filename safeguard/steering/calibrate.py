"""Choosing the condition layer, the threshold and the behaviour layers and strength.

Following the refusal-direction work (Arditi et al. 2024), choices are made on a validation
split that reading never used, with scores that need no generation:

- **condition layer**: the layer whose score (cosine of the last-prompt-token state with the
  shrunk Fisher direction read on the training split) best separates validation harmful from
  harmless prompts (validation AUROC plus out-of-fold training AUROC);
- **detector**: the same two rules for a second view, the mean over the request's own tokens
  (:mod:`safeguard.steering.detector`), and for a third, the requests' sentence embeddings
  (:mod:`safeguard.steering.encoder`), then the best of ``"last"``, ``"prompt"``, ``"both"`` (the two
  residual-stream views' standardised scores summed) and ``"both+encoder"`` (all three) by validation plus
  out-of-fold AUROC (:func:`calibrate_detectors`), unless fixed by the caller (``read_vectors(..., detector=...)``);
- **threshold**: on out-of-fold training scores (5 folds, harmless prompts with scary words
  included) plus validation scores, the cut that maximises ``TPR - fp_weight * FPR``
  (``fp_weight = 1.5``: over-refusal costs more). Out-of-fold scores matter: a direction scores
  its own training data too well, and a cut set there lets through more false positives;
- **behaviour layer and strength**, in two stages: first, for each candidate layer and strength
  the behaviour vector is added to every training and validation harmful prompt (128; position 0
  left alone; the behaviour direction itself is read from exemplar replies, not from these
  generations) and short greedy replies are generated; the share of refusals (by the evaluation's
  phrase judge) ranks them, among candidates whose replies stay coherent (distinct-word ratio), ties
  to the smaller strength; every layer from a third to 0.7 of the stack, strengths 1, 1.5 and 2.
  That set saturates (several candidates refuse nearly all of it), so the winner and its close
  rivals are then scored on a second pool of training-only harmful requests by both judges of the
  evaluation (refusal phrase and MiniLM similarity), and the best mean wins;
- **ablation layers** (topics): the widest window of layers whose ablation keeps the perplexity
  of the model's own replies to neutral-topic training prompts within 5% of unguarded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .vectors import SteeringVectors

logger = logging.getLogger(__name__)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def roc_curve(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cuts, tpr, fpr)`` at every cut midway between sorted scores (and just outside both ends), ascending."""
    values = torch.sort(torch.cat([pos, neg])).values
    cuts = torch.cat([values[:1] - 1e-3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-3])
    tpr = (pos[None, :] > cuts[:, None]).float().mean(1)
    fpr = (neg[None, :] > cuts[:, None]).float().mean(1)
    return cuts, tpr, fpr


def best_threshold(pos: torch.Tensor, neg: torch.Tensor, fp_weight: float = 2.0) -> tuple[float, float, float]:
    """``(threshold, tpr, fpr)`` maximising ``tpr - fp_weight * fpr``; the cut sits midway between scores."""
    cuts, tpr, fpr = roc_curve(pos, neg)
    i = int(torch.argmax(tpr - fp_weight * fpr))
    return float(cuts[i]), float(tpr[i]), float(fpr[i])


def roc_points(
    pos: torch.Tensor, neg: torch.Tensor, max_fprs: Sequence[float] = (0.03, 0.05, 0.08, 0.1)
) -> list[dict[str, float]]:
    """For each budget, the cut with the highest TPR whose FPR stays within it (the highest such cut on ties).

    Recorded with each calibrated detector: what another over-refusal budget would buy in detection.
    """
    cuts, tpr, fpr = roc_curve(pos, neg)
    out = []
    for budget in max_fprs:
        ok = fpr <= budget + 1e-9
        masked = torch.where(ok, tpr, torch.full_like(tpr, -1.0)).flip(0)
        i = len(cuts) - 1 - int(torch.argmax(masked))  # the highest cut of the best TPR: the fewest false positives
        out.append({"max_fpr": float(budget), "threshold": float(cuts[i]), "tpr": float(tpr[i]), "fpr": float(fpr[i])})
    return out


def out_of_fold_scores(
    pos: torch.Tensor, neg: torch.Tensor, fit: Any, folds: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[L, N]`` of each state under a direction fitted without its fold (``fit(pos, neg) -> [L, d]``)."""
    from .head import fold_masks
    from .reading import projections

    out_p, out_n = torch.zeros(pos.shape[:2]), torch.zeros(neg.shape[:2])
    for tp, tn in fold_masks(pos.shape[1], neg.shape[1], folds):
        dirs = fit(pos[:, ~tp], neg[:, ~tn])
        out_p[:, tp] = projections(pos[:, tp], dirs)
        out_n[:, tn] = projections(neg[:, tn], dirs)
    return out_p, out_n


def select_condition_layer(
    val_pos: torch.Tensor, val_neg: torch.Tensor, oof_pos: torch.Tensor, oof_neg: torch.Tensor
) -> tuple[int, list[dict[str, float]]]:
    """Layer with the best sum of validation and out-of-fold AUROC of the scores ``[L, N]``."""
    table = []
    for layer in range(val_pos.shape[0]):
        table.append(
            {
                "layer": layer,
                "val_auroc": auroc(val_pos[layer], val_neg[layer]),
                "oof_auroc": auroc(oof_pos[layer], oof_neg[layer]),
            }
        )
    best = max(table, key=lambda r: r["val_auroc"] + r["oof_auroc"])
    return int(best["layer"]), table


def calibrate_detectors(
    views: dict[str, dict[str, Any]],
    fp_weight: float = 1.5,
    choose: str | None = None,
    head: dict[str, Any] | None = None,
) -> tuple[str, dict[str, dict]]:
    """Thresholds of the ``"last"``, ``"prompt"`` and ``"both"`` detectors (and ``"both+encoder"`` when ``views``
    has an ``"encoder"`` view), and the best one by val + OOF AUROC (or ``choose``, a choice made elsewhere).

    ``views`` maps ``"last"`` and ``"prompt"`` to ``{"set", "pool", "layer", "oof": (pos, neg), "val": (pos, neg)}``
    with 1-D cosine scores at the view's chosen layer (out-of-fold training scores, validation scores). ``"both"``
    sums the two views' scores standardised by the mean and standard deviation of their out-of-fold scores (both
    classes pooled). Each detector's threshold follows :func:`best_threshold` on its out-of-fold + validation
    scores. Ties in the choice go to the detector with fewer views. Each entry also records ``roc``: the best TPR
    within a few FPR budgets on the same scores (:func:`roc_points`). ``head`` (``{"name", "oof": (pos, neg),
    "val": (pos, neg)}``: a learned head's scores over the ``"last"``, ``"prompt"`` and ``"encoder"`` views, see
    :mod:`safeguard.steering.head`) adds the ``"mlp"`` detector, its threshold on the head's logit.
    """

    def entry(parts: list[tuple[dict[str, Any], float, float]], scored: dict[str, Any] | None = None) -> dict[str, Any]:
        def total(split: str, side: int) -> torch.Tensor:
            if scored is not None:
                return scored[split][side]
            return sum((v[split][side] - c) / s for v, c, s in parts)  # type: ignore[return-value]

        oof_p, oof_n, val_p, val_n = total("oof", 0), total("oof", 1), total("val", 0), total("val", 1)
        thr, tpr, fpr = best_threshold(torch.cat([oof_p, val_p]), torch.cat([oof_n, val_n]), fp_weight=fp_weight)
        return {
            "views": [
                {"set": v["set"], "layer": int(v["layer"]), "pool": v["pool"], "center": float(c), "scale": float(s)}
                for v, c, s in parts
            ],
            **({"head": scored["name"]} if scored is not None else {}),
            "threshold": thr,
            "calibration_tpr": tpr,
            "calibration_fpr": fpr,
            "val_auroc": auroc(val_p, val_n),
            "oof_auroc": auroc(oof_p, oof_n),
            "roc": roc_points(torch.cat([oof_p, val_p]), torch.cat([oof_n, val_n])),
        }

    def standardised(v: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        both = torch.cat(list(v["oof"]))
        return v, float(both.mean()), float(both.std().clamp_min(1e-6))

    table = {
        "last": entry([(views["last"], 0.0, 1.0)]),
        "prompt": entry([(views["prompt"], 0.0, 1.0)]),
        "both": entry([standardised(views["last"]), standardised(views["prompt"])]),
    }
    if "encoder" in views:
        table["both+encoder"] = entry([standardised(views[k]) for k in ("last", "prompt", "encoder")])
    if head is not None:
        table["mlp"] = entry([(views[k], 0.0, 1.0) for k in ("last", "prompt", "encoder")], head)
    if choose is not None:
        return choose, table
    chosen = max(table, key=lambda k: (table[k]["val_auroc"] + table[k]["oof_auroc"], -len(table[k]["views"])))
    return chosen, table


def _steered(adapter: Any, vecs: SteeringVectors, concept: Any, **options: Any) -> Any:
    """The ``repe`` defense with explicit options, attached to ``adapter`` (use as a context manager)."""
    from ..defenses.repe import RepEConfig, RepEDefense

    return RepEDefense(RepEConfig(**options), (concept,), vectors=[vecs]).attach(adapter)


@torch.no_grad()
def greedy_replies(adapter: Any, texts: Sequence[str], new_tokens: int, batch_size: int = 24) -> list[str]:
    """Greedy continuations of chat-formatted ``texts`` (left padding)."""
    tok, model = adapter.tokenizer, adapter.model
    side, tok.padding_side = tok.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(adapter.device)
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def distinct_ratio(text: str) -> float:
    """Distinct words over words: low for degenerate, repetitive text."""
    words = text.lower().split()
    return len(set(words)) / len(words) if words else 0.0


def _behaviour_row(
    adapter: Any,
    vecs: SteeringVectors,
    concept: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    strength: float,
    new_tokens: int,
) -> tuple[dict[str, Any], list[str]]:
    """Refusal-phrase rate and mean distinct-word ratio of greedy replies with the behaviour added at ``layers``."""
    from ..eval.llm import is_refusal_phrase

    with _steered(adapter, vecs, concept, mode="add", layers=tuple(layers), strength=strength):
        replies = greedy_replies(adapter, prompts, new_tokens)
    row = {
        "strength": float(strength),
        "refusal": sum(map(is_refusal_phrase, replies)) / len(replies),
        "distinct": sum(map(distinct_ratio, replies)) / len(replies),
    }
    return row, replies


def refine_candidates(
    table: Sequence[dict[str, Any]], num_layers: int, top: int = 3, min_distinct: float = 0.6, step: float = 0.25
) -> list[tuple[tuple[int, ...], float]]:
    """Second-stage behaviour candidates from a first-stage ``table`` (rows with ``layer``, ``strength``, ...).

    The ``top`` coherent rows by (refusal, smaller strength, distinct), the best row's layer at its strength
    ``+- step``, and the best layer paired with its better neighbour (by first-stage refusal at the best strength)
    at two thirds of the best strength each. Order: as listed, without repeats.
    """
    feasible = [r for r in table if r["distinct"] >= min_distinct] or list(table)
    ranked = sorted(feasible, key=lambda r: (-r["refusal"], r["strength"], -r["distinct"]))
    best = ranked[0]
    layer, strength = int(best["layer"]), float(best["strength"])
    out: list[tuple[tuple[int, ...], float]] = [((int(r["layer"]),), float(r["strength"])) for r in ranked[:top]]
    out += [((layer,), strength - step), ((layer,), strength + step)]
    at = {int(r["layer"]): r["refusal"] for r in table if float(r["strength"]) == strength}
    near = [i for i in (layer - 1, layer + 1) if 0 <= i < num_layers and i in at]
    if near:
        other = max(near, key=lambda i: (at[i], -i))
        out.append((tuple(sorted((layer, other))), round(strength * 2 / 3, 4)))
    seen: set[tuple[tuple[int, ...], float]] = set()
    return [c for c in out if c[1] > 0 and not (c in seen or seen.add(c))]


def select_behaviour(
    adapter: Any,
    vecs: SteeringVectors,
    concept: Any,
    prompts: Sequence[str],
    *,
    first: float = 1 / 3,
    last: float = 0.7,
    stride: int = 1,
    strengths: Sequence[float] = (1.0, 1.5, 2.0),
    new_tokens: int = 32,
    min_distinct: float = 0.6,
    refine_prompts: Sequence[str] | None = None,
    refine_requests: Sequence[str] | None = None,
    judge: Any = None,
    progress: bool = False,
) -> tuple[list[int], float, list[dict[str, Any]]]:
    """Best ``(behaviour layers, strength, table)`` by greedy generation on harmful prompts.

    **Stage 1**: each candidate adds the behaviour vector at one layer to every row of ``prompts``; its score is
    the share of replies with a refusal phrase (the evaluation's phrase judge), among candidates whose replies
    stay coherent (mean distinct-word ratio >= ``min_distinct``); ties go to the smaller strength, then to the
    more varied replies. Candidates: every ``stride``-th layer from ``first`` to ``last`` of the stack
    (fractions) times ``strengths``; the refusal rate is jagged across neighbouring layers (on SmolLM2, layer 11
    at 1.5 refuses 100% of 128 training + validation requests, layer 13 at 1.5 only 22%), so stride 1 is the
    default.

    **Stage 2** (with ``refine_prompts``, a second pool of training-only harmful prompts): the stage-1 winner
    and its close rivals (:func:`refine_candidates`: the best three, the winner's strength +- 0.25, the winner
    paired with a neighbouring layer) are scored on that pool, because a saturated first stage (several
    candidates near 100%) cannot rank them. With ``judge`` (e.g. :class:`~safeguard.eval.llm.MiniLMRefusalJudge`,
    called as ``judge(replies, refine_requests)``) the score is the mean of the phrase judge's and that judge's
    refusal rates, so that a behaviour must read as a refusal to both; else the phrase rate alone. Coherence and
    ties as in stage 1 (smaller total strength first). Table rows carry ``stage`` (1 or 2) and ``layers``.
    """
    L = int(vecs.num_layers)
    candidates = [(i, k) for i in range(int(first * L), int(last * L) + 1, stride) for k in strengths]
    table: list[dict[str, Any]] = []
    for layer, strength in tqdm(candidates, desc="choosing layers", disable=not progress, leave=False):
        row, _ = _behaviour_row(adapter, vecs, concept, prompts, (layer,), strength, new_tokens)
        table.append({"stage": 1, "layer": layer, "layers": [layer]} | row)
    feasible = [r for r in table if r["distinct"] >= min_distinct] or table
    best = max(feasible, key=lambda r: (r["refusal"], -r["strength"], r["distinct"]))
    if not refine_prompts:
        return [int(best["layer"])], float(best["strength"]), table

    second: list[dict[str, Any]] = []
    stage2 = refine_candidates(table, L, min_distinct=min_distinct)
    for layers, strength in tqdm(stage2, desc="refining", disable=not progress, leave=False):
        row, replies = _behaviour_row(adapter, vecs, concept, refine_prompts, layers, strength, new_tokens)
        row = {"stage": 2, "layers": list(layers)} | row
        if judge is not None:
            row["refusal_judge"] = sum(map(bool, judge(replies, refine_requests))) / len(replies)
        row["score"] = (row["refusal"] + row["refusal_judge"]) / 2 if judge is not None else row["refusal"]
        second.append(row)
    feasible2 = [r for r in second if r["distinct"] >= min_distinct] or second
    best2 = max(feasible2, key=lambda r: (r["score"], -r["strength"] * len(r["layers"]), r["distinct"]))
    logger.info(
        "behaviour: stage 1 best layer %d at %.2f; stage 2 (%d prompts) best layers %s at %.2f (score %.3f)",
        best["layer"], best["strength"], len(refine_prompts), best2["layers"], best2["strength"], best2["score"],
    )  # fmt: skip
    return [int(i) for i in best2["layers"]], float(best2["strength"]), table + second


@torch.no_grad()
def select_ablation_layers(
    adapter: Any,
    vecs: SteeringVectors,
    concept: Any,
    prompts: Sequence[str],
    *,
    max_ppl_ratio: float = 1.05,
    new_tokens: int = 32,
    progress: bool = False,
) -> tuple[list[int], list[dict[str, float]]]:
    """Widest window of layers whose ablation keeps the perplexity of unrelated text within budget.

    The unrelated text is the unguarded model's own greedy replies to neutral-topic training
    prompts (plain user messages); each window ``[start, stop)`` over sixths of the stack is
    ablated and the replies' perplexity (teacher forced) is compared with the unguarded one.
    Among windows within ``max_ppl_ratio`` the one with the most layers wins (ties: the later
    start), else the window with the smallest ratio.
    """
    from ..eval.llm import generate_replies, perplexity

    tok, model = adapter.tokenizer, adapter.model
    L = int(vecs.num_layers)
    cuts = sorted({round(L * f / 6) for f in range(7)})
    windows = [(a, b) for a in cuts for b in cuts if b - a >= max(1, L // 6)]
    prompts = list(prompts)
    replies = generate_replies(model, tok, prompts, max_new_tokens=new_tokens, batch_size=len(prompts))
    base = perplexity(model, tok, prompts, replies)
    table: list[dict[str, float]] = []
    for a, b in tqdm(windows, desc="choosing layers", disable=not progress, leave=False):
        with _steered(adapter, vecs, concept, mode="ablate", layers=tuple(range(a, b)), strength=1.0):
            ratio = perplexity(model, tok, prompts, replies) / base
        table.append({"start": a, "stop": b, "ppl_ratio": ratio})
    feasible = [r for r in table if r["ppl_ratio"] <= max_ppl_ratio]
    if feasible:
        best = max(feasible, key=lambda r: (r["stop"] - r["start"], r["start"]))
    else:
        best = min(table, key=lambda r: r["ppl_ratio"])
    return list(range(int(best["start"]), int(best["stop"]))), table
