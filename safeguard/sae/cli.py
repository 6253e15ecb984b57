"""``python -m safeguard sae ...``: collect activations and train TopK SAEs.

Examples:
    python -m safeguard sae modules --model shapes
    python -m safeguard sae collect --model shapes --module text_encoder.encoder.layer.4 --prompts 1000 \\
        --out runs/sae/te4
    python -m safeguard sae train --model shapes --module text_encoder.encoder.layer.4 --acts runs/sae/te4 \\
        --expansion 4 --k 32 --steps 2000 --out runs/sae/te4/sae

``train`` collects first when the ``--acts`` folder holds no complete collection (then ``--module``
is needed). Prompts: ``--prompt-file`` (one per line) or, by default, ``--prompts N`` seeded
captions from the ShapesWorld training templates (also used for ``--model PATH`` without a file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def shapes_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` ShapesWorld training captions (training templates and words only), a pure function of ``seed``."""
    import numpy as np

    from ..models.shapesworld.captions import caption
    from ..models.shapesworld.world import sample_specs

    rng = np.random.default_rng(seed + 1)
    return [caption(spec, rng) for spec in sample_specs(n, seed)]


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise SystemExit(f"--prompt-file {args.prompt_file!r} holds no prompts")
        return prompts[: args.prompts] if args.prompts else prompts
    return shapes_prompts(args.prompts, args.seed)


def _collect(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ..cli import load_pipeline
    from .activations import collect_activations

    if not args.module:
        raise SystemExit("--module is needed to collect activations, e.g. --module text_encoder.encoder.layer.4")
    pipe = load_pipeline(args.model, _device(args.device))
    return collect_activations(
        pipe,
        args.module,
        _prompts(args),
        out,
        chunk_rows=args.chunk_rows,
        steps=args.denoise_steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.prompt_batch,
        max_rows=args.max_rows,
        model=args.model,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def _summary(meta: dict[str, Any]) -> str:
    keys = ("module", "kind", "d", "rows", "prompts", "model")
    return json.dumps({k: meta.get(k) for k in keys} | {"chunks": len(meta.get("chunks", []))})


def cmd_collect(args: argparse.Namespace) -> int:
    meta = _collect(args, Path(args.out))
    print(_summary(meta))
    print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .activations import ActivationDataset, read_meta
    from .trainer import TrainConfig, train_sae

    if args.acts is None and args.out is None:
        raise SystemExit("give --acts (activation folder) and/or --out (SAE folder)")
    acts = Path(args.acts) if args.acts else Path(args.out) / "activations"
    out = Path(args.out) if args.out else acts / "sae"
    meta = read_meta(acts) if acts.is_dir() else None
    if meta is None or not meta.get("complete"):
        meta = _collect(args, acts)
    elif args.module and meta.get("module") != args.module:
        raise SystemExit(
            f"--acts {str(acts)!r} holds activations of {meta.get('module')!r}, not --module {args.module!r}; "
            "use another --acts folder"
        )
    print(_summary(meta))
    cfg = TrainConfig(
        expansion_factor=args.expansion,
        k=args.k,
        num_latents=args.num_latents,
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.steps,
        epochs=args.epochs,
        auxk_alpha=args.auxk_alpha,
        dead_rows=args.dead_rows,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        device=_device(args.device),
    )
    dataset = ActivationDataset(acts, holdout=args.holdout)
    result = train_sae(dataset, cfg, out, resume=not args.no_resume, progress=not args.quiet)
    print(json.dumps(result.metrics, indent=2))
    m = result.metrics
    print(
        f"held-out FVU {m['fvu']:.4f}, dead latents {100 * m['dead_share']:.1f}% "
        f"(never active on held-out rows: {100 * m['heldout_dead_share']:.1f}%), L0 {m['l0']:.1f}"
    )
    print(f"wrote {out}")
    return 0


def cmd_modules(args: argparse.Namespace) -> int:
    from ..cli import load_pipeline
    from .activations import list_modules

    pipe = load_pipeline(args.model, _device(args.device))
    for name in list_modules(pipe, args.depth):
        print(name)
    return 0


def _collect_args(p: argparse.ArgumentParser, module_required: bool) -> None:
    p.add_argument("--model", default="shapes", help="'shapes' (embedded ShapesWorld) or a local diffusers folder")
    p.add_argument(
        "--module",
        required=module_required,
        help="dotted module path, e.g. text_encoder.encoder.layer.4 or unet.up_blocks.1.attentions.0",
    )
    p.add_argument("--prompts", type=int, default=1000, help="number of prompts (ShapesWorld captions by default)")
    p.add_argument("--prompt-file", default=None, help="text file, one prompt per line (instead of ShapesWorld)")
    p.add_argument("--denoise-steps", type=int, default=None, help="denoiser modules: inference steps")
    p.add_argument("--guidance", type=float, default=None, help="denoiser modules: guidance scale")
    p.add_argument("--prompt-batch", type=int, default=16, help="prompts per pipeline call")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows per chunk file")
    p.add_argument("--max-rows", type=int, default=None, help="stop collecting after this many rows")
    p.add_argument("--overwrite", action="store_true", help="replace a complete collection with other settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda'...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_sae_parser(sub: Any) -> None:
    """Register ``sae collect`` / ``sae train`` / ``sae modules`` on the top-level subparsers."""
    s = sub.add_parser(
        "sae",
        help="collect activations and train TopK sparse autoencoders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = s.add_subparsers(dest="sae_command", required=True)

    c = ssub.add_parser("collect", help="stream a module's activations to chunk files")
    _collect_args(c, module_required=True)
    c.add_argument("--out", required=True, help="activation folder")
    c.set_defaults(fn=cmd_collect)

    t = ssub.add_parser("train", help="train a TopK SAE (collecting the activations first if needed)")
    _collect_args(t, module_required=False)
    t.add_argument("--acts", default=None, help="activation folder (default: OUT/activations)")
    t.add_argument("--out", default=None, help="SAE folder (default: ACTS/sae)")
    t.add_argument("--expansion", type=float, default=4, help="num_latents = d_in * expansion")
    t.add_argument("--num-latents", type=int, default=None, help="dictionary size (overrides --expansion)")
    t.add_argument("--k", type=int, default=32, help="active latents per row")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=4096, help="rows per step")
    t.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(num_latents / 16384)")
    t.add_argument("--auxk-alpha", type=float, default=1 / 32)
    t.add_argument("--dead-rows", type=int, default=None, help="dead after this many rows without firing")
    t.add_argument("--holdout", type=float, default=0.05, help="share of rows held out for the final FVU")
    t.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    t.set_defaults(fn=cmd_train)

    m = ssub.add_parser("modules", help="list the text-encoder and denoiser modules of a pipeline")
    m.add_argument("--model", default="shapes")
    m.add_argument("--depth", type=int, default=3, help="deepest module path shown (dots)")
    m.add_argument("--device", default="cpu")
    m.set_defaults(fn=cmd_modules)
