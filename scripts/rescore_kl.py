"""Rescore the KL of saved ``harmful`` evaluations with the evaluation's current teacher-forced scoring.

Until READING_VERSION 16's measurements the evaluation scored the unguarded model's harmless replies in one forward
over prompt + reply (right padding). A conditional guard then saw prompt + reply as its prompt: its detector decided
from both, and release (``release_tokens`` since v16) ablated every reply token, not only the reply's first
tokens as in generation. :func:`safeguard.eval.llm.reply_token_logprobs` now scores as ``generate`` runs (the prompt,
then the reply on the KV cache; ``tests/test_repe.py`` checks it against ``generate``'s own scores). This script
reads the prompts and unguarded replies saved in evaluation JSONs and recomputes ``KL(unguarded || guarded)`` on the
harmless ones with the given vectors, next to the value the JSON recorded.

    OMP_NUM_THREADS=2 python scripts/rescore_kl.py benchmarks/results/eval/llm_repe_harmful_fresh11.json ... \
        [--vectors FOLDER] [--out benchmarks/results/eval/repe_kl_rescored.json]

Run for v16 (then the shipped vectors; since READING_VERSION 17 a folder of ``git show 8c2fb75:...``, its evaluations
moved to ``repe_v16/``) on its fresh11, fresh12 and test evaluations, and for v15 (``--vectors`` a folder
of ``git show 2d5aa00:safeguard/models/weights/repe/harmful-mean_diff/<file>``, ``--label v15``) on
``repe_v15/llm_repe_harmful_fresh10.json`` and ``repe_v15/llm_repe_harmful.json``. About a minute a set on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from detector_common import write_result

import safeguard
from safeguard.eval.llm import mean_kl, reply_token_logprobs
from safeguard.models import smollm2

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_kl_rescored.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", type=Path, nargs="+", help="evaluation JSONs (harmful concept, repe)")
    ap.add_argument("--vectors", default=None, help="vectors folder (default: the shipped ones)")
    ap.add_argument("--label", default="v16", help="name of the vectors in the output")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = smollm2()
    options = {"vectors": args.vectors} if args.vectors else {}
    safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe", **options)
    old = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = [r for r in old["rows"] if r["label"] != args.label or r["eval"] not in {str(e) for e in args.evals}]
    for path in args.evals:
        d = json.loads(path.read_text())
        prompts = d["prompts"]["harmless"] + d["prompts"]["harmless_scary"]
        replies = d["replies"]["unguarded"]["harmless"] + d["replies"]["unguarded"]["harmless_scary"]
        with safeguard.disabled(model):
            ref = reply_token_logprobs(model, tok, prompts, replies)
        new = reply_token_logprobs(model, tok, prompts, replies)
        row = {"label": args.label, "eval": str(path), "split": d.get("split"), "n": len(prompts),
               "kl_recorded": round(d["metrics"]["kl_harmless"], 4), "kl_rescored": round(mean_kl(ref, new), 4)}  # fmt: skip
        print(row)
        rows.append(row)
    safeguard.unwrap(model)
    result = {
        "description": (
            "KL(unguarded || guarded) on the harmless prompts of saved evaluations, over the unguarded replies: as "
            "recorded (one forward over prompt + reply) and rescored as generate runs (prompt, then reply on the KV cache)."
        ),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
