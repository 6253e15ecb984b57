"""Would the unguarded model's own first reply tokens make the harmful-request detector generalise better?

READING_VERSION 13's detector reads the request only (last prompt token at layer 27, request-token mean at layer 16,
the request's MiniLM embedding). On its untouched set ``fresh6`` it flagged 81.2% of the harmful requests and 17.5%
of the matched harmless ones (AUROC 0.936, against 0.987-0.995 on the other sets): implied-harm requests pass and
near-miss harmless ones in risky settings are flagged. A compliant reply to a harmful request is often plainer
than the request ("To skim cards at a pump, you'll need..."), so this script asks whether a **draft** (the
unguarded model's first greedy reply tokens) adds what the request lacks. A guard built on it would decode the
draft unguarded, score it, and restart flagged rows from the prompt with the refusal steering: it pays the draft's
tokens once per flagged row, so the gain must be large to be worth building.

**Leave-one-set-out over the five read held-out sets** (``fresh`` ... ``fresh5``), as in
:mod:`detector_extra3_experiment`: for each set ``S``, trained on v13's training data less ``S`` (train, extra,
extra2 pairs and scary-word prompts, the other four read sets less their exclusions), scored on the whole of ``S``:

- ``v13``: the shipped recipe (three request views, each shrunk Fisher 0.3, standardised by its out-of-fold scores,
  summed; threshold by ``TPR - 1.5 FPR`` on out-of-fold + validation scores);
- ``+draft-encoder``: a fourth view, the MiniLM embedding of the draft text;
- ``+draft-last``: a fourth view, the residual state at layer 27 of the draft's last token (chat text + draft);
- ``+both``: both draft views.

Drafts are ``--draft-tokens`` (16) greedy tokens of the unguarded SmolLM2 on the chat-formatted request (no
system prompt beyond the template's). Metrics as in :mod:`detector_retired_experiment`. Nothing here reads
``test``, ``fresh6`` or ``fresh7``.

**Rule, fixed before the run.** A draft arm is worth building if, averaged over the five left-out sets, its ``tpr``
is at least 0.02 above ``v13``'s, its pooled flagged share of harmless requests no more than 0.005 above, and its
``s_tpr@5`` not lower; among such arms the one with the highest ``s_tpr@5``. This decides only whether a draft
detector is built next; its claim would be one measurement on the unread ``fresh7``.

**Outcome (written after the run).** No draft arm is worth building: every one is worse than ``v13`` on the mean
``tpr`` (v13 0.930; +draft-encoder 0.887, +draft-last 0.913, +both 0.910), on AUROC (0.982 against 0.970-0.976)
and on ``s_tpr@5`` (0.933 against 0.860-0.900), at equal or higher pooled flagged shares of harmless requests
(0.053 against 0.053-0.080). The unguarded drafts mostly restate the request ("To hack into your ex's Instagram
account, you can use the following steps:") or open a code block, so they carry little the request views lack and
add the noise of the model's own phrasing; the drafts are in ``draft_examples`` of the result.

    OMP_NUM_THREADS=2 python scripts/detector_draft_experiment.py [--cache /tmp/draft]

About 23 minutes on 2 CPU cores (drafts and states; ``--cache`` keeps them for a rerun).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from detector_common import prompt_sets, write_result
from detector_extra3_experiment import BASE_NEG, BASE_POS, READ, V12_LAYERS, add_training_copies, left_out_sets
from detector_retired_experiment import LAYERS, beats, detector, print_means, retired_sets, view, view_pools
from safetensors.torch import load_file, save_file

from safeguard.adapters import CausalLMAdapter
from safeguard.steering.calibrate import greedy_replies
from safeguard.steering.reading import collect_states

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_draft.json"
DRAFT_LAYER = 27


def drafts_and_states(names: list[str], new_tokens: int, cache: Path | None) -> tuple[dict, dict, dict]:
    """``(drafts {set: [str]}, draft-last states {set: [1, N, d]}, draft embeddings {set: [1, N, 384]})``."""
    from safeguard.models import smollm2
    from safeguard.steering.encoder import SentenceEncoder

    text_file = cache / f"drafts{new_tokens}.json" if cache else None
    state_file = cache / f"draft{new_tokens}_states.safetensors" if cache else None
    if text_file and state_file and text_file.exists() and state_file.exists():
        drafts = json.loads(text_file.read_text())
        st = load_file(state_file)
        last = {k: st[f"last/{k}"] for k in names}
        emb = {k: st[f"encoder/{k}"] for k in names}
        return drafts, last, emb
    model, tok = smollm2()
    adapter = CausalLMAdapter(model, tok)
    _, layers = adapter.decoder_layers()
    enc = SentenceEncoder()
    drafts, last, emb = {}, {}, {}
    t0 = time.perf_counter()
    for name, prompts in prompt_sets(names).items():
        chats = [adapter.chat_text(p) for p in prompts]
        drafts[name] = greedy_replies(adapter, chats, new_tokens)
        texts = [c + d for c, d in zip(chats, drafts[name])]
        last[name] = collect_states(model, tok, texts, torch.nn.ModuleList([layers[DRAFT_LAYER]]))[0]
        emb[name] = enc.embed([d.strip() or "." for d in drafts[name]])[None]
        logging.info("drafted %s (%d prompts, %.0f s so far)", name, len(prompts), time.perf_counter() - t0)
    if text_file and state_file:
        text_file.write_text(json.dumps(drafts, indent=1))
        tensors = {f"last/{k}": v.contiguous() for k, v in last.items()}
        tensors |= {f"encoder/{k}": v.contiguous() for k, v in emb.items()}
        save_file(tensors, state_file)
    return drafts, last, emb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, help="folder to keep the request states, drafts and draft states in")
    ap.add_argument("--draft-tokens", type=int, default=16)
    args = ap.parse_args()
    LAYERS.update(last=V12_LAYERS[0], prompt=V12_LAYERS[1])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    val = ["val_harmful", "val_harmless"]
    read_names = [k for s in READ for side in retired_sets(s) for k in side]
    names = BASE_POS + BASE_NEG + val + read_names
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    pools = view_pools(args.cache / "request_states.safetensors" if args.cache else None, names)
    drafts, pools["draft_last"], pools["draft_encoder"] = drafts_and_states(names, args.draft_tokens, args.cache)
    add_training_copies(pools, read_names)
    base = ["last", "prompt", "encoder"]
    arms = {
        "v13": base,
        "+draft-encoder": [*base, "draft_encoder"],
        "+draft-last": [*base, "draft_last"],
        "+both": [*base, "draft_encoder", "draft_last"],
    }
    runs: dict[str, dict[str, dict[str, float]]] = {a: {} for a in arms}
    for held in READ:
        score, pos, neg = left_out_sets(held)
        views = {p: view(pools[p], pos, neg, score) for p in {p for v in arms.values() for p in v}}
        for arm, used in arms.items():
            runs[arm][held] = detector([views[p] for p in used], held)
        logging.info("%s left out: %s", held, {a: round(runs[a][held]["tpr"], 3) for a in arms})
    means = print_means(runs, 16)
    b = means["v13"]
    ok = [a for a in arms if a != "v13" and beats(means[a], b, tpr_gain=0.02)]
    chosen = max(ok, key=lambda a: means[a]["s_tpr@5"]) if ok else None
    print(f"\nworth building by the rule: {chosen}")
    examples = {  # a few drafts of the left-out harmful requests, to read what the view sees
        s: [{"request": r, "draft": d} for r, d in zip(prompt_sets([f"{s}_harmful"])[f"{s}_harmful"][:5], drafts[f"{s}_harmful"])]
        for s in READ
    }  # fmt: skip
    write_result(
        {
            "description": (
                "Leave-one-set-out over the read held-out sets fresh..fresh5: READING_VERSION 13's request-only "
                "detector recipe ('v13') against the same with views of the unguarded model's first "
                f"{args.draft_tokens} greedy reply tokens (MiniLM embedding of the draft, residual state at layer "
                f"{DRAFT_LAYER} of its last token). Rule: a draft arm is worth building if its mean tpr is >= 0.02 "
                "higher, its mean pooled harmless flagged share <= 0.005 higher and its mean s_tpr@5 not lower."
            ),
            "layers": LAYERS | {"draft_last": DRAFT_LAYER},
            "draft_tokens": args.draft_tokens,
            "runs": runs,
            "means": means,
            "worth_building": chosen,
            "draft_examples": examples,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
