"""Command line: ``python -m safeguard <command>``.

Commands:
    generate   one prompt, unguarded and guarded from the same seed, side by side in a PNG
    eval       the ShapesWorld safety evaluation harness (erasure, ASR, preservation, latency)
    methods    list the registered defenses and their options
    concepts   list the built-in concept sets
    sae        collect activations and train TopK sparse autoencoders (sae collect / train / modules)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["preset=strong", "sld_scale=100", "release=False"]`` -> ``{"preset": "strong", "sld_scale": 100,
    "release": False}``: values are JSON, and Python's ``True`` / ``False`` / ``None`` are accepted too."""
    python_literals = {"True": True, "False": False, "None": None}
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE, e.g. --option preset=strong")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = python_literals.get(value, value)
    return out


def load_pipeline(model: str, device: str = "cpu"):
    import torch

    from .models import shapes_pipeline

    if model == "shapes":
        return shapes_pipeline(device=device)
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True, use_safetensors=True).to(
        device
    )


def side_by_side(images: list, labels: list[str], scale: int = 4):
    """Images in a row, upscaled with nearest neighbour, each with a caption strip."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    w2, h2 = w * scale, h * scale
    strip = 18
    canvas = Image.new("RGB", (w2 * len(images), h2 + strip), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels)):
        canvas.paste(img.resize((w2, h2), Image.Resampling.NEAREST), (i * w2, strip))
        draw.text((i * w2 + 4, 3), label, fill="black")
    return canvas


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import safeguard

    pipe = load_pipeline(args.model, args.device)
    call: dict[str, Any] = {"prompt": args.prompt}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance

    def gen():
        t0 = time.perf_counter()
        img = pipe(**call, generator=torch.Generator(args.device).manual_seed(args.seed)).images[0]
        return img, time.perf_counter() - t0

    plain, t_plain = gen()
    safeguard.wrap(pipe, concepts=args.concepts, method=args.method, **parse_options(args.option))
    guarded, t_guard = gen()
    report = safeguard.last_report(pipe)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = ["unguarded", f"guarded: {args.method or 'default'}"]
    side_by_side([plain, guarded], labels).save(out)
    print(f"prompt: {args.prompt!r}  concepts: {args.concepts}  seed: {args.seed}")
    print(report.summary() if report else "no report")
    print(f"time: unguarded {t_plain:.2f} s, guarded {t_guard:.2f} s (ratio {t_guard / max(t_plain, 1e-9):.2f})")
    if args.model == "shapes":
        from .eval.judge import ShapesJudge

        judge = ShapesJudge()
        for name, img in (("unguarded", plain), ("guarded", guarded)):
            print(f"judge, {name}: {judge.read(img).describe()}")
    print(f"wrote {out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .core.registry import available_methods, get_defense_class

    for name in available_methods():
        cls = get_defense_class(name)
        print(f"{name}: families {list(cls.families)}; options {cls.config_class.option_names()}")
    return 0


def cmd_concepts(args: argparse.Namespace) -> int:
    from .concepts import BUILTIN

    for name, phrases in sorted(BUILTIN.items()):
        print(f"{name}: {', '.join(phrases)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safeguard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="unguarded vs guarded image from the same seed")
    g.add_argument("prompt")
    g.add_argument("--concepts", nargs="+", required=True, help="built-in set names or free text")
    g.add_argument("--method", default=None, help="defense name (default: strongest available)")
    g.add_argument("--option", action="append", default=[], help="defense option KEY=VALUE (repeatable)")
    g.add_argument("--model", default="shapes", help="'shapes' (embedded) or a local diffusers pipeline folder")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--out", default="safeguard_generate.png")
    g.set_defaults(fn=cmd_generate)
    sub.add_parser("methods", help="registered defenses").set_defaults(fn=cmd_methods)
    sub.add_parser("concepts", help="built-in concept sets").set_defaults(fn=cmd_concepts)
    try:
        from .eval.harness import add_eval_parser

        add_eval_parser(sub)
    except ImportError:
        pass
    from .sae.cli import add_sae_parser

    add_sae_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core.errors import SafeguardError

    try:
        return int(args.fn(args) or 0)
    except SafeguardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
