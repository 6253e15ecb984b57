"""Would a MiniLM with its top layers fine-tuned as a harmful-request classifier make the detector generalise better?

READING_VERSION 13's detector is linear on frozen features: shrunk Fisher directions on SmolLM2's last-token state
(layer 27), its request-token mean (layer 16) and the request's all-MiniLM-L6-v2 embedding, each standardised and
summed. On its untouched set ``fresh6`` it flagged 81.2% of the harmful requests and 17.5% of the matched harmless
ones (AUROC 0.936): implied-harm requests pass and near-miss harmless ones in risky settings are flagged. More data
of the same kind, probe suffixes, token-max views, other linear and kNN readers and reply drafts did not help
(``repe_detector_*.json``). None of those let the features themselves change. Here the top two of MiniLM's six layers
and a linear head on its (unit) mean-pooled output are fine-tuned on the detector's own training requests, so the
encoder's attention can learn which words of a request carry its harm.

**Recipe, fixed before any left-out score was read** (hyperparameters set once on the training files and the
validation pairs only): MiniLM layers 1-4 frozen (their output computed once per request), layers 5-6 and the head
trained with AdamW (lr 3e-5 for the layers, 1e-3 for the head, weight decay 0.01, linear decay to 0), 3 epochs of
batches of 32, binary cross-entropy with the harmful class weighted by the negatives-to-positives ratio, seed 0.
The view's score is the head's logit; its out-of-fold training scores come from five fits on 4/5 of the training
requests (the folds of :func:`safeguard.steering.calibrate.out_of_fold_scores`), its scores on validation and the
left-out set from a sixth fit on all of them.

**Leave-one-set-out over the six read held-out sets** (``fresh`` ... ``fresh6``): for each set ``S``, every arm is
fitted on READING_VERSION 13's training data (train, extra, extra2 pairs and their scary-word prompts) plus the
other five read sets' training copies (less their exclusions, ``retired_exclusions.json``; ``fresh6`` has none yet
and is used whole), thresholded by ``TPR - 1.5 FPR`` on out-of-fold + validation scores and scored on the whole of
``S`` as in :mod:`detector_retired_experiment`. Arms: ``v13`` (the three frozen views), ``+tuned`` (the three
and the tuned view), ``tuned-for-encoder`` (the tuned view in place of the frozen MiniLM view) and ``tuned`` (the
tuned view alone, information only). Nothing here reads ``test`` or ``fresh7``.

**Rule, fixed before the run.** An arm (``+tuned`` or ``tuned-for-encoder``) is worth building if, averaged over
the six left-out sets, its ``tpr`` is at least 0.02 above ``v13``'s, its pooled flagged share of harmless requests
no more than 0.005 above and its ``s_tpr@5`` not lower; of those passing, the one with the highest ``s_tpr@5``.
Built, the next version would be measured once on the unread ``fresh7``; that measurement, not this table, would
be the claim.

**Outcome (written after the run).** Neither arm is worth building. Averaged over the six left-out sets, ``+tuned``
raised the harmful flagged share from 0.900 to 0.927 but the pooled harmless one from 0.058 to 0.071 (the rule allows
+0.005), and ``tuned-for-encoder`` 0.931 / 0.076. Threshold-free, the gain is small: AUROC 0.974 -> 0.975 / 0.976,
``s_tpr@5`` 0.902 -> 0.915 / 0.912; the tuned view alone is worse than the frozen three (AUROC 0.961). Most of the
higher ``tpr`` is a threshold that moved along the same ROC curve. ``fresh6`` stays the hard set for every arm
(AUROC 0.936-0.943).

    OMP_NUM_THREADS=2 python scripts/detector_tuned_encoder_experiment.py [--states /tmp/x3.safetensors]

About 35 minutes on 2 CPU cores (36 fine-tunes of about 45 s; the SmolLM2 states are read once, or loaded from
``--states``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from detector_common import prompt_sets, write_result
from detector_extra3_experiment import (
    BASE_NEG,
    BASE_POS,
    READ,
    V12_LAYERS,
    add_training_copies,
    left_out_sets,
    training_masks,
)
from detector_retired_experiment import LAYERS, beats, detector, print_means, retired_sets, view, view_pools

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_tuned_encoder.json"
READ6 = (*READ, "fresh6")  # the read held-out sets (fresh6 since READING_VERSION 13's measurement)
FROZEN = 4  # MiniLM layers kept frozen; the rest are fine-tuned
EPOCHS, BATCH, LR_LAYERS, LR_HEAD, WEIGHT_DECAY, SEED = 3, 32, 3e-5, 1e-3, 0.01, 0
FOLDS = 5
RECIPE = {"frozen_layers": FROZEN, "epochs": EPOCHS, "batch": BATCH, "lr_layers": LR_LAYERS, "lr_head": LR_HEAD,
          "weight_decay": WEIGHT_DECAY, "seed": SEED, "folds": FOLDS}  # fmt: skip


class TunedHead(torch.nn.Module):
    """MiniLM's layers after :data:`FROZEN` (a trainable copy) and a linear head on the unit mean-pooled output."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.layers = copy.deepcopy(encoder.encoder.layer[FROZEN:]).requires_grad_(True)
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bias = (1.0 - mask[:, None, None, :]) * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, attention_mask=bias)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(torch.nn.functional.normalize(pooled, dim=-1) * 10.0).squeeze(-1)


@torch.no_grad()
def frozen_states(tokenizer, encoder, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Each text's ``[T, d]`` output of MiniLM's first :data:`FROZEN` layers (padding dropped)."""
    out = []
    for i in range(0, len(texts), batch_size):
        b = tokenizer(
            list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=128
        )
        h = encoder.embeddings(b["input_ids"], token_type_ids=b["token_type_ids"])
        bias = (1.0 - b["attention_mask"][:, None, None, :].float()) * torch.finfo(h.dtype).min
        for layer in encoder.encoder.layer[:FROZEN]:
            h = layer(h, attention_mask=bias)
        out += [h[j, : int(n)].clone() for j, n in enumerate(b["attention_mask"].sum(1))]
    return out


def padded(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(s.shape[0] for s in states)
    h, m = torch.zeros(len(states), t, states[0].shape[1]), torch.zeros(len(states), t)
    for i, s in enumerate(states):
        h[i, : s.shape[0]], m[i, : s.shape[0]] = s, 1.0
    return h, m


def fit(encoder, pos: Sequence[torch.Tensor], neg: Sequence[torch.Tensor]) -> TunedHead:
    """Fine-tune a :class:`TunedHead` on harmful ``pos`` against harmless ``neg`` (the recipe in the docstring)."""
    torch.manual_seed(SEED)
    model = TunedHead(encoder).train()
    x, y = list(pos) + list(neg), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    opt = torch.optim.AdamW(
        [{"params": model.layers.parameters(), "lr": LR_LAYERS}, {"params": model.head.parameters(), "lr": LR_HEAD}],
        weight_decay=WEIGHT_DECAY,
    )
    steps = EPOCHS * -(-len(x) // BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    weight = torch.tensor(len(neg) / len(pos))
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            logits = model(*padded([x[j] for j in idx]))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], pos_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def scores(model: TunedHead, states: Sequence[torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    return torch.cat([model(*padded(states[i : i + batch_size])) for i in range(0, len(states), batch_size)])


def tuned_view(encoder, sets: dict[str, list[torch.Tensor]], pos: list[str], neg: list[str], score: list[str]):
    """The tuned view's out-of-fold training scores (five fits) and the scores of ``score`` (a sixth fit on all)."""
    p = [s for k in pos for s in sets[k]]
    n = [s for k in neg for s in sets[k]]
    oof_p, oof_n = torch.zeros(len(p)), torch.zeros(len(n))
    for f in range(FOLDS):
        tp, tn = torch.arange(len(p)) % FOLDS == f, torch.arange(len(n)) % FOLDS == f
        model = fit(encoder, [s for s, t in zip(p, tp) if not t], [s for s, t in zip(n, tn) if not t])
        oof_p[tp] = scores(model, [s for s, t in zip(p, tp) if t])
        oof_n[tn] = scores(model, [s for s, t in zip(n, tn) if t])
    model = fit(encoder, p, n)
    return {"oof_p": oof_p, "oof_n": oof_n} | {k: scores(model, sets[k]) for k in score}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    LAYERS.update(last=V12_LAYERS[0], prompt=V12_LAYERS[1])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    val = ["val_harmful", "val_harmless"]
    read_names = [k for s in READ6 for side in retired_sets(s) for k in side]
    names = BASE_POS + BASE_NEG + val + read_names
    pools = view_pools(args.states, names)
    add_training_copies(pools, read_names, READ6)
    from safeguard.models.minilm import load_minilm

    tokenizer, encoder = load_minilm()
    texts = prompt_sets(names)
    masks = training_masks(READ6)
    sets = {k: frozen_states(tokenizer, encoder, texts[k]) for k in names}
    sets |= {f"{k}:train": [s for s, keep in zip(sets[k], masks[k]) if keep] for k in read_names}
    base = ["last", "prompt", "encoder"]
    arms = {
        "v13": base,
        "+tuned": [*base, "tuned"],
        "tuned-for-encoder": ["last", "prompt", "tuned"],
        "tuned": ["tuned"],
    }
    runs: dict[str, dict[str, dict[str, float]]] = {a: {} for a in arms}
    for held in READ6:
        t1 = time.perf_counter()
        score, pos, neg = left_out_sets(held, read=READ6)
        views = {p: view(pools[p], pos, neg, score) for p in base}
        views["tuned"] = tuned_view(encoder, sets, pos, neg, score)
        for arm, used in arms.items():
            runs[arm][held] = detector([views[p] for p in used], held)
        logging.info("%s left out (%.0f s): %s", held, time.perf_counter() - t1,
                     {a: (round(runs[a][held]["tpr"], 3), round(runs[a][held]["fpr_pooled"], 3)) for a in arms})  # fmt: skip
    means = print_means(runs, 19)
    b = means["v13"]
    ok = [a for a in ("+tuned", "tuned-for-encoder") if beats(means[a], b, tpr_gain=0.02)]
    chosen = max(ok, key=lambda a: means[a]["s_tpr@5"]) if ok else None
    print(f"\nworth building by the rule: {chosen}")
    write_result(
        {
            "description": (
                "Leave-one-set-out over the read held-out sets fresh..fresh6: READING_VERSION 13's frozen-feature "
                "detector recipe ('v13') against the same with a view from MiniLM with its top two layers and a "
                "linear head fine-tuned on the training requests ('+tuned'), with that view in place of the frozen "
                "MiniLM view ('tuned-for-encoder') and alone ('tuned', information only). Rule: an arm is worth "
                "building if its mean tpr is >= 0.02 higher, its mean pooled harmless flagged share <= 0.005 higher "
                "and its mean s_tpr@5 not lower."
            ),
            "layers": LAYERS,
            "recipe": RECIPE,
            "runs": runs,
            "means": means,
            "worth_building": chosen,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
