"""Collect the activations of any named module of a diffusers pipeline, streamed to disk in chunks.

:func:`collect_activations` puts a forward hook on one module, named by a dotted path that starts
with a pipeline component (``text_encoder.encoder.layer.4``, ``unet.up_blocks.1.attentions.0``),
runs the pipeline on a list of prompts and writes the hooked output as rows ``[n, d]``:

- **text-encoder modules** (component ``text_encoder``, ``text_encoder_2``, ...): one row per
  *real* token. Each batch is tokenised with the matching tokenizer exactly as
  ``StableDiffusionPipeline.encode_prompt`` does (padding to ``model_max_length``, truncation) and
  the text encoder is called directly (no denoising); the attention mask is passed to the encoder
  only when its config says ``use_attention_mask`` (as diffusers does). Rows are selected with the
  tokenizer's attention mask, so padding is skipped; for CLIP that keeps BOS, the words and the
  first EOS (the EOS copies used as padding by SD 1.x are dropped). A module whose output is
  ``[batch, hidden]`` (a pooled output) gives one row per prompt. Layers of several text encoders
  joined by ``+`` (``text_encoder.encoder.layers.10+text_encoder_2.encoder.layers.28``, Concept
  Steerers' SDXL choice) are concatenated per token, which needs tokenizers that split alike.
- **denoiser modules** (component ``unet`` or ``transformer``): the pipeline runs normally with
  ``output_type="latent"`` (no VAE decoding) and the hook fires at every denoiser call. An output
  ``[B, C, H, W]`` gives one row per spatial position (``[H*W, C]`` per image, row-major), an output
  ``[B, N, C]`` one row per token. With classifier-free guidance the batch is
  ``[negative; positive]``: only the conditional (second) half is kept. Each row also records the
  index of the denoiser call it came from (0 .. steps-1 for one-call-per-step schedulers) in an
  ``int16`` array, and ``meta.json`` lists the scheduler timestep of each index.

A tuple or ``ModelOutput`` output contributes its first item (``last_hidden_state`` / ``sample``).

On disk (``out_dir``)::

    meta.json                 format, module, kind, d, rows, chunk list, prompt count and hash,
                              model, dtype, seed, steps, guidance scale, "complete"
    chunk_00000.safetensors   "acts" [n, d] (float16 by default), "timestep" [n] int16 (denoiser)
    chunk_00001.safetensors   ...

Memory stays bounded: rows go to CPU as soon as the hook sees them and a chunk of ``chunk_rows``
rows is written whenever that many are buffered. A folder whose ``meta.json`` says complete with
the same settings is not collected again; an incomplete one (an interrupted run) is cleared and
collected from scratch.

:class:`ActivationDataset` reads such a folder back: shuffled training minibatches across chunks
(a few chunks in memory at a time) and a held-out split (the last rows, i.e. the last prompts).

Example:
    >>> from safeguard.models import shapes_pipeline
    >>> from safeguard.sae.activations import ActivationDataset, collect_activations
    >>> pipe = shapes_pipeline()
    >>> meta = collect_activations(pipe, "text_encoder.encoder.layer.4", prompts, "runs/sae/te4")  # doctest: +SKIP
    >>> ds = ActivationDataset("runs/sae/te4")  # doctest: +SKIP
    >>> for batch in ds.train_batches(4096, epoch=0): ...  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidOptionError, MissingWeightsError, did_you_mean

logger = logging.getLogger(__name__)

FORMAT = "safeguard-activations"
FORMAT_VERSION = 1
META_FILE = "meta.json"
CHUNK_NAME = "chunk_{:05d}.safetensors"
DENOISER_COMPONENTS = ("unet", "transformer", "prior", "decoder")
_HUGE_MAX_LENGTH = 100_000  # tokenizers without a real limit report ~1e30
# meta keys that must match for a complete folder to be reused
_SETTING_KEYS = (
    "module",
    "kind",
    "prompts",
    "prompts_sha256",
    "steps",
    "guidance_scale",
    "seed",
    "max_rows",
    "dtype",
    "model",
)


class _Full(Exception):
    """Raised inside a hook once ``max_rows`` rows are collected, to stop the pipeline early."""


# ---------------------------------------------------------------------------- module lookup


def _components(pipe: Any) -> dict[str, nn.Module]:
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        comps = {name: getattr(pipe, name, None) for name in dir(pipe) if not name.startswith("_")}
    return {name: mod for name, mod in comps.items() if isinstance(mod, nn.Module)}


def module_kind(component: str) -> str:
    """``"text"`` for ``text_encoder*`` components, ``"denoiser"`` for ``unet`` / ``transformer``."""
    if component.startswith("text_encoder"):
        return "text"
    if component in DENOISER_COMPONENTS:
        return "denoiser"
    raise InvalidOptionError(
        f"component {component!r} is neither a text encoder (text_encoder, text_encoder_2, ...) nor a denoiser "
        f"({', '.join(DENOISER_COMPONENTS)}); activations can only be collected from those."
    )


def resolve_module(pipe: Any, module_name: str) -> tuple[str, nn.Module, nn.Module, str]:
    """Split ``"unet.up_blocks.1"`` into ``(component name, component, module, kind)``.

    Raises:
        InvalidOptionError: unknown component or submodule (the message lists close names).
    """
    if not isinstance(module_name, str) or not module_name.strip():
        raise InvalidOptionError(f"module name {module_name!r} must be a dotted path like 'unet.up_blocks.1'.")
    component, _, rest = module_name.strip().partition(".")
    comps = _components(pipe)
    if component not in comps:
        raise InvalidOptionError(
            f"pipeline {type(pipe).__name__} has no module component {component!r}; components: "
            f"{sorted(comps)}.{did_you_mean(component, sorted(comps))}"
        )
    kind = module_kind(component)
    root = comps[component]
    if not rest:
        return component, root, root, kind
    try:
        module = root.get_submodule(rest)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        raise InvalidOptionError(
            f"{component} ({type(root).__name__}) has no submodule {rest!r}.{did_you_mean(rest, names)} "
            f"List them with `python -m safeguard sae modules --model ...` or {component}.named_modules()."
        ) from None
    return component, root, module, kind


def list_modules(pipe: Any, max_depth: int = 3) -> list[str]:
    """Dotted names of the text-encoder and denoiser modules of ``pipe`` up to ``max_depth`` dots."""
    out = []
    for component, root in sorted(_components(pipe).items()):
        try:
            module_kind(component)
        except InvalidOptionError:
            continue
        for name, _ in root.named_modules():
            if name.count(".") < max_depth:
                out.append(f"{component}.{name}" if name else component)
    return out


def _first_tensor(output: Any, module_name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # ModelOutput is an OrderedDict: its first value is its first field
        output = tuple(v for v in output.values() if v is not None)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidOptionError(
        f"module {module_name!r} returned {type(output).__name__}, not a tensor or a tuple starting with one; "
        "pick a module whose output is the activation (e.g. a whole block or layer)."
    )


# ---------------------------------------------------------------------------- writing


def _fp16_safe(acts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.float16, torch.bfloat16) and acts.dtype != dtype:
        limit = torch.finfo(dtype).max
        if acts.is_floating_point() and acts.abs().max() > limit:
            logger.warning("activations beyond the %s range were clamped to +-%g", dtype, limit)
            acts = acts.clamp(-limit, limit)
    return acts.to(dtype)


def _save_chunk(path: Path, acts: torch.Tensor, timestep: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    tensors = {"acts": acts.contiguous()}
    if timestep is not None:
        tensors["timestep"] = timestep.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


class _ChunkWriter:
    """Buffers rows on the CPU and writes a chunk file of exactly ``chunk_rows`` rows whenever
    that many are buffered (the last chunk holds the rest)."""

    def __init__(self, folder: Path, chunk_rows: int, dtype: torch.dtype, max_rows: int | None) -> None:
        self.folder, self.chunk_rows, self.dtype, self.max_rows = folder, chunk_rows, dtype, max_rows
        self.acts: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []
        self.buffered = 0
        self.rows = 0  # written + buffered
        self.d: int | None = None
        self.chunks: list[dict[str, Any]] = []
        self.with_timestep: bool | None = None

    @property
    def full(self) -> bool:
        return self.max_rows is not None and self.rows >= self.max_rows

    def add(self, acts: torch.Tensor, timestep: torch.Tensor | None = None) -> None:
        if acts.ndim != 2:
            raise InvalidOptionError(f"activation rows must be [n, d], got shape {list(acts.shape)}.")
        if self.d is None:
            self.d, self.with_timestep = int(acts.shape[1]), timestep is not None
        elif acts.shape[1] != self.d:
            raise InvalidOptionError(f"activation width changed from {self.d} to {acts.shape[1]} between calls.")
        if self.max_rows is not None:
            keep = max(0, self.max_rows - self.rows)
            acts = acts[:keep]
            timestep = timestep[:keep] if timestep is not None else None
        if acts.shape[0] == 0:
            return
        self.acts.append(_fp16_safe(acts.detach().to("cpu"), self.dtype))
        if timestep is not None:
            self.steps.append(timestep.detach().to("cpu", torch.int16))
        self.buffered += acts.shape[0]
        self.rows += acts.shape[0]
        while self.buffered >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, n: int) -> None:
        acts = torch.cat(self.acts)
        steps = torch.cat(self.steps) if self.steps else None
        name = CHUNK_NAME.format(len(self.chunks))
        _save_chunk(self.folder / name, acts[:n].clone(), steps[:n].clone() if steps is not None else None)
        self.chunks.append({"file": name, "rows": n})
        self.acts = [acts[n:]] if n < acts.shape[0] else []
        self.steps = [steps[n:]] if steps is not None and n < steps.shape[0] else []
        self.buffered -= n

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_FILE)


def read_meta(folder: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of an activation folder, or ``None`` when there is none."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidOptionError(f"could not read {str(path)!r}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidOptionError(
            f"{str(path)!r} is not a safeguard activation folder (format {FORMAT!r}); use another folder."
        )
    return meta


def _clear(folder: Path) -> None:
    for path in folder.glob("chunk_*.safetensors*"):
        path.unlink()
    for name in (META_FILE, META_FILE + ".tmp"):
        (folder / name).unlink(missing_ok=True)


def write_activations(
    acts: torch.Tensor,
    out_dir: str | Path,
    *,
    timestep: torch.Tensor | None = None,
    chunk_rows: int = 65536,
    dtype: torch.dtype = torch.float16,
    **meta: Any,
) -> dict[str, Any]:
    """Write rows ``[n, d]`` you already have (e.g. synthetic data) as an activation folder that
    :class:`ActivationDataset` reads, replacing any collection in ``out_dir``. Extra keyword
    arguments go into ``meta.json``."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder)
    writer = _ChunkWriter(folder, _positive("chunk_rows", chunk_rows), dtype, None)
    writer.add(acts.reshape(-1, acts.shape[-1]), timestep.reshape(-1) if timestep is not None else None)
    writer.close()
    full = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "tensor",
        **meta,
        "d": int(acts.shape[-1]),
        "rows": writer.rows,
        "chunk_rows": chunk_rows,
        "chunks": writer.chunks,
        "has_timestep": timestep is not None,
        "dtype": str(dtype).removeprefix("torch."),
        "complete": True,
    }
    _write_meta(folder, full)
    return full


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name}={value!r} must be a positive integer.")
    return value


# ---------------------------------------------------------------------------- collection


def _tokenize(tokenizer: Any, prompts: list[str]) -> Any:
    max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_length, int) and max_length < _HUGE_MAX_LENGTH:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return tokenizer(prompts, padding="longest", return_tensors="pt")


def _text_part_rows(pipe: Any, part: tuple, batch: list[str], text_rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One text module's rows for a batch (real tokens only) and the tokenizer's mask."""
    component, root, module, _ = part
    tokenizer = getattr(pipe, "tokenizer" + component[len("text_encoder") :], None)
    if tokenizer is None:
        raise InvalidOptionError(f"pipeline has no tokenizer for {component!r}.")
    use_mask = bool(getattr(getattr(root, "config", None), "use_attention_mask", False))
    tok = _tokenize(tokenizer, batch)
    mask = tok.attention_mask.bool() if "attention_mask" in tok else torch.ones_like(tok.input_ids, dtype=bool)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, o: captured.append(_first_tensor(o, component)))
    device = next(root.parameters()).device
    try:
        with torch.no_grad():
            root(tok.input_ids.to(device), attention_mask=mask.long().to(device) if use_mask else None)
    finally:
        handle.remove()
    return text_rows(component, captured[0], mask).cpu(), mask


def collect_activations(
    pipe: Any,
    module_name: str,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    chunk_rows: int = 65536,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_rows: int | None = None,
    dtype: torch.dtype = torch.float16,
    model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``pipe`` on ``prompts`` and stream the output of ``module_name`` to ``out_dir``.

    Args:
        pipe: a diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, FLUX layouts).
        module_name: dotted path from a component, e.g. ``"text_encoder.encoder.layer.4"`` or
            ``"unet.up_blocks.1.attentions.0"`` (see :func:`list_modules`).
        prompts: the prompts; each is used once.
        out_dir: folder for ``meta.json`` and the chunk files (created).
        chunk_rows: rows per chunk file (the last may hold fewer); bounds the memory used.
        steps, guidance_scale: denoiser modules only: passed to the pipeline when given (else the
            pipeline's defaults). ``guidance_scale <= 1`` disables classifier-free guidance.
        seed: image ``i`` starts from the noise of ``torch.Generator("cpu").manual_seed(seed + i)``.
        batch_size: prompts per pipeline / text-encoder call.
        max_rows: stop once this many rows are written (default: all prompts).
        dtype: storage dtype of the rows (float16 halves the disk use; values beyond its range are
            clamped, with a warning).
        model: a name recorded in ``meta.json`` (default: the pipeline's ``name_or_path`` or class).
        overwrite: re-collect even when ``out_dir`` holds a complete collection with other settings.
        progress: show a tqdm bar over prompts.

    Returns:
        The ``meta.json`` contents (``rows``, ``d``, ``chunks``, ...). If ``out_dir`` already holds a
        complete collection with the same settings, it is returned without running anything.

    Raises:
        InvalidOptionError: bad module name, a module whose output cannot be split into rows, or an
            existing complete collection with different settings (without ``overwrite``).
    """
    from tqdm.auto import tqdm

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise InvalidOptionError("collect_activations needs at least one prompt.")
    _positive("chunk_rows", chunk_rows)
    _positive("batch_size", batch_size)
    if max_rows is not None:
        _positive("max_rows", max_rows)
    parts = [resolve_module(pipe, part.strip()) for part in module_name.split("+")]
    component, root, module, kind = parts[0]
    if len(parts) > 1 and (any(p[3] != "text" for p in parts) or len({p[0] for p in parts}) != len(parts)):
        raise InvalidOptionError(
            f"module {module_name!r}: only layers of different text encoders can be concatenated with '+' "
            "(e.g. SDXL's 'text_encoder.encoder.layers.10+text_encoder_2.encoder.layers.28')."
        )
    if model is None:
        model = str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or type(pipe).__name__)
    settings = {
        "module": module_name,
        "kind": kind,
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "steps": steps if kind == "denoiser" else None,
        "guidance_scale": guidance_scale if kind == "denoiser" else None,
        "seed": seed,
        "max_rows": max_rows,
        "dtype": str(dtype).removeprefix("torch."),
        "model": model,
    }
    folder = Path(out_dir)
    old = read_meta(folder) if folder.is_dir() else None
    if old is not None and old.get("complete"):
        same = all(old.get(key) == settings[key] for key in _SETTING_KEYS)
        if same and not overwrite:
            logger.info("%s already holds these activations (%d rows); not collecting again", folder, old["rows"])
            return old
        if not overwrite:
            diff = {key: (old.get(key), settings[key]) for key in _SETTING_KEYS if old.get(key) != settings[key]}
            raise InvalidOptionError(
                f"{str(folder)!r} already holds a complete collection with other settings {diff} (stored, asked); "
                "pass overwrite=True (--overwrite) to replace it, or choose another output folder."
            )
    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder)  # an interrupted collection restarts from scratch
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **settings,
        "component": component,
        "pipeline": type(pipe).__name__,
        "batch_size": batch_size,
        "chunk_rows": chunk_rows,
        "complete": False,
    }
    _write_meta(folder, meta)

    writer = _ChunkWriter(folder, chunk_rows, dtype, max_rows)
    state: dict[str, Any] = {"n": 0, "mask": None, "call": -1, "timesteps": []}

    def text_rows(part_name: str, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if h.ndim == 3 and tuple(h.shape[:2]) == tuple(mask.shape):
            return h[mask.to(h.device)]
        if h.ndim == 2 and h.shape[0] == mask.shape[0]:
            return h
        raise InvalidOptionError(
            f"module {part_name!r} output has shape {list(h.shape)}; expected [batch, tokens, hidden] with "
            f"batch, tokens = {list(mask.shape)} (or a pooled [batch, hidden])."
        )

    def denoiser_pre_hook(_mod: nn.Module, args: Any, kwargs: Any) -> None:
        state["call"] += 1
        if state["record_timesteps"]:
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            if isinstance(t, torch.Tensor):
                t = t.reshape(-1)[0].item() if t.numel() else None
            state["timesteps"].append(float(t) if t is not None else None)

    def denoiser_hook(_mod: nn.Module, _args: Any, output: Any) -> None:
        h = _first_tensor(output, module_name)
        n = state["n"]
        if h.shape[0] == 2 * n:
            h = h[n:]  # classifier-free guidance: [negative; positive], keep the conditional half
        elif h.shape[0] != n:
            raise InvalidOptionError(
                f"module {module_name!r} output has batch {h.shape[0]}; expected {n} prompts or {2 * n} "
                "(with classifier-free guidance)."
            )
        if h.ndim == 4:  # [B, C, H, W] -> one row per position
            rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        elif h.ndim == 3:  # [B, N, C] -> one row per token
            rows = h.reshape(-1, h.shape[-1])
        elif h.ndim == 2:
            rows = h
        else:
            raise InvalidOptionError(f"module {module_name!r} output has shape {list(h.shape)}; cannot make rows.")
        timestep = torch.full((rows.shape[0],), state["call"], dtype=torch.int16)
        writer.add(rows, timestep)
        if writer.full:
            raise _Full

    handles = []
    bar = tqdm(total=len(prompts), desc=f"collect {module_name}", unit="prompt", disable=not progress)
    try:
        if kind == "text":
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                per_part = [_text_part_rows(pipe, p, batch, text_rows) for p in parts]
                counts = {tuple(int(m.sum()) for m in mask) for _, mask in per_part}
                if len(counts) != 1:
                    raise InvalidOptionError(
                        f"module {module_name!r}: the parts' tokenizers split the prompts differently {sorted(counts)}; "
                        "concatenated layers need tokenizers that agree (as SDXL's two CLIP tokenizers do)."
                    )
                writer.add(torch.cat([rows for rows, _ in per_part], -1))
                bar.update(len(batch))
                if writer.full:
                    break
        else:
            handles.append(root.register_forward_pre_hook(denoiser_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(denoiser_hook))
            call: dict[str, Any] = {"output_type": "latent"}
            if steps is not None:
                call["num_inference_steps"] = steps
            if guidance_scale is not None:
                call["guidance_scale"] = guidance_scale
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                state.update(n=len(batch), call=-1, record_timesteps=start == 0)
                gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
                try:
                    with torch.no_grad():
                        pipe(prompt=batch, generator=gens, **call)
                except _Full:
                    break
                if start == 0:
                    meta["denoiser_calls"] = state["call"] + 1
                bar.update(len(batch))
            meta["timesteps"] = state["timesteps"]
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    writer.close()
    if writer.d is None:
        raise InvalidOptionError(f"module {module_name!r} produced no rows for {len(prompts)} prompt(s).")
    meta.update(
        d=writer.d, rows=writer.rows, chunks=writer.chunks, has_timestep=bool(writer.with_timestep), complete=True
    )
    _write_meta(folder, meta)
    return meta


# ---------------------------------------------------------------------------- reading


class ActivationDataset:
    """Reads an activation folder: shuffled training minibatches and a held-out split.

    The held-out rows are the last ``ceil(holdout * rows)`` rows in collection order, i.e. those of
    the last prompts, so no prompt is (except at the boundary) on both sides.

    Args:
        folder: a folder written by :func:`collect_activations` or :func:`write_activations`.
        holdout: share of rows held out for evaluation, in ``[0, 1)``.
        chunks_in_memory: chunk files shuffled together at a time (memory: that many chunks).
        seed: seed of the shuffling (together with the epoch number).
    """

    def __init__(self, folder: str | Path, *, holdout: float = 0.05, chunks_in_memory: int = 4, seed: int = 0) -> None:
        self.folder = Path(folder)
        meta = read_meta(self.folder) if self.folder.is_dir() else None
        if meta is None:
            raise MissingWeightsError(
                f"no activations in {str(self.folder)!r} (no {META_FILE}); collect them first with "
                "safeguard.sae.collect_activations or `python -m safeguard sae collect`."
            )
        if not meta.get("complete"):
            raise MissingWeightsError(
                f"the activation collection in {str(self.folder)!r} is incomplete (interrupted?); run the "
                "collection again, it restarts cleanly."
            )
        if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
            raise InvalidOptionError(f"holdout={holdout!r} must be in [0, 1).")
        self.meta = meta
        self.seed = int(seed)
        self.chunks_in_memory = _positive("chunks_in_memory", chunks_in_memory)
        self.d = int(meta["d"])
        self.files = [self.folder / c["file"] for c in meta["chunks"]]
        self.counts = [int(c["rows"]) for c in meta["chunks"]]
        self.offsets = [0]
        for n in self.counts:
            self.offsets.append(self.offsets[-1] + n)
        self.rows = self.offsets[-1]
        held = math.ceil(holdout * self.rows) if holdout > 0 else 0
        self.heldout_rows = min(held, self.rows - 1)
        self.train_rows = self.rows - self.heldout_rows
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise MissingWeightsError(f"activation chunk files are missing: {missing[:5]}; collect again.")

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({str(self.folder)!r}, module={self.meta.get('module')!r}, d={self.d}, "
            f"rows={self.rows}, train={self.train_rows}, heldout={self.heldout_rows}, chunks={len(self.files)})"
        )

    def load_chunk(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of chunk ``index``: ``"acts"`` and, for denoiser modules, ``"timestep"``."""
        from safetensors.torch import load_file

        return load_file(str(self.files[index]), device="cpu")

    def _part(self, index: int, train: bool) -> torch.Tensor:
        acts = self.load_chunk(index)["acts"]
        cut = max(0, min(self.counts[index], self.train_rows - self.offsets[index]))
        return acts[:cut] if train else acts[cut:]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Minibatches per epoch: ``train_rows // batch_size`` (the remainder is dropped), at least 1."""
        return max(1, self.train_rows // batch_size)

    def train_batches(
        self, batch_size: int, epoch: int = 0, skip: int = 0, seed: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Shuffled ``[batch_size, d]`` minibatches of the training rows (in the stored dtype, CPU).

        The order is a pure function of ``(seed, epoch)`` (``seed`` defaults to the dataset's): chunks in random order, ``chunks_in_memory``
        of them at a time, rows shuffled within (rows left over carry into the next group). ``skip``
        drops the first batches (to resume mid-epoch). When fewer than ``batch_size`` training rows
        exist, one batch holds them all.
        """
        _positive("batch_size", batch_size)
        seed = self.seed if seed is None else seed
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
        order = [i for i in torch.randperm(len(self.files), generator=g).tolist() if self.offsets[i] < self.train_rows]
        total = self.steps_per_epoch(batch_size)
        produced = 0
        carry = torch.empty(0, self.d)
        for start in range(0, len(order), self.chunks_in_memory):
            parts = [self._part(i, train=True) for i in order[start : start + self.chunks_in_memory]]
            rows = torch.cat([carry.to(parts[0].dtype), *parts])
            rows = rows[torch.randperm(rows.shape[0], generator=g)]
            full = rows.shape[0] // batch_size
            for j in range(full):
                if produced >= total:
                    return
                if produced >= skip:
                    yield rows[j * batch_size : (j + 1) * batch_size]
                produced += 1
            carry = rows[full * batch_size :]
        if produced < total and carry.shape[0] and produced >= skip:
            yield carry

    def heldout_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The held-out rows in order, in batches of at most ``batch_size`` (none when ``holdout=0``)."""
        _positive("batch_size", batch_size)
        for i in range(len(self.files)):
            if self.offsets[i + 1] <= self.train_rows:
                continue
            part = self._part(i, train=False)
            yield from part.split(batch_size)

    def mean(self, max_rows: int = 1_000_000) -> torch.Tensor:
        """Mean training row (float32), over at most ``max_rows`` rows in stored order."""
        total = torch.zeros(self.d, dtype=torch.float64)
        n = 0
        for i in range(len(self.files)):
            if n >= max_rows or self.offsets[i] >= self.train_rows:
                break
            part = self._part(i, train=True)[: max_rows - n]
            total += part.to(torch.float64).sum(0)
            n += part.shape[0]
        return (total / max(n, 1)).float()
