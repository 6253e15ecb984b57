r"""Read and calibrate the RepE steering vectors shipped for SmolLM2-135M-Instruct.

Writes ``safeguard/models/weights/repe/<concept>-<method>/{vectors.safetensors,config.json}``
for the ``harmful`` concept (condition + refusal behaviour, calibrated on the train/val splits
of ``safeguard/data/llm``; the test split is never read) and for the ``violence`` topic.
Seeded and deterministic on CPU; about 34 minutes for ``harmful`` (most of it the behaviour search: 36 candidates
x 128 greedy replies, then 6 candidates x 240 extra training requests) and 3 for ``violence`` on 2 cores.

    python scripts/calibrate_repe.py [--concepts harmful violence] [--method mean_diff] [--reuse-behaviour FOLDER]

``--reuse-behaviour`` takes the behaviour search (layer 11 at 1.25) over from saved vectors when it provably had the
same inputs (bit-identical behaviour directions and scales, the same search prompts), which cuts ``harmful`` to about
13 minutes; the shipped READING_VERSION 10 vectors were made so from the version 8 ones
(``git show 37a48b0:safeguard/models/weights/repe/harmful-mean_diff/<file>`` into a folder).

The ``harmful`` detector (READING_VERSION 12) is chosen by validation + out-of-fold AUROC among ``last``, ``prompt``,
``both`` (the two residual-stream views of READING_VERSION 8 and 10) and ``both+encoder`` (the same two plus the
requests' MiniLM sentence embeddings, added after ``scripts/detector_encoder_experiment.py``), trained with both
training-only files and the four retired held-out sets less their exclusions (the choice of
``scripts/detector_retired_experiment.py``; version 11 read the first file only: ``--extra-data extra --extra-scary
extra``) at LDA shrinkage 0.3, the choice of ``scripts/detector_negatives_experiment.py``; the calibration adds the
release window (layers 8-14, ``scripts/release_experiment.py``). ``--no-encoder`` leaves the encoder view out. Experiments (``harmful`` only; write them elsewhere with ``--out``, never over
the shipped folder): ``--extra-data`` / ``--extra-scary`` name the files whose pairs / scary-word prompts to use
(none: the flag alone), ``--lda-shrinkage`` changes the shrinkage and ``--detector`` fixes the view; the detectors of
READING_VERSION 9 (``scripts/detector_breadth_experiment.py``'s choice, withdrawn) and 7 are

    python scripts/calibrate_repe.py --concepts harmful --extra-data extra extra2 --detector prompt --out /tmp/repe-v9
    python scripts/calibrate_repe.py --concepts harmful --extra-data --extra-scary --lda-shrinkage 0.7 --detector auto \
        --out /tmp/repe-v7
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
from safeguard.steering.build import (
    DETECTOR,
    EXTRA_DATA,
    EXTRA_SCARY,
    HEAD_DROPOUT,
    LDA_SHRINKAGE,
    SHIPPED_DIR,
    WRAPPED_PAIRS,
    read_vectors,
)
from safeguard.steering.data import EXTRA, RETIRED
from safeguard.steering.detector import DETECTORS
from safeguard.steering.vectors import SteeringVectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", nargs="+", default=["harmful", "violence"])
    ap.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"])
    ap.add_argument("--out", default=str(SHIPPED_DIR), help="folder for <concept>-<method>/ (default: shipped)")
    for flag, default, what in (
        ("--extra-data", EXTRA_DATA, "pairs"),
        ("--extra-scary", EXTRA_SCARY, "scary-word prompts"),
    ):
        ap.add_argument(
            flag,
            nargs="*",
            default=list(default),
            choices=[*EXTRA, *RETIRED],
            help=f"harmful: the training-only files (and retired held-out sets) whose {what} the detector also reads "
            "(none: the flag alone)",
        )
    ap.add_argument(
        "--reuse-behaviour",
        metavar="FOLDER",
        help="harmful: saved vectors whose behaviour search to take over if its inputs are provably the same "
        "(identical behaviour directions and search prompts; otherwise the search runs)",
    )
    ap.add_argument(
        "--detector", default=DETECTOR or "auto", choices=[*DETECTORS, "auto"], help="harmful: the detector view"
    )
    ap.add_argument("--lda-shrinkage", type=float, default=LDA_SHRINKAGE, help="harmful: condition LDA shrinkage")
    ap.add_argument(
        "--no-encoder", action="store_true", help="harmful: leave out the sentence-encoder view (READING_VERSION 10)"
    )
    ap.add_argument(
        "--no-head", action="store_true", help="harmful: leave out the learned head (the 'mlp' detector, version 14)"
    )
    ap.add_argument(
        "--wrapped", type=int, default=WRAPPED_PAIRS, help="harmful: training pairs also read inside task wrappers"
    )
    ap.add_argument(
        "--head-dropout", type=float, default=HEAD_DROPOUT, help="harmful: input dropout of the detector head's fit"
    )
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
            extra_data=tuple(args.extra_data),
            extra_scary=tuple(args.extra_scary),
            detector=None if args.detector == "auto" else args.detector,
            reuse_behaviour=SteeringVectors.load(args.reuse_behaviour) if args.reuse_behaviour else None,
            lda_shrinkage=args.lda_shrinkage,
            encoder=not args.no_encoder,
            head=not args.no_head,
            wrapped=args.wrapped,
            head_dropout=args.head_dropout,
        )
        vecs.meta["reading_seconds"] = round(time.perf_counter() - t0, 1)
        folder = vecs.save(Path(args.out) / f"{concept.name}-{args.method}")
        cal = {k: v for k, v in vecs.calibration.items() if not k.endswith("_table")}
        logging.info("%s: %s (%.0f s) -> %s", concept.name, json.dumps(cal), vecs.meta["reading_seconds"], folder)


if __name__ == "__main__":
    main()
