"""Speed of ``repe`` on a causal LM, and of the same vector added by the ``steering-vectors`` package.

On SmolLM2-135M-Instruct (the embedded LLM), for each batch size, from one ``new_tokens + 1``-token ``generate`` per
variant and repetition (every row forced to the same length with ``min_new_tokens``; a logits processor stamps the
clock at each token): prefill latency (call start to the first token's logits) and decode throughput (first to last
token's logits), for these variants, all in one process and interleaved within every repetition:

- ``unguarded``: the bare model (not wrapped);
- ``repe-conditional``: ``safeguard.wrap(model, tokenizer=tok, concepts=["harmful"], method="repe")`` with the
  calibrated defaults (the calibrated detector scores each prompt, the behaviour vector is added to rows above
  its threshold; the rows it passes get the calibrated release ablation);
- ``repe-passed``: the same with the threshold raised so that no row fires: every row takes the release ablation
  (what harmless traffic pays);
- ``repe-add``: ``mode="add"``: the behaviour vector added at the calibrated layers to every row;
- ``repe-ablate``: ``mode="ablate"``: the concept direction projected out at every layer;
- ``steering-vectors-add`` (the peer): the very same vectors (``vecs.vector("behaviour", layer, strength)`` at the
  calibrated layers) added by the ``steering-vectors`` package (the ``bench`` extra; with transformers 5 install it
  with ``pip install --no-deps steering-vectors``); marked skipped when the package is not installed.

Optional (``--variants``): ``repe-disabled``: wrapped in conditional mode but run inside ``safeguard.disabled``.

Reported per batch and variant: median prefill seconds and decode tokens/s, and their ratios to the unguarded model
of the same repetition (median, min, max of the per-repetition ratios); and ``repe-add`` against the peer directly,
repetition by repetition (median ratio, bootstrap 95% interval); and the hooks' own time on one cached decode step
per variant (``hook_cost``: every hook on the model handed a real decode step's inputs, without the model's compute),
which separates what whole-step timings cannot. The batch's prompts alternate harmful and
harmless requests from the validation split (batch 1: one harmful request, which the conditional guard should
flag; the ``fired`` column says whether it did).

Usage:

    python benchmarks/llm.py --quick                       # tiny random Llama, no SmolLM2 needed, seconds
    python benchmarks/llm.py                               # SmolLM2, batch 1 and 8, 32 new tokens, 5 reps
    python benchmarks/llm.py --batch-sizes 1 --reps 9 --new-tokens 64
    python benchmarks/llm.py --device cuda --dtype bf16
    python benchmarks/llm.py --render benchmarks/results/cpu-2c/llm.json   # redo llm.md / llm.csv

Outputs go to ``--out`` (default ``benchmarks/results/<machine-tag>/``): ``llm.json`` (settings, machine facts,
every repetition), ``llm.csv`` (one row per batch and variant) and ``llm.md`` (a table, also printed).
See ``benchmarks/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # benchmark the checkout this script lives in
    sys.path.insert(0, str(REPO))

SCHEMA = "safeguard.benchmarks.llm/3"  # 3: hook_cost
CONCEPT = "harmful"
SHIPPED_VECTORS = REPO / "safeguard" / "models" / "weights" / "repe" / "harmful-mean_diff"
PEER = "steering-vectors-add"
VARIANTS = ("unguarded", "repe-conditional", "repe-passed", "repe-add", "repe-ablate", PEER)
EXTRA_VARIANTS = ("repe-disabled",)
REPE_MODES = {
    "repe-conditional": None,
    "repe-passed": None,
    "repe-add": "add",
    "repe-ablate": "ablate",
    "repe-disabled": None,
}


def pass_all(vectors: Path) -> dict[str, Any]:
    """repe-passed's options: a threshold no row reaches (a cosine never exceeds 1; a sum of standardised ones, as in
    "both" and "both+encoder", never reaches 100)."""
    from safeguard.steering.vectors import SteeringVectors

    detector = SteeringVectors.load(vectors).calibration.get("detector", "last")
    return {"threshold": 1.0 if detector in ("last", "prompt") else 100.0, "detector": detector}


CSV_COLUMNS = (
    "model", "batch", "variant", "new_tokens", "reps", "prompt_tokens",
    "prefill_s", "prefill_s_min", "prefill_s_max",
    "prefill_ratio_median", "prefill_ratio_min", "prefill_ratio_max", "prefill_ratio_of_medians",
    "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max",
    "decode_ratio_median", "decode_ratio_min", "decode_ratio_max", "decode_ratio_of_medians",
    "fired", "wrap_s",
)  # fmt: skip


def _latency() -> Any:
    """benchmarks/latency.py (not a package) for its machine facts, tag and helpers."""
    name = "safeguard_benchmark_latency"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "latency.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


# ------------------------------------------------------------------------------------------------ models
def tiny_model(device: torch.device, dtype: torch.dtype, folder: Path) -> tuple[Any, Any, Path]:
    """A tiny random Llama (tests/tiny_llms.py) and random unit steering vectors for it, saved in ``folder``.

    The calibration mirrors SmolLM2's shape: behaviour layer 1, condition layer 2 (deeper, so the conditional
    guard's look-ahead pass runs as on SmolLM2), threshold -1 (every row fires, so the steering path runs).
    """
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tiny_llms import tiny_llama, tiny_tokenizer

    from safeguard.steering.vectors import SteeringVectors

    layers = 4
    model = tiny_llama(0, layers=layers).to(device=device, dtype=dtype)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)

    def units() -> torch.Tensor:
        d = torch.randn(layers, hidden, generator=gen)
        return d / d.norm(dim=-1, keepdim=True)

    sets = ("behaviour", "concept", "condition")
    vecs = SteeringVectors(
        directions={s: units() for s in sets},
        scales={s: torch.full((layers,), 2.0) for s in sets},
        norms=torch.ones(layers),
        meta=dict(
            concept=CONCEPT, method="random (benchmark smoke run)",
            calibration=dict(mode="conditional", condition_layer=2, threshold=-1.0, layers=[1], strength=1.0),
        ),
    )  # fmt: skip
    return model, tiny_tokenizer(), vecs.save(folder / "tiny-harmful")


def smollm2_model(device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from safeguard.models import smollm2

    return smollm2(device=device, dtype=dtype)


def bench_prompts(n: int) -> list[str]:
    """Harmful and harmless requests alternating (validation split), harmful first."""
    from safeguard.steering import data

    pairs = data.harmful_pairs("val")
    out = [p[side] for p in pairs for side in ("harmful", "harmless")]
    return [out[i % len(out)] for i in range(n)]


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Bench:
    model: Any
    tok: Any
    vectors: Path
    device: torch.device
    peer: Any  # steering_vectors.SteeringVector on the model's device/dtype, or None

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[dict]:
        """Put the model in the state of ``name`` for the block; yields a dict that receives ``wrap_s``."""
        import safeguard

        info: dict[str, Any] = {}
        if name == "unguarded":
            yield info
        elif name == PEER:
            handle = self.peer.patch_activations(self.model, min_token_index=None)  # every token of every forward
            try:
                yield info
            finally:
                handle.remove()
        else:
            options = {} if REPE_MODES[name] is None else {"mode": REPE_MODES[name]}
            options |= pass_all(self.vectors) if name == "repe-passed" else {}
            t0 = time.perf_counter()
            safeguard.wrap(
                self.model, tokenizer=self.tok, concepts=[CONCEPT], method="repe", vectors=str(self.vectors), **options
            )
            info["wrap_s"] = time.perf_counter() - t0
            try:
                with safeguard.disabled(self.model) if name == "repe-disabled" else contextlib.nullcontext():
                    yield info
            finally:
                safeguard.unwrap(self.model)

    def generate(self, enc: Any, n: int) -> dict[str, Any]:
        """Timings of one greedy ``generate`` of exactly ``n`` new tokens per row.

        A logits processor stamps the clock each time the model's logits for a new token are ready, so the prefill
        (call start to the first token's logits) and the decode (first to last token's logits: ``n - 1`` forwards
        with the KV cache) come from one call, not from the difference of two noisy calls.
        """
        from transformers import LogitsProcessorList

        sync = _latency()._sync
        stamps: list[float] = []

        def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync(self.device)
            stamps.append(time.perf_counter())
            return scores

        sync(self.device)
        t0 = time.perf_counter()
        self.model.generate(
            **enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.tok.pad_token_id,
            logits_processor=LogitsProcessorList([stamp]),
        )  # fmt: skip
        sync(self.device)
        total = time.perf_counter() - t0
        steps = [b - a for a, b in itertools.pairwise(stamps)]
        return dict(
            prefill_s=stamps[0] - t0, decode_s=stamps[-1] - stamps[0], full_s=total,
            step_s_median=statistics.median(steps) if steps else None,
        )  # fmt: skip


def fired_rows(model: Any, variant: str) -> list[bool] | None:
    import safeguard

    if variant not in ("repe-conditional", "repe-passed"):
        return None
    report = safeguard.last_report(model)
    return list(report.defenses[0].details.get("fired", [])) if report is not None else None


def encode(tok: Any, prompts: list[str], device: torch.device) -> Any:
    from safeguard.eval.llm import chat_texts

    tok.padding_side = "left"
    return tok(chat_texts(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def peer_check(b: Bench, enc: Any, new_tokens: int) -> dict:
    """Is the peer adding the same thing? Logits of one forward and greedy tokens, repe add vs steering-vectors.

    repe runs with ``skip_first=False`` here (the peer edits every position); the measured ``repe-add`` keeps its
    default ``skip_first=True``.
    """
    import safeguard

    safeguard.wrap(b.model, tokenizer=b.tok, concepts=[CONCEPT], method="repe", vectors=str(b.vectors), mode="add",
                   skip_first=False)  # fmt: skip
    try:
        ours = b.model(**enc).logits.float()
        ours_ids = b.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=b.tok.pad_token_id)  # fmt: skip
    finally:
        safeguard.unwrap(b.model)
    with b.peer.apply(b.model, min_token_index=None):
        theirs = b.model(**enc).logits.float()
        theirs_ids = b.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=b.tok.pad_token_id)  # fmt: skip
    base = b.model(**enc).logits.float()
    return dict(
        max_abs_logit_diff=float((ours - theirs).abs().max()),
        max_abs_logit_change=float((ours - base).abs().max()),  # for scale: how much the vector changes logits
        same_tokens=bool(torch.equal(ours_ids, theirs_ids)),
    )


def run_batch(b: Bench, batch: int, variants: list[str], args: argparse.Namespace, bar: Any, measured: list) -> None:
    """Warm-up, then ``reps`` repetitions; each runs every variant once, the order rotating between repetitions.

    Repetitions are appended to ``measured`` as they finish, so an interrupted run keeps them.
    """
    enc = encode(b.tok, bench_prompts(batch), b.device)
    n = args.new_tokens
    for _ in range(args.warmup):
        for v in variants:
            bar.set_postfix_str(f"b{batch} warm-up {v}")
            with b.variant(v):
                b.generate(enc, n + 1)
            bar.update(1)
    reps: dict[str, list[dict]] = {v: [] for v in variants}
    measured.append(dict(batch=batch, prompt_tokens=int(enc["input_ids"].shape[1]), reps=reps))
    for r in range(args.reps):
        k = r % len(variants)
        for pos, v in enumerate(variants[k:] + variants[:k]):
            bar.set_postfix_str(f"b{batch} rep {r + 1}/{args.reps} {v}")
            with b.variant(v) as info:
                b.generate(enc, 2)  # settle: every timed call follows a call of its own variant
                t = b.generate(enc, n + 1)
                fired = fired_rows(b.model, v)
            reps[v].append(dict(
                rep=r, position=pos, **t, tokens_per_s=batch * n / max(t["decode_s"], 1e-9), fired=fired,
                wrap_s=info.get("wrap_s"),
            ))  # fmt: skip
            bar.update(1)


# ------------------------------------------------------------------------------------------------ hook cost
def _module_hooks(model: Any) -> list[tuple[Any, Any, str, bool]]:
    """Every forward pre-hook and forward hook on ``model``'s modules: ``(module, fn, kind, with_kwargs)``."""
    out = []
    for mod in model.modules():
        for hid, fn in mod._forward_pre_hooks.items():
            out.append((mod, fn, "pre", hid in mod._forward_pre_hooks_with_kwargs))
        for hid, fn in mod._forward_hooks.items():
            out.append((mod, fn, "post", hid in mod._forward_hooks_with_kwargs))
    return out


class HookRunner:
    """Calls every hook in ``hooks`` once, as a decode step would: the base model's pre-hooks get ``step_kw``, the
    other modules' hooks get ``h`` as their input and output."""

    def __init__(self, hooks: list[tuple[Any, Any, str, bool]], base: Any, h: torch.Tensor, step_kw: dict):
        self.hooks, self.base, self.h, self.step_kw = hooks, base, h, step_kw

    def __call__(self) -> None:
        h = self.h
        for mod, fn, kind, with_kwargs in self.hooks:
            args: tuple = () if mod is self.base else (h,)
            kw = self.step_kw if mod is self.base else {}
            if kind == "pre":
                fn(mod, args, kw) if with_kwargs else fn(mod, args)
            else:
                fn(mod, args, kw, h) if with_kwargs else fn(mod, args, h)


def _cache_kwarg(base: Any) -> str:
    """The base model's name for the KV cache argument (``cache`` from transformers 5.24, else ``past_key_values``)."""
    import inspect

    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def decode_hook_cost(b: Bench, enc: Any, variants: list[str], calls: int, rounds: int) -> dict[str, dict]:
    """Wall time of the hooks alone on one cached decode step, per variant: median microseconds over ``rounds``.

    Each round and variant: a real prefill through the hooked model (so per-call state such as the conditional
    guard's decision is set), then the decode step's inputs (the next greedy token, the grown mask, the real KV
    cache) and a random ``[B, 1, d]`` layer output are handed ``calls`` times to every forward pre-hook and forward
    hook on the model's modules, in module order: exactly the Python and tensor work the hooks add to a decode step,
    without the model's own compute. Variants rotate between rounds. Unguarded counts the hooks the model has of
    its own (none on a plain transformers model).
    """
    from safeguard.adapters import CausalLMAdapter

    base = CausalLMAdapter(b.model, b.tok).layer_owner()
    cache_name = _cache_kwarg(base)
    times: dict[str, list[float]] = {v: [] for v in variants}
    counts: dict[str, int] = {}
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            with b.variant(v):
                out = b.model(**enc, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([enc["attention_mask"], torch.ones_like(nxt)], dim=1)
                step_kw = {"input_ids": nxt, "attention_mask": mask, cache_name: out[cache_name], "use_cache": True}
                h = torch.randn(nxt.shape[0], 1, b.model.config.hidden_size, device=b.device, dtype=b.model.dtype)
                one_step = HookRunner(_module_hooks(b.model), base, h, step_kw)
                counts[v] = len(one_step.hooks)
                one_step()  # warm
                _latency()._sync(b.device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    one_step()
                _latency()._sync(b.device)
                times[v].append((time.perf_counter() - t0) / calls * 1e6)
    return {v: dict(hooks=counts[v], us_median=statistics.median(t), us_min=min(t), us_max=max(t), rounds=t)
            for v, t in times.items()}  # fmt: skip


# ------------------------------------------------------------------------------------------------ statistics
def _mmm(values: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def summarize(reps: list[dict]) -> dict:
    prefill = _mmm([r["prefill_s"] for r in reps])
    tps = _mmm([r["tokens_per_s"] for r in reps])
    fired = [x for r in reps for x in (r["fired"] or [])]
    wraps = [r["wrap_s"] for r in reps if r["wrap_s"] is not None]
    return dict(
        prefill_s=prefill,
        tokens_per_s=tps,
        prefill_ratio=_mmm([r["prefill_ratio"] for r in reps]),
        decode_ratio=_mmm([r["decode_ratio"] for r in reps]),
        fired=sum(fired) / len(fired) if fired else None,
        wrap_s=statistics.median(wraps) if wraps else None,
    )


def paired_ratio(ours: list[float], theirs: list[float], boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Median of the per-repetition ratios ``ours[i] / theirs[i]`` with a seeded bootstrap 95% interval."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ratios), (boot, len(ratios)), generator=gen)
    medians = torch.quantile(torch.tensor(ratios, dtype=torch.float64)[idx], 0.5, dim=1)  # as statistics.median
    return dict(
        reps=len(ratios), median=statistics.median(ratios), ci95=[float(medians.quantile(0.025)),
        float(medians.quantile(0.975))], share_at_least_1=sum(r >= 1.0 for r in ratios) / len(ratios), ratios=ratios,
    )  # fmt: skip


def peer_pairs(measured: list[dict]) -> dict[str, dict]:
    """Per batch: ``repe-add`` against the peer, repetition by repetition (decode tokens/s and prefill time)."""
    out = {}
    for m in measured:
        ours, theirs = m["reps"].get("repe-add", []), m["reps"].get(PEER, [])
        common = sorted({r["rep"] for r in ours} & {r["rep"] for r in theirs})
        if not common:
            continue
        a = {r["rep"]: r for r in ours}
        b = {r["rep"]: r for r in theirs}
        out[str(m["batch"])] = dict(
            decode_throughput=paired_ratio(
                [a[i]["tokens_per_s"] for i in common], [b[i]["tokens_per_s"] for i in common]
            ),
            prefill_time=paired_ratio([a[i]["prefill_s"] for i in common], [b[i]["prefill_s"] for i in common]),
        )
    return out


def finish_cases(data: dict, measured: list[dict]) -> None:
    """One case per (batch, variant): repetitions with their ratios to the same repetition's unguarded call."""
    for m in measured:
        base = {r["rep"]: r for r in m["reps"].get("unguarded", [])}
        summaries = {}
        for v, reps in m["reps"].items():
            reps[:] = [r for r in reps if r["rep"] in base]  # an interrupted repetition may lack its baseline
            for rep in reps:
                u = base[rep["rep"]]
                rep["prefill_ratio"] = rep["prefill_s"] / u["prefill_s"]
                rep["decode_ratio"] = rep["tokens_per_s"] / u["tokens_per_s"]
            if reps:
                summaries[v] = summarize(reps)
        for v, s in summaries.items():
            u = summaries["unguarded"]
            s["prefill_ratio"]["of_medians"] = s["prefill_s"]["median"] / u["prefill_s"]["median"]
            s["decode_ratio"]["of_medians"] = s["tokens_per_s"]["median"] / u["tokens_per_s"]["median"]
            data["cases"].append(dict(
                batch=m["batch"], variant=v, prompt_tokens=m["prompt_tokens"], new_tokens=data["settings"]["new_tokens"],
                reps=m["reps"][v], summary=s,
            ))  # fmt: skip
    data["peer_pairs"] = peer_pairs(measured)


# ------------------------------------------------------------------------------------------------ outputs
def csv_rows(data: dict) -> list[dict]:
    rows = []
    for c in data["cases"]:
        s = c["summary"]
        row: dict[str, Any] = dict(
            model=data["settings"]["model"], batch=c["batch"], variant=c["variant"], new_tokens=c["new_tokens"],
            reps=len(c["reps"]), prompt_tokens=c["prompt_tokens"],
            prefill_s=s["prefill_s"]["median"], prefill_s_min=s["prefill_s"]["min"], prefill_s_max=s["prefill_s"]["max"],
            decode_tok_s=s["tokens_per_s"]["median"], decode_tok_s_min=s["tokens_per_s"]["min"],
            decode_tok_s_max=s["tokens_per_s"]["max"],
            fired="" if s["fired"] is None else s["fired"], wrap_s="" if s["wrap_s"] is None else s["wrap_s"],
        )  # fmt: skip
        for key in ("prefill_ratio", "decode_ratio"):
            for k in ("median", "min", "max", "of_medians"):
                row[f"{key}_{k}"] = s[key][k]
        rows.append({k: row[k] for k in CSV_COLUMNS})
    return rows


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def render_markdown(data: dict) -> str:
    s, m, peer = data["settings"], data["machine"], data["peer"]
    lines = [
        f"# safeguard LLM steering speed: {m['tag']}",
        "",
        f"{m['device_name']} ({m['device']}), {m['cores_available']} cores, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}; "
        f"{m['date']}, commit {(m['git_commit'] or 'unknown')[:10]}{' (dirty)' if m['git_dirty'] else ''}.",
        "",
        f"Model {s['model']}, dtype {s['dtype']}, concept {s['concept']!r}, vectors `{s['vectors_name']}` "
        f"(behaviour layers {s['calibration'].get('layers')}, strength {s['calibration'].get('strength')}, "
        f"{_detector_text(s)}); {s['new_tokens']} new tokens per row, "
        f"{s['reps']} repetitions after {s['warmup']} warm-up"
        + (", **quick mode** (smoke run, not for comparison)" if s["quick"] else "")
        + ". Prefill: call start to the first token's logits (median); decode: tokens/s of the other tokens (median, all rows); "
        "ratios to the unguarded model in the same repetition: median (min-max). Prefill ratio is time "
        "(>1 slower), decode ratio is throughput (<1 slower).",
        "",
        "| batch | variant | prefill | prefill x | decode tok/s | decode x | fired |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in data["cases"]:
        sm = c["summary"]
        p, d = sm["prefill_ratio"], sm["decode_ratio"]
        fired = "" if sm["fired"] is None else f"{sm['fired']:.0%}"
        lines.append(
            f"| {c['batch']} | {c['variant']} | {_fmt_s(sm['prefill_s']['median'])} | "
            f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f}) | {sm['tokens_per_s']['median']:.1f} | "
            f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | {fired} |"
        )
    lines += ["", "Peer: " + _peer_line(peer)]
    pairs = data.get("peer_pairs") or {}
    if pairs:
        lines += [
            "",
            "`repe-add` against `steering-vectors-add`, repetition by repetition (both ran in every repetition): "
            "median of the per-repetition ratios, bootstrap 95% interval of that median, and the share of "
            "repetitions in which ours was at least as fast.",
            "",
            "| batch | reps | decode tok/s, ours / peer | 95% CI | ours >= peer | prefill time, ours / peer | 95% CI |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b, pr in pairs.items():
            d, p = pr["decode_throughput"], pr["prefill_time"]
            lines.append(
                f"| {b} | {d['reps']} | {d['median']:.3f} | {d['ci95'][0]:.3f}-{d['ci95'][1]:.3f} | "
                f"{d['share_at_least_1']:.0%} | {p['median']:.3f} | {p['ci95'][0]:.3f}-{p['ci95'][1]:.3f} |"
            )
    lines += _hook_cost_lines(data)
    if data.get("interrupted"):
        lines += ["", "**Interrupted**: only the repetitions above were measured."]
    if data.get("errors"):
        lines += ["", "Errors:", ""]
        lines += [f"- batch {e['batch']} / {e['variant']}: {e['error']}" for e in data["errors"]]
    if data["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {k['variant']}: {k['reason']}" for k in data["skipped"]]
    return "\n".join(lines) + "\n"


def _hook_cost_lines(data: dict) -> list[str]:
    """The hook-cost table (files of schema 3 on)."""
    cost = data.get("hook_cost") or {}
    if not cost:
        return []
    step = {c["batch"]: c["batch"] / c["summary"]["tokens_per_s"]["median"] for c in data["cases"]
            if c["variant"] == "unguarded"}  # fmt: skip
    lines = [
        "",
        "Where a guarded decode step's extra time goes: the hooks alone, handed one cached decode step's real inputs "
        f"{data['settings'].get('hook_calls', '?')} times per round (median of "
        f"{data['settings'].get('hook_rounds', '?')} rounds, min-max), without the model's compute; share: of the "
        "unguarded model's median decode step in this run.",
        "",
        "| batch | variant | hooks | hook time per decode step | share of a decode step |",
        "|---:|---|---:|---:|---:|",
    ]
    for b, per in cost.items():
        for v, c in per.items():
            share = c["us_median"] * 1e-6 / step[int(b)] if int(b) in step else float("nan")
            lines.append(
                f"| {b} | {v} | {c['hooks']} | {c['us_median']:.1f} us ({c['us_min']:.1f}-{c['us_max']:.1f}) | "
                f"{share:.2%} |"
            )
    return lines


def _detector_run(vecs: Any) -> dict:
    """The detector ``repe-conditional`` runs with these vectors (the calibrated choice): name, layers, threshold."""
    from safeguard.steering.detector import resolve_detector

    det = resolve_detector(vecs)
    return dict(name=det.name, layers=det.layers, threshold=det.threshold)


def _detector_text(s: dict) -> str:
    det = s.get("detector")  # absent from files written before detectors had names
    if det is None:
        return f"condition layer {s['calibration'].get('condition_layer')}"
    return f"detector {det['name']!r} at layers {det['layers']}, threshold {det['threshold']:.3f}"


def _peer_line(peer: dict) -> str:
    if not peer["available"]:
        return f"`steering-vectors` not measured ({peer['reason']})."
    checks = "; ".join(
        f"batch {b}: max |logit diff| {c['max_abs_logit_diff']:.2g} (the vector itself moves logits by up to "
        f"{c['max_abs_logit_change']:.2g}), same greedy tokens: {'yes' if c['same_tokens'] else 'no'}"
        for b, c in peer["check"].items()
    )
    return (
        f"`steering-vectors` {peer['version']}, the same vectors at the same layers, added to every position of "
        f"every forward (`min_token_index=None`); `repe-add` skips each row's first real token. Check against "
        f"`repe` add with `skip_first=False`: {checks or 'not run'}."
    )


def write_outputs(data: dict, out: Path, *, json_too: bool = True) -> None:
    _latency().write_result_files(
        data, out, "llm", csv_rows(data), CSV_COLUMNS, render_markdown(data), json_too=json_too
    )


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    lat = _latency()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama (no SmolLM2), 2 reps, 8 new tokens")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--new-tokens", type=int, help="decoded tokens per row (default 32; --quick 8)")
    p.add_argument("--reps", type=int, help="measured repetitions (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds of every variant (default 1)")
    p.add_argument("--hook-calls", type=int, help="hook-cost: decode steps timed per round (default 300; --quick 20)")
    p.add_argument("--hook-rounds", type=int, help="hook-cost: rounds per variant (default 9; --quick 2)")
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS + EXTRA_VARIANTS, metavar="NAME",
        help=f"variants to run, of: {' '.join(VARIANTS + EXTRA_VARIANTS)} (default: all but repe-disabled; "
        "unguarded is always run)",
    )  # fmt: skip
    p.add_argument("--vectors", type=Path, help=f"steering-vector folder (default {SHIPPED_VECTORS.relative_to(REPO)})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(lat.DTYPES), help="fp32 (default); fp16 / bf16 on CUDA only")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<machine-tag>/)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render .md/.csv from this llm.json")
    args = p.parse_args(argv)
    if args.render is None:
        args.new_tokens = args.new_tokens or (8 if args.quick else 32)
        args.reps = args.reps or (2 if args.quick else 5)
        args.hook_calls = args.hook_calls or (20 if args.quick else 300)
        args.hook_rounds = args.hook_rounds or (2 if args.quick else 9)
        variants = list(args.variants or VARIANTS)
        args.variants = ["unguarded"] + [v for v in VARIANTS + EXTRA_VARIANTS if v in variants and v != "unguarded"]
        if min(args.new_tokens, args.reps, *args.batch_sizes) < 1 or args.warmup < 0:
            p.error("--new-tokens, --reps and --batch-sizes must be >= 1, --warmup >= 0")
        if not args.device.startswith("cuda") and args.dtype != "fp32":
            p.error(f"--dtype {args.dtype} is for CUDA; on {args.device} use fp32")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def make_peer(vectors: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    """The steering-vectors SteeringVector holding ``vecs.vector("behaviour", l, strength)`` per calibrated layer."""
    from safeguard.steering.vectors import SteeringVectors

    try:
        import steering_vectors
    except ImportError:
        reason = "steering-vectors is not installed: pip install --no-deps 'steering-vectors>=0.12' (the bench extra)"
        return None, dict(available=False, reason=reason, version=None, check={})
    from importlib.metadata import version

    vecs = SteeringVectors.load(vectors)
    cal = vecs.calibration
    strength = float(cal.get("strength", 1.0))
    acts = {int(i): vecs.vector("behaviour", int(i), strength) for i in cal["layers"]}
    sv = steering_vectors.SteeringVector(layer_activations=acts, layer_type="decoder_block").to(
        device=device, dtype=dtype
    )
    info = dict(
        available=True, reason=None, version=version("steering-vectors"), layers=sorted(acts), strength=strength,
        min_token_index=None, check={},
    )  # fmt: skip
    return sv, info


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or ``--render``); returns the results dict written as llm.json."""
    args = parse_args(argv)
    if args.render is not None:
        return _latency().rerender(args, write_outputs, render_markdown)

    from tqdm.auto import tqdm

    from safeguard.steering.vectors import SteeringVectors

    lat = _latency()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), lat.DTYPES[args.dtype]
    out = args.out or REPO / "benchmarks" / "results" / lat.machine_tag(device)
    tmp = tempfile.TemporaryDirectory(prefix="safeguard-bench-llm-")
    try:
        if args.quick:
            model, tok, vectors = tiny_model(device, dtype, Path(tmp.name))
            model_name = "tiny-llama"  # random, 4 layers x 32 hidden
        else:
            import safeguard

            try:
                model, tok = smollm2_model(device, dtype)
            except (safeguard.MissingDependencyError, safeguard.MissingWeightsError) as e:
                raise SystemExit(f"SmolLM2 is not available: {e}\n(--quick runs a tiny random Llama instead)") from e
            vectors = args.vectors or SHIPPED_VECTORS
            model_name = "SmolLM2-135M-Instruct"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        vecs = SteeringVectors.load(vectors)
        peer, peer_info = make_peer(vectors, device, dtype)
        variants = list(args.variants)
        settings = dict(
            model=model_name, device=args.device, dtype=args.dtype, concept=CONCEPT, batches=args.batch_sizes,
            new_tokens=args.new_tokens, reps=args.reps, warmup=args.warmup, quick=args.quick, variants=variants,
            hook_calls=args.hook_calls, hook_rounds=args.hook_rounds,
            vectors=str(vectors), vectors_name=Path(vectors).name, calibration={
                k: v for k, v in vecs.calibration.items() if k in ("mode", "layers", "strength", "condition_layer",
                                                                     "threshold")},
            detector=_detector_run(vecs),
            prompts=bench_prompts(max(args.batch_sizes)), argv=sys.argv[1:] if argv is None else list(argv),
        )  # fmt: skip
        data: dict[str, Any] = dict(
            schema=SCHEMA, settings=settings, machine=lat.machine_facts(device), peer=peer_info, cases=[],
            skipped=[], errors=[], interrupted=False, hook_cost={},
        )  # fmt: skip
        if peer is None and PEER in variants:
            variants.remove(PEER)
            data["skipped"].append(dict(variant=PEER, reason=peer_info["reason"]))
            print(f"note: skipping {PEER}: {peer_info['reason']}", file=sys.stderr)
        bench = Bench(model, tok, Path(vectors), device, peer)
        measured: list[dict] = []
        total = len(args.batch_sizes) * (args.warmup + args.reps) * len(variants)
        t_start = time.perf_counter()
        with tqdm(total=total, desc="llm", unit="call", file=sys.stderr, dynamic_ncols=True) as bar:
            try:
                for batch in args.batch_sizes:
                    try:
                        if peer is not None and PEER in variants:
                            enc = encode(tok, bench_prompts(batch), device)
                            peer_info["check"][str(batch)] = peer_check(bench, enc, min(args.new_tokens, 8))
                        run_batch(bench, batch, variants, args, bar, measured)
                        bar.set_postfix_str(f"b{batch} hook cost")
                        data["hook_cost"][str(batch)] = decode_hook_cost(
                            bench,
                            encode(tok, bench_prompts(batch), device),
                            variants,
                            args.hook_calls,
                            args.hook_rounds,
                        )
                    except Exception as e:  # keep the other batch sizes; reported, exit status 1
                        data["errors"].append(dict(batch=batch, variant=None, error=repr(e),
                                                   traceback=traceback.format_exc()))  # fmt: skip
                        bar.write(f"ERROR: batch {batch}: {e!r}")
            except KeyboardInterrupt:
                data["interrupted"] = True
                bar.write("interrupted: writing what was measured so far")
        data["elapsed_s"] = time.perf_counter() - t_start
    finally:
        tmp.cleanup()
    if args.quick:  # the vectors lived in a temporary folder
        data["settings"]["vectors"] = "(temporary random vectors)"
    finish_cases(data, measured)
    lat.publish(data, out, "llm", write_outputs, render_markdown)
    return data


if __name__ == "__main__":
    results = main()
    sys.exit(1 if results.get("errors") or results.get("interrupted") else 0)
