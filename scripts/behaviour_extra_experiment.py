"""Which refusal behaviour generalises beyond the calibration prompts? Candidates on the 240 extra training requests.

The shipped ``harmful`` vectors add the behaviour vector at one layer and strength chosen by
:func:`safeguard.steering.calibrate.select_behaviour` on the 128 training + validation harmful requests
(layer 11 at 1.5 refuses all 128 there). That set is saturated, so it cannot rank the best candidates. This
script scores a few of them on the 240 extra training-only harmful requests
(``harmful_harmless_pairs_extra.json``; never validation or test), with both judges of the evaluation
(refusal phrase; MiniLM first-sentence similarity to refusal exemplars, with the topic control) and the
distinct-word ratio the calibration uses for coherence. Nothing here is shipped or chooses anything; it says
what a two-stage search (saturated first stage, then the extra pool) could pick.

    python scripts/behaviour_extra_experiment.py [--out benchmarks/results/eval/repe_behaviour_extra.json]

About 10 minutes on 2 CPU cores (9 candidates x 240 greedy 32-token replies).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from safeguard.adapters import CausalLMAdapter
from safeguard.concepts import resolve_concepts
from safeguard.eval.llm import MiniLMRefusalJudge, is_refusal_phrase
from safeguard.models import smollm2
from safeguard.steering import data
from safeguard.steering.build import SHIPPED_DIR
from safeguard.steering.calibrate import _steered, distinct_ratio, greedy_replies
from safeguard.steering.vectors import SteeringVectors

CANDIDATES = [((11,), 1.5), ((11,), 1.25), ((11,), 1.75), ((12,), 1.5), ((12,), 2.0), ((10,), 2.0),
              ((11, 12), 0.75), ((11, 12), 1.0), ((12,), 1.75)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval/repe_behaviour_extra.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model, tok = smollm2()
    adapter = CausalLMAdapter(model, tok)
    concept = resolve_concepts(["harmful"])[0]
    vecs = SteeringVectors.load(SHIPPED_DIR / "harmful-mean_diff")
    requests = [p["harmful"] for p in data.extra_pairs()]
    prompts = [adapter.chat_text(p) for p in requests]
    judge = MiniLMRefusalJudge()
    rows = []
    for layers, strength in CANDIDATES:
        t0 = time.perf_counter()
        with _steered(adapter, vecs, concept, mode="add", layers=layers, strength=strength):
            replies = greedy_replies(adapter, prompts, 32)
        phrase = [is_refusal_phrase(r) for r in replies]
        minilm = judge(replies, requests)
        row = dict(
            layers=list(layers), strength=strength, refusal_phrase=sum(phrase) / len(phrase),
            refusal_minilm=sum(minilm) / len(minilm), refusal_both=sum(a and b for a, b in zip(phrase, minilm)) / len(phrase),
            distinct=sum(map(distinct_ratio, replies)) / len(replies), seconds=round(time.perf_counter() - t0, 1),
        )  # fmt: skip
        logging.info(json.dumps(row))
        rows.append(row | {"replies": replies})
    shipped = {k: vecs.calibration[k] for k in ("layers", "strength")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"requests": len(requests), "shipped": shipped, "candidates": rows}, indent=1))
    logging.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
