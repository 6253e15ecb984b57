"""Choosing the condition layer, the threshold and the behaviour layers and strength.

Following the refusal-direction work (Arditi et al. 2024), choices are made on a validation
split that reading never used, with scores that need no generation:

- **condition layer**: the layer whose score (cosine of the last-prompt-token state with the
  shrunk Fisher direction read on the training split) best separates validation harmful from
  harmless prompts (validation AUROC plus out-of-fold training AUROC);
- **threshold**: on out-of-fold training scores (5 folds, harmless prompts with scary words
  included) plus validation scores, the cut that maximises ``TPR - fp_weight * FPR``
  (``fp_weight = 1.5``: over-refusal costs more). Out-of-fold scores matter: a direction scores
  its own training data too well, and a cut set there lets through more false positives;
- **behaviour layers and strength**: for each window of consecutive layers and each strength,
  the behaviour vector is added (position 0 left alone) and the score is the mean per-token
  log-probability of a refusal reply on validation harmful prompts minus that of a compliant
  reply. The best window/strength wins; a strength too large makes any text unlikely, so the
  score peaks instead of growing without bound.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .ops import add_vector, hidden_of, replace_hidden
from .vectors import SteeringVectors

logger = logging.getLogger(__name__)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def best_threshold(pos: torch.Tensor, neg: torch.Tensor, fp_weight: float = 2.0) -> tuple[float, float, float]:
    """``(threshold, tpr, fpr)`` maximising ``tpr - fp_weight * fpr``; the cut sits midway between scores."""
    values = torch.sort(torch.cat([pos, neg])).values
    cuts = torch.cat([values[:1] - 1e-3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-3])
    tpr = (pos[None, :] > cuts[:, None]).float().mean(1)
    fpr = (neg[None, :] > cuts[:, None]).float().mean(1)
    i = int(torch.argmax(tpr - fp_weight * fpr))
    return float(cuts[i]), float(tpr[i]), float(fpr[i])


def out_of_fold_scores(
    pos: torch.Tensor, neg: torch.Tensor, fit: Any, folds: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[L, N]`` of each state under a direction fitted without its fold (``fit(pos, neg) -> [L, d]``)."""
    from .reading import projections

    out_p, out_n = torch.zeros(pos.shape[:2]), torch.zeros(neg.shape[:2])
    for f in range(folds):
        tp = torch.arange(pos.shape[1]) % folds == f
        tn = torch.arange(neg.shape[1]) % folds == f
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


@contextlib.contextmanager
def adding(layers: nn.ModuleList, vectors: dict[int, torch.Tensor], skip_first: bool = True) -> Iterator[None]:
    """Temporarily add ``vectors[i]`` to the output of layer ``i`` at every token but each row's first.

    Used for calibration on right-padded batches whose first real token is position 0.
    """
    handles = []

    def make(vec: torch.Tensor):
        def hook(module, args, kwargs, output):
            h = hidden_of(output)
            gate = None
            if skip_first and h.shape[1] > 1:
                gate = torch.ones(h.shape[1], 1, dtype=h.dtype, device=h.device)
                gate[0] = 0
            return replace_hidden(output, add_vector(h, vec.to(h.device, h.dtype), gate))

        return hook

    try:
        for i, vec in vectors.items():
            handles.append(layers[i].register_forward_hook(make(vec), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reply_logprob(model: nn.Module, tokenizer: Any, prompts: Sequence[str], replies: Sequence[str]) -> torch.Tensor:
    """Mean per-token log-probability of each reply after each chat-formatted prompt: ``[len(replies), N]``.

    One forward for all (prompt, reply) rows; the vocabulary projection runs on reply positions only.
    """
    device = next(model.parameters()).device
    ids_p = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids_r = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    seqs = [(p, r) for r in ids_r for p in ids_p]
    T = max(len(p) + len(r) for p, r in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for i, (p, r) in enumerate(seqs):  # right padding: position 0 is each row's first token
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        for j, t in enumerate(r):
            rows.append(i)
            cols.append(len(p) - 1 + j)
            targets.append(t)
            owner.append(i)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
    logits = model.get_output_embeddings()(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0].cpu()
    sums = torch.zeros(len(seqs)).index_add_(0, torch.tensor(owner), lp)
    counts = torch.zeros(len(seqs)).index_add_(0, torch.tensor(owner), torch.ones_like(lp))
    return (sums / counts).view(len(replies), len(prompts))


def select_behaviour(
    model: nn.Module,
    tokenizer: Any,
    layers: nn.ModuleList,
    vectors: SteeringVectors,
    prompts: Sequence[str],
    *,
    refusal: str,
    compliance: str,
    windows: Sequence[int] = (1,),
    strengths: Sequence[float] = (1.0, 1.5),
    first: float = 0.4,
    last: float = 0.7,
    stride: int = 1,
    progress: bool = False,
) -> tuple[list[int], float, list[dict[str, float]]]:
    """Best ``(behaviour layers, strength, table)`` by the refusal-minus-compliance log-prob score."""
    L = len(layers)
    starts = range(max(1, int(first * L)), max(2, int(last * L)), stride)
    candidates = [(s, w, k) for w in windows for s in starts if s + w <= L for k in strengths]
    base_r, base_c = reply_logprob(model, tokenizer, prompts, [refusal, compliance]).mean(dim=1).tolist()
    table: list[dict[str, float]] = [
        {"start": -1, "width": 0, "strength": 0.0, "refusal": base_r, "compliance": base_c, "score": base_r - base_c}
    ]
    for start, width, strength in tqdm(candidates, desc="choosing layers", disable=not progress, leave=False):
        vecs = {i: vectors.vector("behaviour", i, strength / width) for i in range(start, start + width)}
        with adding(layers, vecs):
            r, c = reply_logprob(model, tokenizer, prompts, [refusal, compliance]).mean(dim=1).tolist()
        table.append(
            {"start": start, "width": width, "strength": strength, "refusal": r, "compliance": c, "score": r - c}
        )
    best = max(table[1:], key=lambda row: row["refusal"] + min(row["score"], 0.0))
    chosen = list(range(int(best["start"]), int(best["start"] + best["width"])))
    return chosen, float(best["strength"]) / int(best["width"]), table
