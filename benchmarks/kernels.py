"""Speed of each fused kernel (``safeguard.kernels``) against its eager reference, at the sizes the defenses meet.

Cases (shapes as the defenses see them):

- ``sld_guidance``: the noise predictions of one guided step; ShapesWorld batch 8 (``[8, 4, 8, 8]``), SD 1.5 at
  512x512 batch 1 and 4 (``[B, 4, 64, 64]``), SDXL at 1024x1024 batch 1 (``[1, 4, 128, 128]``);
- ``ablate_rows``: the residual stream of one decoder layer; SmolLM2 (hidden 576) decode at batch 1 and 8 and a
  64-token prefill at batch 8, and a Llama-3-8B-sized layer (hidden 4096) decode at batch 1 and 8.

For each case and path: warm-up, then ``--reps`` timings of ``--iters`` back-to-back calls (CUDA: synchronised
before and after), reported as microseconds per call (median, min, max over repetitions), the speed-up of the fused
path (eager median / fused median) and the largest absolute difference between the two outputs.

The fused path runs where ``safeguard.kernels.use_triton`` allows: CUDA tensors with ``triton`` installed. On a CPU
only the eager path is timed (Triton's CPU interpreter is for parity tests, not speed), and the fused columns say
why they are empty.

    python benchmarks/kernels.py                     # the device's default (cuda if available, else cpu)
    python benchmarks/kernels.py --device cuda --dtype fp16
    python benchmarks/kernels.py --quick             # two small cases, few repetitions (CI smoke run)

Writes ``kernels.json``, ``kernels.csv`` and ``kernels.md`` under ``--out`` (default
``benchmarks/results/<machine-tag>/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # benchmark the checkout this script lives in
    sys.path.insert(0, str(REPO))

SCHEMA = "safeguard.benchmarks.kernels/1"
CSV_COLUMNS = (
    "kernel", "case", "shape", "dtype", "device", "eager_us", "eager_us_min", "eager_us_max",
    "fused_us", "fused_us_min", "fused_us_max", "speedup", "max_abs_diff", "fused_path",
)  # fmt: skip
SLD = dict(sld_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
CASES = (
    ("sld_guidance", "ShapesWorld b8", (8, 4, 8, 8)),
    ("sld_guidance", "SD 1.5 512px b1", (1, 4, 64, 64)),
    ("sld_guidance", "SD 1.5 512px b4", (4, 4, 64, 64)),
    ("sld_guidance", "SDXL 1024px b1", (1, 4, 128, 128)),
    ("ablate_rows", "SmolLM2 decode b1", (1, 1, 576)),
    ("ablate_rows", "SmolLM2 decode b8", (8, 1, 576)),
    ("ablate_rows", "SmolLM2 prefill b8x64", (8, 64, 576)),
    ("ablate_rows", "8B-size decode b1", (1, 1, 4096)),
    ("ablate_rows", "8B-size decode b8", (8, 1, 4096)),
)
QUICK_CASES = (CASES[0], CASES[5])


def _latency() -> Any:
    """benchmarks/latency.py (not a package) for its machine facts, tag and file helpers."""
    name = "safeguard_benchmark_latency"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "latency.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_inputs(kernel: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    if kernel == "sld_guidance":
        return tuple((torch.randn(shape, generator=g) * 0.02).to(device, dtype) for _ in range(4))
    h = (torch.randn(shape, generator=g) * 4).to(device, dtype)
    unit = torch.nn.functional.normalize(torch.randn(shape[-1], generator=g), dim=0).to(device, dtype)
    gate = (torch.rand(shape[0], shape[1], 1, generator=g) > 0.1).to(device, dtype)
    return h, unit, gate


def runner(kernel: str, inputs: tuple, fused: bool) -> Callable[[], Any]:
    from safeguard import kernels

    if kernel == "sld_guidance":
        fn = kernels.sld_guidance if fused else kernels.sld_guidance_eager
        u, c, k, m = inputs
        return lambda: fn(u, c, k, m, **SLD)[0]
    fn = kernels.ablate_rows if fused else kernels.ablate_rows_eager
    h, unit, gate = inputs
    return lambda: fn(h, unit, 1.0, gate)


def time_call(fn: Callable[[], Any], device: torch.device, iters: int, reps: int, warmup: int) -> list[float]:
    """Microseconds per call, one number per repetition of ``iters`` back-to-back calls."""
    sync = _latency()._sync
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / iters * 1e6)
    return out


def _mmm(values: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def bench_case(kernel: str, case: str, shape: tuple, device: torch.device, dtype: torch.dtype, args) -> dict:
    from safeguard.kernels import use_triton

    inputs = make_inputs(kernel, shape, device, dtype)
    row: dict[str, Any] = dict(kernel=kernel, case=case, shape=list(shape))
    row["eager_us"] = _mmm(time_call(runner(kernel, inputs, False), device, args.iters, args.reps, args.warmup))
    if use_triton(inputs[0]) and device.type == "cuda":
        row["fused_path"] = "triton"
        row["fused_us"] = _mmm(time_call(runner(kernel, inputs, True), device, args.iters, args.reps, args.warmup))
        row["speedup"] = row["eager_us"]["median"] / row["fused_us"]["median"]
        diff = (runner(kernel, inputs, True)().float() - runner(kernel, inputs, False)().float()).abs().max()
        row["max_abs_diff"] = float(diff)
    else:
        from safeguard.kernels import kernels_disabled, triton_available

        row["fused_path"] = (
            "disabled (SAFEGUARD_DISABLE_KERNELS)"
            if kernels_disabled()
            else "triton not installed"
            if not triton_available()
            else f"not timed on {device.type} (the Triton path runs on CUDA)"
        )
        row["fused_us"] = row["speedup"] = row["max_abs_diff"] = None
    return row


def csv_rows(data: dict) -> list[dict]:
    rows = []
    for r in data["rows"]:
        f = r["fused_us"] or {}
        rows.append(dict(
            kernel=r["kernel"], case=r["case"], shape="x".join(map(str, r["shape"])), dtype=data["settings"]["dtype"],
            device=data["settings"]["device"], eager_us=r["eager_us"]["median"], eager_us_min=r["eager_us"]["min"],
            eager_us_max=r["eager_us"]["max"], fused_us=f.get("median", ""), fused_us_min=f.get("min", ""),
            fused_us_max=f.get("max", ""), speedup="" if r["speedup"] is None else r["speedup"],
            max_abs_diff="" if r["max_abs_diff"] is None else r["max_abs_diff"], fused_path=r["fused_path"],
        ))  # fmt: skip
    return rows


def render_markdown(data: dict) -> str:
    s, m = data["settings"], data["machine"]
    lines = [
        f"# safeguard fused kernels: {m['tag']}",
        "",
        f"{m['device_name']} ({m['device']}), torch {m['torch']}, triton {s['triton'] or 'not installed'}; "
        f"dtype {s['dtype']}; {s['reps']} repetitions of {s['iters']} calls after {s['warmup']} warm-up calls"
        + (", **quick mode**" if s["quick"] else "")
        + f"; {m['date']}. Microseconds per call: median (min-max); speed-up = eager / fused.",
        "",
        "| kernel | case | shape | eager us | fused us | speed-up | max abs diff | fused path |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        e, f = r["eager_us"], r["fused_us"]
        fused = f"{f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f})" if f else "-"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}"
        lines.append(
            f"| `{r['kernel']}` | {r['case']} | {'x'.join(map(str, r['shape']))} | "
            f"{e['median']:.1f} ({e['min']:.1f}-{e['max']:.1f}) | {fused} | {speedup} | {diff} | {r['fused_path']} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(data: dict, out: Path, *, json_too: bool = True) -> None:
    _latency().write_result_files(data, out, "kernels", csv_rows(data), CSV_COLUMNS, render_markdown(data),
                                  json_too=json_too)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    lat = _latency()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(lat.DTYPES))
    p.add_argument("--reps", type=int, help="repetitions (default 7; quick 2)")
    p.add_argument("--iters", type=int, help="calls per repetition (default 200; quick 5)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per case and path (default 10)")
    p.add_argument("--quick", action="store_true", help="two small cases, few repetitions")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<machine-tag>/)")
    args = p.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 7)
    args.iters = args.iters or (5 if args.quick else 200)
    device, dtype = torch.device(args.device), lat.DTYPES[args.dtype]
    if device.type != "cuda" and args.dtype != "fp32":
        p.error(f"--dtype {args.dtype} is for CUDA; on {args.device} use fp32")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    from tqdm.auto import tqdm

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        from importlib.metadata import version

        triton_version = version("triton")
    cases = QUICK_CASES if args.quick else CASES
    t0 = time.perf_counter()
    data: dict[str, Any] = dict(
        schema=SCHEMA,
        settings=dict(
            device=args.device,
            dtype=args.dtype,
            reps=args.reps,
            iters=args.iters,
            warmup=args.warmup,
            quick=args.quick,
            triton=triton_version,
        ),
        machine=lat.machine_facts(device),
        rows=[],
    )
    for kernel, case, shape in tqdm(cases, desc="kernels", file=sys.stderr):
        data["rows"].append(bench_case(kernel, case, shape, device, dtype, args))
    data["elapsed_s"] = time.perf_counter() - t0
    out = args.out or REPO / "benchmarks" / "results" / lat.machine_tag(device)
    lat.publish(data, out, "kernels", write_outputs, render_markdown)
    return data


if __name__ == "__main__":
    main()
