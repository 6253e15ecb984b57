"""Latency of every safeguard defense: seconds per image guarded vs unguarded, measured in one process.

For each model, each registered defense that supports the model's family (plus the composition
``["negative_prompt", "sld"]`` where both do) and each batch size, the pipeline is wrapped once; after a
warm-up, unguarded calls (inside ``safeguard.disabled(pipe)``) and guarded calls are interleaved, alternating
which comes first, with the same seed for both calls of a repetition. Reported per case: median and spread of
seconds per image, the guarded/unguarded ratio (median of per-repetition ratios and ratio of medians), peak
memory per call, and where the time goes (text encoding, denoising, decoding, each defense's own hook time).

Models: ``shapes`` (the embedded ShapesWorld model; skipped with a note while its weights are missing),
``tiny-sd``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-bert-sd`` (random tiny pipelines from
``tests/tiny_pipelines.py``), and with ``--full`` ``sd15`` and ``sdxl``: the real SD 1.5 / SDXL architectures
at full size with random weights, built from configs in this file (no download; on CPU use ``--steps 2``).

Usage:

    # smoke run: tiny models (+ shapes if its weights exist), batch 1 and 2, 2 reps, 2 steps
    python benchmarks/latency.py --quick

    # default: shapes + tiny models, batch 1 and 8, 5 reps, 20 steps
    python benchmarks/latency.py

    # a subset, more repetitions, a thread count
    python benchmarks/latency.py --models shapes tiny-sd --batch 1 --reps 9 --threads 2

    # full-size SD 1.5 / SDXL with random weights (CPU: keep it short)
    python benchmarks/latency.py --full --models sd15 --steps 2 --batch 1 --size 256
    python benchmarks/latency.py --full --device cuda --dtype fp16

    # rebuild latency.md / latency.csv from an existing latency.json
    python benchmarks/latency.py --render benchmarks/results/cpu-2c/latency.json

Outputs go to ``--out`` (default ``benchmarks/results/<machine-tag>/``, the tag being ``cpu-<cores>c`` or the
slugified CUDA device name): ``latency.json`` (settings, machine facts, every repetition), ``latency.csv``
(one summary row per model/defense/batch) and ``latency.md`` (a table rendered from the JSON, also printed).
See ``benchmarks/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# library chatter (CLIP truncation of long concept texts, dtype casts) would interleave with the progress bar
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmark the checkout this script lives in
    sys.path.insert(0, str(REPO))

SCHEMA = "safeguard.benchmarks.latency/1"
COMPOSITION = ("negative_prompt", "sld")
# SAFREE with its self-validating filter on for every step (t' = 50 of 50 whenever a token is flagged):
# the cost of the filtered-embedding swap alone, then with latent re-attention on top
SAFREE_FORCED = (
    ("safree (filter every step)", {"min_steps": 50, "re_attention": False}),
    ("safree (filter every step + re-attention)", {"min_steps": 50}),
)
TINY_PROMPT = "a photo of a person on a beach"
SHAPES_PROMPT = "a red star on a white background"
PHASES = ("text", "denoise", "decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CSV_COLUMNS = (
    "model", "family", "defense", "batch", "steps", "reps", "image_size", "wrap_s",
    "unguarded_s_per_img", "unguarded_min", "unguarded_max", "unguarded_iqr",
    "guarded_s_per_img", "guarded_min", "guarded_max", "guarded_iqr",
    "ratio_median", "ratio_min", "ratio_max", "ratio_of_medians", "extra_s_per_img",
    "unguarded_text_s_per_img", "unguarded_denoise_s_per_img", "unguarded_decode_s_per_img",
    "unguarded_other_s_per_img",
    "guarded_text_s_per_img", "guarded_denoise_s_per_img", "guarded_decode_s_per_img", "guarded_other_s_per_img",
    "hooks_s_per_img", "hooks_by_defense", "acted_steps",
    "peak_mem_unguarded_mb", "peak_mem_guarded_mb", "mem_kind",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: how to build it and what to ask of it."""

    name: str
    family: str  # adapter family, known before building so the case plan is fixed up front
    kind: str  # "embedded" | "tiny" | "full"
    concept: str
    prompt: str
    build: Callable[[torch.device, torch.dtype], Any]


def _tiny(factory_name: str) -> Callable[[torch.device, torch.dtype], Any]:
    def build(device: torch.device, dtype: torch.dtype) -> Any:
        tests = str(REPO / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        import tiny_pipelines

        pipe = getattr(tiny_pipelines, factory_name)(0).to(device)  # built in fp32
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

    return build


def _shapes(device: torch.device, dtype: torch.dtype) -> Any:
    from safeguard.models import shapes_pipeline

    return shapes_pipeline(device=device, dtype=dtype)


def _clip_text_config(
    hidden: int, intermediate: int, layers: int, heads: int, act: str, projection: int, tokenizer: Any
) -> Any:
    """A CLIP text config of real size; special-token ids follow the stand-in tokenizer (ids < 49408)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
        layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def _stand_in_tokenizer() -> Any:
    """The tiny local char-level CLIP tokenizer of tests/tiny_pipelines.py, padded to 77 tokens like SD's."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tiny_pipelines import clip_tokenizer

    return clip_tokenizer(max_length=77)


@contextlib.contextmanager
def _random_init(device: torch.device) -> Iterator[None]:
    """Build modules directly on ``device`` under a private RNG seeded with 0 (global RNG untouched)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(0)
        yield


def _sd_vae(sample_size: int, scaling_factor: float, force_upcast: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=sample_size,
        scaling_factor=scaling_factor, force_upcast=force_upcast,
    )  # fmt: skip


def _full_sd15(device: torch.device, dtype: torch.dtype) -> Any:
    """Stable Diffusion 1.5 at full size (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text 123.1M params), random."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _stand_in_tokenizer()
    with _random_init(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
            freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
        )  # fmt: skip
        vae = _sd_vae(512, 0.18215, force_upcast=True)
        text_encoder = CLIPTextModel(_clip_text_config(768, 3072, 12, 12, "quick_gelu", 768, tokenizer))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return _finish_full(pipe, device, dtype)


def _full_sdxl(device: torch.device, dtype: torch.dtype) -> Any:
    """SDXL base 1.0 at full size (UNet 2.57B, CLIP ViT-L 123.1M + OpenCLIP bigG 694.7M text params), random."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _stand_in_tokenizer()
    with _random_init(device):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
            freq_shift=0, upcast_attention=False,
        )  # fmt: skip
        vae = _sd_vae(1024, 0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(_clip_text_config(768, 3072, 12, 12, "quick_gelu", 768, tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(1280, 5120, 32, 20, "gelu", 1280, tokenizer))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=_stand_in_tokenizer(), unet=unet, scheduler=scheduler,
    )  # fmt: skip
    return _finish_full(pipe, device, dtype)


def _finish_full(pipe: Any, device: torch.device, dtype: torch.dtype) -> Any:
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
            if dtype != torch.float32:  # all of it, as from_pretrained(torch_dtype=...) does; SDXL's pipeline
                module.to(dtype=dtype)  # upcasts its VAE for decoding itself (force_upcast), as with real weights
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("shapes", "sd", "embedded", "red", SHAPES_PROMPT, _shapes),
        ModelSpec("tiny-sd", "sd", "tiny", "nudity", TINY_PROMPT, _tiny("tiny_sd")),
        ModelSpec("tiny-sdxl", "sdxl", "tiny", "nudity", TINY_PROMPT, _tiny("tiny_sdxl")),
        ModelSpec("tiny-sd3", "sd3", "tiny", "nudity", TINY_PROMPT, _tiny("tiny_sd3")),
        ModelSpec("tiny-flux", "flux", "tiny", "nudity", TINY_PROMPT, _tiny("tiny_flux")),
        ModelSpec("tiny-bert-sd", "sd", "tiny", "nudity", TINY_PROMPT, _tiny("tiny_bert_sd")),
        ModelSpec("sd15", "sd", "full", "nudity", TINY_PROMPT, _full_sd15),
        ModelSpec("sdxl", "sdxl", "full", "nudity", TINY_PROMPT, _full_sdxl),
    )
}
DEFAULT_MODELS = ("shapes", "tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
FULL_MODELS = ("sd15", "sdxl")


def methods_for(family: str) -> list[tuple[str, str | list[str] | dict]]:
    """``(label, method)`` of every registered defense supporting ``family``, then the composition."""
    from safeguard import available_methods
    from safeguard.core.registry import get_defense_class

    names = [m for m in available_methods() if family in get_defense_class(m).families]
    out: list[tuple[str, str | list[str] | dict]] = [(m, m) for m in names]
    if all(m in names for m in COMPOSITION):
        out.append(("+".join(COMPOSITION), list(COMPOSITION)))
    if "safree" in names and family in ("sd", "sdxl"):  # SAFREE's filter and re-attention, forced on: their cost
        out += [(label, {"method": "safree", **options}) for label, options in SAFREE_FORCED]
    return out


# ------------------------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall time of the text encoders, the denoiser and the VAE decoder, from forward pre/post hooks.

    Attach AFTER ``safeguard.wrap``: the pre-hook is appended (runs after the defenses' pre-hooks) and the
    post-hook is prepended (runs before the defenses' post-hooks), so a phase's time is the module's own
    forward and the defenses' hook time on that module (``DefenseReport.time_s``) is not counted twice.
    """

    def __init__(self, adapter: Any, device: torch.device):
        self.device = device
        self.modules = [("text", m) for m in adapter.text_encoders] + [("denoise", adapter.denoiser)]
        if adapter.decoder is not None:
            self.modules.append(("decode", adapter.decoder))
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)
        self._started: dict[int, float] = {}

    def attach(self) -> PhaseTimer:
        for phase, module in self.modules:
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._pre, phase)))
            self.handles.append(module.register_forward_hook(functools.partial(self._post, phase), prepend=True))
        return self

    def detach(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def _pre(self, phase: str, module: torch.nn.Module, args: tuple) -> None:
        _sync(self.device)
        self._started[id(module)] = time.perf_counter()

    def _post(self, phase: str, module: torch.nn.Module, args: tuple, output: Any) -> None:
        _sync(self.device)
        t0 = self._started.pop(id(module), None)
        if t0 is not None:
            self.seconds[phase] += time.perf_counter() - t0
            self.calls[phase] += 1


class PeakMemory:
    """Peak memory of one call: CUDA max allocated, else peak RSS (VmHWM, reset per call through clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif self._reset_hwm():
            self.kind = "rss_peak_per_call"
        else:  # not Linux, or clear_refs not writable: the process's peak so far (never goes down)
            self.kind = "rss_peak_process"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            return PeakMemory._status_kb("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss_peak_per_call":
            self._reset_hwm()

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "rss_peak_per_call":
            return (self._status_kb("VmHWM") or 0) / 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def timed_call(pipe: Any, guarded: bool, prompts: list[str], seed: int, steps: int, size: int | None, env: Any) -> dict:
    """One pipeline call, guarded or inside ``safeguard.disabled``; returns its measurements."""
    import safeguard

    kwargs: dict[str, Any] = dict(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed))
    if size is not None:
        kwargs.update(height=size, width=size)
    ctx = contextlib.nullcontext() if guarded else safeguard.disabled(pipe)
    with ctx:
        env.timer.reset()
        env.memory.reset()
        _sync(env.device)
        t0 = time.perf_counter()
        images = pipe(prompts, **kwargs).images
        _sync(env.device)
        total = time.perf_counter() - t0
    report = safeguard.last_report(pipe)
    hooks = {d.name: d.time_s for d in report.defenses} if report is not None else {}
    return dict(
        total_s=total,
        phases_s=dict(env.timer.seconds),
        phase_calls=dict(env.timer.calls),
        hooks_s=hooks,
        acted_steps={d.name: len(d.acted_steps) for d in report.defenses} if report is not None else {},
        report_guarded=None if report is None else report.guarded,
        report_steps=None if report is None else report.steps,
        peak_mem_mb=env.memory.peak_mb(),
        image_hw=_image_hw(images),
    )


def _image_hw(images: Any) -> list[int]:
    """[height, width] of the first output image (PIL list, numpy array or tensor)."""
    first = images[0]
    if hasattr(first, "size") and not hasattr(first, "shape"):  # PIL: (width, height)
        return [int(first.size[1]), int(first.size[0])]
    shape = tuple(first.shape)
    return [int(shape[-2]), int(shape[-1])] if shape[0] in (1, 3) else [int(shape[0]), int(shape[1])]


@dataclass
class Env:
    device: torch.device
    timer: PhaseTimer
    memory: PeakMemory


def run_case(
    pipe: Any, spec: ModelSpec, batch: int, steps: int, reps: int, warmup: int, size: int | None, env: Env
) -> list[dict]:
    """Warm-up, then ``reps`` repetitions of an (unguarded, guarded) pair in alternating order."""
    prompts = [spec.prompt] * batch
    for w in range(warmup):
        timed_call(pipe, False, prompts, 10_000 + w, steps, size, env)
        timed_call(pipe, True, prompts, 10_000 + w, steps, size, env)
    out = []
    for r in range(reps):
        order = (False, True) if r % 2 == 0 else (True, False)
        calls = {g: timed_call(pipe, g, prompts, r, steps, size, env) for g in order}
        out.append(
            dict(
                rep=r,
                first="unguarded" if order[0] is False else "guarded",
                unguarded=calls[False],
                guarded=calls[True],
                ratio=calls[True]["total_s"] / calls[False]["total_s"],
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ statistics
def _spread(values: list[float]) -> dict[str, float]:
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return dict(median=statistics.median(values), min=min(values), max=max(values), iqr=q3 - q1)


def summarize(case: dict) -> dict:
    """Summary numbers of one case (all times in seconds per image) from its raw repetitions."""
    reps, batch = case["reps"], case["batch"]
    out: dict[str, Any] = {}
    for side in ("unguarded", "guarded"):
        out[side] = _spread([r[side]["total_s"] / batch for r in reps])
        split = {p: statistics.median(r[side]["phases_s"][p] / batch for r in reps) for p in PHASES}
        hooks = statistics.median(sum(r[side]["hooks_s"].values()) / batch for r in reps)
        split["other"] = max(0.0, out[side]["median"] - sum(split.values()) - hooks)
        out[side]["split_s_per_img"] = split
        out[side]["hooks_s_per_img"] = hooks
        out[side]["peak_mem_mb"] = max(r[side]["peak_mem_mb"] for r in reps)
    ratios = [r["ratio"] for r in reps]
    out["ratio"] = dict(
        median=statistics.median(ratios),
        min=min(ratios),
        max=max(ratios),
        of_medians=out["guarded"]["median"] / out["unguarded"]["median"],
    )
    out["extra_s_per_img"] = out["guarded"]["median"] - out["unguarded"]["median"]
    # paired (same repetition) differences: where the extra time goes
    delta = {
        p: statistics.median((r["guarded"]["phases_s"][p] - r["unguarded"]["phases_s"][p]) / batch for r in reps)
        for p in PHASES
    }
    names = sorted({n for r in reps for n in r["guarded"]["hooks_s"]})
    out["extra_split_s_per_img"] = delta
    out["hooks_by_defense_s_per_img"] = {
        n: statistics.median(r["guarded"]["hooks_s"].get(n, 0.0) / batch for r in reps) for n in names
    }
    out["acted_steps"] = {n: max(r["guarded"]["acted_steps"].get(n, 0) for r in reps) for n in names}
    return out


# ------------------------------------------------------------------------------------------------ machine
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_cores()}c"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip()


def machine_facts(device: torch.device) -> dict:
    import diffusers
    import transformers

    import safeguard

    status = _git("status", "--porcelain", "--untracked-files=no")
    facts = dict(
        tag=machine_tag(device),
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        cores_available=_cores(),
        torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        cuda=torch.version.cuda if device.type == "cuda" else None,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        safeguard=safeguard.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
    )
    return facts


# ------------------------------------------------------------------------------------------------ outputs
def csv_rows(data: dict) -> list[dict]:
    rows = []
    for case in data["cases"]:
        s = case["summary"]
        u, g = s["unguarded"], s["guarded"]
        row: dict[str, Any] = dict(
            model=case["model"], family=case["family"], defense=case["defense"], batch=case["batch"],
            steps=case["steps"], reps=len(case["reps"]), image_size="x".join(map(str, case["image_size"])), wrap_s=case["wrap_s"],
            ratio_median=s["ratio"]["median"], ratio_min=s["ratio"]["min"], ratio_max=s["ratio"]["max"],
            ratio_of_medians=s["ratio"]["of_medians"], extra_s_per_img=s["extra_s_per_img"],
            hooks_s_per_img=g["hooks_s_per_img"],
            hooks_by_defense=";".join(f"{k}={v:.6g}" for k, v in s["hooks_by_defense_s_per_img"].items()),
            acted_steps=";".join(f"{k}={v}" for k, v in s["acted_steps"].items()),
            peak_mem_unguarded_mb=u["peak_mem_mb"], peak_mem_guarded_mb=g["peak_mem_mb"], mem_kind=data["mem_kind"],
        )  # fmt: skip
        for side, d in (("unguarded", u), ("guarded", g)):
            row[f"{side}_s_per_img"] = d["median"]
            for k in ("min", "max", "iqr"):
                row[f"{side}_{k}"] = d[k]
            for p, v in d["split_s_per_img"].items():
                row[f"{side}_{p}_s_per_img"] = v
        rows.append({k: row[k] for k in CSV_COLUMNS})
    return rows


def write_result_files(
    data: dict, out: Path, stem: str, rows: list[dict], columns: list[str], markdown: str, *, json_too: bool = True
) -> None:
    """``<stem>.json`` (unless ``json_too`` is off), ``<stem>.csv`` and ``<stem>.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if json_too:
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    (out / f"{stem}.md").write_text(markdown)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:+.1f} ms"


def where_extra_time_goes(summary: dict) -> str:
    """E.g. ``denoise +3.1 ms, hooks 0.4 ms (sld 0.3, negative_prompt 0.1), text +0.0 ms``."""
    parts: list[tuple[float, str]] = [(abs(v), f"{p} {_ms(v)}") for p, v in summary["extra_split_s_per_img"].items()]
    by = summary["hooks_by_defense_s_per_img"]
    hooks = sum(by.values())
    detail = " (" + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in by.items()) + ")" if len(by) > 1 else ""
    parts.append((hooks, f"hooks {hooks * 1e3:.1f} ms{detail}"))
    other = summary["guarded"]["split_s_per_img"]["other"] - summary["unguarded"]["split_s_per_img"]["other"]
    parts.append((abs(other), f"other {_ms(other)}"))
    return ", ".join(text for _, text in sorted(parts, key=lambda x: -x[0]))


def _fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 1 else f"{x:.2f}"


def render_markdown(data: dict) -> str:
    s, m = data["settings"], data["machine"]
    lines = [
        f"# safeguard latency: {m['tag']}",
        "",
        f"{m['device_name']} ({m['device']}), {m['cores_available']} cores, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, python {m['python']}; "
        f"{m['date']}, commit {(m['git_commit'] or 'unknown')[:10]}{' (dirty)' if m['git_dirty'] else ''}.",
        "",
        f"dtype {s['dtype']}, {s['reps']} repetitions after {s['warmup']} warm-up, steps per call: see table"
        + (", **quick mode** (smoke run, not for comparison)" if s["quick"] else "")
        + ". Times are seconds per image (median; IQR in brackets); ratio = guarded / unguarded, median of"
        " per-repetition ratios (min-max); peak memory of the guarded call"
        f" ({data['mem_kind']}), change vs unguarded in brackets.",
        "",
        "| model | defense | batch | steps | s/img unguarded | s/img guarded | ratio | peak memory | "
        "where the extra time goes (per image) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in data["cases"]:
        sm = case["summary"]
        u, g, r = sm["unguarded"], sm["guarded"], sm["ratio"]
        mem = f"{g['peak_mem_mb']:.0f} MB ({round(g['peak_mem_mb'] - u['peak_mem_mb']):+d})"
        lines.append(
            f"| {case['model']} | {case['defense']} | {case['batch']} | {case['steps']} | "
            f"{_fmt_s(u['median'])} ({_fmt_s(u['iqr'])}) | {_fmt_s(g['median'])} ({_fmt_s(g['iqr'])}) | "
            f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) | {mem} | {where_extra_time_goes(sm)} |"
        )
    if data.get("interrupted"):
        lines += ["", "**Interrupted**: only the cases above were measured."]
    if data.get("errors"):
        lines += ["", "Errors:", ""]
        lines += [f"- {e['model']} / {e['defense']} / batch {e['batch']}: {e['error']}" for e in data["errors"]]
    if data["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {k['model']}" + (f" / {k['defense']}" if k.get("defense") else "") + f": {k['reason']}"
                  for k in data["skipped"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_outputs(data: dict, out: Path, *, json_too: bool = True) -> None:
    write_result_files(data, out, "latency", csv_rows(data), CSV_COLUMNS, render_markdown(data), json_too=json_too)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny models (+ shapes), batch 1 and 2, 2 reps, 2 steps")
    mode.add_argument("--full", action="store_true", help="also the full-size SD 1.5 and SDXL (random weights)")
    p.add_argument(
        "--models", nargs="+", choices=list(MODELS), metavar="NAME",
        help=f"models to run, of: {' '.join(MODELS)} (default: {' '.join(DEFAULT_MODELS)}, plus sd15 sdxl with --full)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="fp32 (default); fp16 / bf16 on CUDA only")
    p.add_argument("--steps", type=int, help="denoising steps per call (default 20; --quick 2)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8; --quick 1 2)")
    p.add_argument("--reps", type=int, help="measured repetitions per case (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per case, each side (default 1)")
    p.add_argument("--size", type=int, help="image height = width in pixels (default: the pipeline's own)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<machine-tag>/)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render .md/.csv from this latency.json")
    args = p.parse_args(argv)
    if args.render is None:
        quick = args.quick
        args.steps = args.steps or (2 if quick else 20)
        args.batch = args.batch or ([1, 2] if quick else [1, 8])
        args.reps = args.reps or (2 if quick else 5)
        if args.models is None:
            args.models = list(DEFAULT_MODELS) + (list(FULL_MODELS) if args.full else [])
        if min(args.steps, args.reps, *args.batch) < 1 or args.warmup < 0:
            p.error("--steps, --reps and --batch must be >= 1, --warmup >= 0")
        if not args.device.startswith("cuda") and args.dtype != "fp32":
            p.error(f"--dtype {args.dtype} is for CUDA; on {args.device} use fp32")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def plan(models: list[str]) -> list[tuple[ModelSpec, list[tuple[str, str | list[str]]]]]:
    return [(MODELS[name], methods_for(MODELS[name].family)) for name in models]


def bench_model(spec: ModelSpec, methods: list, args: argparse.Namespace, data: dict, memory: PeakMemory, bar) -> None:
    """All cases of one model: build it once, then wrap / measure / unwrap each method."""
    import safeguard
    from safeguard.adapters import get_adapter

    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    def skip(defense: str | None, reason: str, n_cases: int) -> None:
        data["skipped"].append(dict(model=spec.name, defense=defense, reason=reason))
        bar.write(f"note: skipping {spec.name}{' / ' + defense if defense else ''}: {reason}")
        bar.update(n_cases)

    if not methods:
        skip(None, f"no registered defense supports the {spec.family!r} family", 0)
        return
    bar.set_postfix_str(f"building {spec.name}")
    try:
        pipe = spec.build(device, dtype)
    except safeguard.MissingWeightsError as e:  # the embedded model before its weights are trained
        skip(None, f"weights missing: {e}", len(methods) * len(args.batch))
        return
    except safeguard.MissingDependencyError as e:
        skip(None, f"missing dependency: {e}", len(methods) * len(args.batch))
        return
    adapter = get_adapter(pipe)
    for label, method in methods:
        try:
            t0 = time.perf_counter()
            options = dict(method) if isinstance(method, dict) else {"method": method}
            safeguard.wrap(pipe, concepts=[spec.concept], **options)
            wrap_s = time.perf_counter() - t0
        except safeguard.SafeguardError as e:  # e.g. a defense that needs a checkpoint or an option
            skip(label, f"{type(e).__name__}: {e}", len(args.batch))
            continue
        timer = PhaseTimer(adapter, device).attach()  # after wrap: see PhaseTimer
        env = Env(device, timer, memory)
        try:
            for batch in args.batch:
                bar.set_postfix_str(f"{spec.name} {label} b{batch}")
                try:
                    reps = run_case(pipe, spec, batch, args.steps, args.reps, args.warmup, args.size, env)
                except Exception as e:  # keep the other cases; reported, and the exit status is 1
                    data["errors"].append(dict(model=spec.name, defense=label, batch=batch, error=repr(e),
                                               traceback=traceback.format_exc()))  # fmt: skip
                    bar.write(f"ERROR: {spec.name} / {label} / batch {batch}: {e!r}")
                    bar.update(1)
                    continue
                case = dict(
                    model=spec.name, family=spec.family, kind=spec.kind, defense=label, method=method,
                    concept=spec.concept, prompt=spec.prompt, batch=batch, steps=args.steps,
                    image_size=reps[0]["unguarded"]["image_hw"], wrap_s=wrap_s, reps=reps,
                )  # fmt: skip
                case["summary"] = summarize(case)
                data["cases"].append(case)
                bar.update(1)
        finally:
            timer.detach()
            safeguard.unwrap(pipe)
    del pipe, adapter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or ``--render``); returns the results dict that was written as latency.json."""
    args = parse_args(argv)
    if args.render is not None:
        return rerender(args, write_outputs, render_markdown)

    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or REPO / "benchmarks" / "results" / machine_tag(device)
    memory = PeakMemory(device)
    settings = dict(
        models=args.models, device=args.device, dtype=args.dtype, steps=args.steps, batches=args.batch,
        reps=args.reps, warmup=args.warmup, size=args.size, quick=args.quick, full=args.full,
        composition=list(COMPOSITION), argv=sys.argv[1:] if argv is None else list(argv),
    )  # fmt: skip
    data: dict[str, Any] = dict(
        schema=SCHEMA, settings=settings, machine=machine_facts(device), mem_kind=memory.kind,
        cases=[], skipped=[], errors=[], interrupted=False,
    )  # fmt: skip
    cases = plan(args.models)
    total = sum(len(methods) * len(args.batch) for _, methods in cases)
    t_start = time.perf_counter()
    with tqdm(total=total, desc="latency", unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for spec, methods in cases:
                bench_model(spec, methods, args, data, memory, bar)
        except KeyboardInterrupt:  # keep what was measured so far
            data["interrupted"] = True
            bar.write("interrupted: writing the cases measured so far")
    data["elapsed_s"] = time.perf_counter() - t_start
    publish(data, out, "latency", write_outputs, render_markdown)
    return data


def rerender(args: argparse.Namespace, write_outputs: Any, render_markdown: Any) -> dict:
    """``--render``: rebuild a results JSON's .md and .csv (beside it, or in ``--out``) without measuring."""
    data = json.loads(args.render.read_text())
    write_outputs(data, args.out or args.render.parent, json_too=False)
    print(render_markdown(data))
    return data


def publish(data: dict, out: Path, name: str, write_outputs: Any, render_markdown: Any) -> None:
    """Check, write ``<name>.json/.csv/.md`` under ``out`` and print the table (latency.py and llm.py)."""
    _check_finite(data)
    write_outputs(data, out)
    print(render_markdown(data))
    print(f"wrote {out / f'{name}.json'}, {name}.csv, {name}.md in {data['elapsed_s']:.1f} s")


def _check_finite(obj: Any) -> None:
    """JSON has no NaN / inf; fail loudly rather than write an unreadable file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number in results: {obj}")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_finite(v)
    elif isinstance(obj, list):
        for v in obj:
            _check_finite(v)


if __name__ == "__main__":
    results = main()
    sys.exit(1 if results.get("errors") or results.get("interrupted") else 0)
