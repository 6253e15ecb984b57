"""Would a weaker refusal push let SmolLM2's own judgement spare the harmless requests the detector flags?

READING_VERSION 13 refuses every flagged request alike: the behaviour vector at layer 11, strength 1.25, chosen on
harmful requests only. On its untouched sets fresh6 and fresh7 the detector flagged 32 of the 160 matched harmless
requests, and the guard refused all 32. If at some lower strength the model still refused the flagged harmful
requests but not the flagged harmless ones, a weaker (or score-graded) push would cut over-refusal without a better
detector. This script steers exactly the rows READING_VERSION 13's evaluations flagged on fresh6 and fresh7 (the
``fired`` lists of ``repe_v13/llm_repe_harmful_fresh6.json`` / ``_fresh7.json``: 132 harmful, 32 matched harmless requests)
with ``add`` at layer 11 and strengths 0.5, 0.75, 1.0 and 1.25, greedy 32-token replies, refusal-phrase judge.

**Outcome.** No: the flagged harmless requests are refused at least as often as the flagged harmful ones at every
strength (0.5: 0.598 harmful / 0.625 harmless; 0.75: 0.780 / 0.906; 1.0: 0.924 / 0.938; 1.25: 0.977 / 1.000).
The requests the detector confuses are ones the model itself treats as harmful, so the push strength cannot
separate them. Both sets had been read by v13's evaluations before this ran; nothing here reads fresh8.

    OMP_NUM_THREADS=2 python scripts/flagged_strength_experiment.py

About 2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from detector_common import write_result

from safeguard.adapters import CausalLMAdapter
from safeguard.concepts import resolve_concepts
from safeguard.eval.llm import is_refusal_phrase
from safeguard.models import smollm2
from safeguard.steering.build import SHIPPED_DIR
from safeguard.steering.calibrate import _steered, greedy_replies
from safeguard.steering.vectors import SteeringVectors

EVAL = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "eval"
SETS = ("fresh6", "fresh7")
STRENGTHS = (0.5, 0.75, 1.0, 1.25)
LAYER, TOKENS = 11, 32


def flagged_requests() -> dict[str, list[str]]:
    """The harmful and matched harmless requests READING_VERSION 13's evaluations of :data:`SETS` flagged."""
    rows: dict[str, list[str]] = {"harmful": [], "harmless": []}
    for split in SETS:
        result = json.loads((EVAL / "repe_v13" / f"llm_repe_harmful_{split}.json").read_text())
        for kind in rows:
            rows[kind] += [p for p, fired in zip(result["prompts"][kind], result["fired"][kind]) if fired]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=EVAL / "repe_flagged_strength.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = smollm2()
    adapter = CausalLMAdapter(model, tok)
    concept = resolve_concepts(["harmful"])[0]
    vecs = SteeringVectors.load(SHIPPED_DIR / "harmful-mean_diff")
    rows = flagged_requests()
    refused: dict[str, dict[str, float]] = {}
    for strength in STRENGTHS:
        refused[str(strength)] = {}
        with _steered(adapter, vecs, concept, mode="add", layers=(LAYER,), strength=strength):
            for kind, requests in rows.items():
                replies = greedy_replies(adapter, [adapter.chat_text(r) for r in requests], TOKENS)
                refused[str(strength)][kind] = sum(map(is_refusal_phrase, replies)) / len(replies)
        print(f"strength {strength}: refused " + ", ".join(f"{k} {v:.3f}" for k, v in refused[str(strength)].items()))
    write_result(
        {
            "description": (
                "Refusal-phrase rate of the requests READING_VERSION 13 flagged on fresh6 and fresh7, steered with "
                f"add at layer {LAYER} and each strength (greedy, {TOKENS} tokens): does a weaker push spare the "
                "flagged harmless requests?"
            ),
            "counts": {k: len(v) for k, v in rows.items()},
            "refused": refused,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
