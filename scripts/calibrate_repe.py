"""Read and calibrate the RepE steering vectors shipped for SmolLM2-135M-Instruct.

Writes ``safeguard/models/weights/repe/<concept>-<method>/{vectors.safetensors,config.json}``
for the ``harmful`` concept (condition + refusal behaviour, calibrated on the train/val splits
of ``safeguard/data/llm``; the test split is never read) and for the ``violence`` topic.
Seeded and deterministic on CPU; about 34 minutes for ``harmful`` (most of it the behaviour search: 36 candidates
x 128 greedy replies, then 6 candidates x 240 extra training requests) and 3 for ``violence`` on 2 cores.

    python scripts/calibrate_repe.py [--concepts harmful violence] [--method mean_diff]

The ``harmful`` detector is trained with the extra training data (240 pairs and 200 scary-word harmless
prompts) at LDA shrinkage 0.3, the choice of ``scripts/detector_negatives_experiment.py``. Experiments
(``harmful`` only; write them elsewhere with ``--out``, never over the shipped folder): ``--no-extra-data``
drops the extra data and ``--lda-shrinkage`` changes the shrinkage; the detector shipped before
READING_VERSION 8 is

    python scripts/calibrate_repe.py --concepts harmful --no-extra-data --lda-shrinkage 0.7 --out /tmp/repe-old
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
from safeguard.models import smollm2
from safeguard.steering.build import LDA_SHRINKAGE, SHIPPED_DIR, read_vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", nargs="+", default=["harmful", "violence"])
    ap.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"])
    ap.add_argument("--out", default=str(SHIPPED_DIR), help="folder for <concept>-<method>/ (default: shipped)")
    ap.add_argument(
        "--no-extra-data",
        dest="extra_data",
        action="store_false",
        help="harmful: the detector without the extra training pairs and scary-word prompts (before version 8)",
    )
    ap.add_argument("--lda-shrinkage", type=float, default=LDA_SHRINKAGE, help="harmful: condition LDA shrinkage")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model, tok = smollm2()
    adapter = CausalLMAdapter(model, tok)
    for concept in resolve_concepts(args.concepts):
        t0 = time.perf_counter()
        vecs = read_vectors(
            adapter,
            concept,
            method=args.method,
            progress=True,
            extra_data=args.extra_data,
            lda_shrinkage=args.lda_shrinkage,
        )
        vecs.meta["reading_seconds"] = round(time.perf_counter() - t0, 1)
        folder = vecs.save(Path(args.out) / f"{concept.name}-{args.method}")
        cal = {k: v for k, v in vecs.calibration.items() if not k.endswith("_table")}
        logging.info("%s: %s (%.0f s) -> %s", concept.name, json.dumps(cal), vecs.meta["reading_seconds"], folder)


if __name__ == "__main__":
    main()
