"""Train the two SAEs shipped for the ShapesWorld model and copy them into the package.

- ``text``: ``text_encoder.encoder.layer.4`` (MiniLM layer 5 of 6, per token), 4x (1536 latents),
  k = 32, on 1000 ShapesWorld training captions;
- ``unet``: ``unet.up_blocks.1.attentions.1`` (SAeUron's block; 128 channels at 4x4), 4x (512
  latents), k = 32, on 200 captions x 20 denoising steps, conditional branch only.

Each lands in ``safeguard/models/weights/sae/<name>/`` as ``cfg.json`` + ``sae.safetensors``
(float16, sparsify layout) + ``metrics.json`` (held-out FVU, dead share, L0). Seeded; about
4 minutes on 2 CPU cores. Intermediate activations and checkpoints go to ``runs/sae/``.

    python scripts/train_shapes_saes.py [--only text|unet]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from safeguard.cli import main as cli
from safeguard.sae import load_sae, save_sae

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "safeguard" / "models" / "weights" / "sae"
RUNS = ROOT / "runs" / "sae"

JOBS = {
    "text": ["--module", "text_encoder.encoder.layer.4", "--prompts", "1000", "--expansion", "4", "--k", "32",
             "--steps", "600", "--batch-size", "1024"],
    "unet": ["--module", "unet.up_blocks.1.attentions.1", "--prompts", "200", "--expansion", "4", "--k", "32",
             "--steps", "1200", "--batch-size", "4096"],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(JOBS), default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, extra in JOBS.items():
        if args.only and name != args.only:
            continue
        run = RUNS / name
        cli(
            [
                "sae",
                "train",
                "--model",
                "shapes",
                "--seed",
                "0",
                "--acts",
                str(run / "acts"),
                "--out",
                str(run / "sae"),
                *extra,
            ]
        )
        sae = load_sae(run / "sae").half()
        dest = SHIPPED / name
        save_sae(sae, dest)
        metrics = json.loads((run / "sae" / "metrics.json").read_text())
        (dest / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        shutil.copy(run / "acts" / "meta.json", dest / "activations_meta.json")


if __name__ == "__main__":
    main()
