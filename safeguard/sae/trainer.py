"""Train a :class:`~safeguard.sae.TopKSAE` on collected activations (sparsify-style recipe).

Recipe (EleutherAI sparsify / Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

- loss = FVU of the batch + ``auxk_alpha`` * AuxK loss; Adam, learning rate by default
  ``2e-4 / sqrt(num_latents / 2**14)``;
- ``b_dec`` starts at the mean training row, decoder rows at random unit vectors with the encoder
  tied to them;
- after every step the decoder rows are renormalised to unit norm, and before it the gradient
  component parallel to each decoder row is removed;
- dead latents: a latent is dead once it has not fired for ``dead_rows`` training rows. The AuxK
  loss makes the ``k_aux = d_in // 2`` largest pre-activations among dead latents reconstruct the
  residual of the TopK reconstruction (scaled down when fewer latents are dead), which revives them.

Checkpoints (``out_dir``), written every ``checkpoint_every`` steps / ``checkpoint_seconds``, at the
end, and on Ctrl-C:

- ``cfg.json`` + ``sae.safetensors``: the SAE in sparsify layout (:func:`~safeguard.sae.save_sae`);
- ``trainer_state.safetensors``: SAE parameters (``param.<name>``), Adam moments
  (``exp_avg.<name>``, ``exp_avg_sq.<name>``) and the per-latent "rows since fired" counter, with
  the step counters and config as JSON in the file's metadata (one file, replaced atomically, so
  a crash never leaves a half-written state). Resuming reads only this file;
- ``trainer_state.json``: the same counters, readable;
- ``metrics.json`` (at the end): held-out FVU, dead-latent shares and measured L0.

No pickles anywhere. A resumed run continues the same data order (a pure function of the seed and
the epoch), so on one device it reproduces an uninterrupted run exactly.

Example:
    >>> from safeguard.sae.activations import ActivationDataset
    >>> from safeguard.sae.trainer import TrainConfig, train_sae
    >>> ds = ActivationDataset("runs/sae/te4")  # doctest: +SKIP
    >>> result = train_sae(ds, TrainConfig(expansion_factor=4, k=32, max_steps=2000), "runs/sae/te4/sae")  # doctest: +SKIP
    >>> result.metrics["fvu"], result.metrics["dead_share"], result.metrics["l0"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import InvalidOptionError
from .activations import ActivationDataset
from .checkpoint import save_sae
from .topk import SAEConfig, TopKSAE

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
METRICS_FILE = "metrics.json"
STATE_FORMAT = "safeguard-sae-trainer"
STATE_VERSION = 1
MAX_DEAD_ROWS = 10_000_000
# TrainConfig fields that may change between a run and its resumption
_RESUMABLE_CHANGES = {"max_steps", "epochs", "checkpoint_every", "checkpoint_seconds", "device", "eval_batch_size"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train a TopK SAE.

    Args:
        expansion_factor: ``num_latents = d_in * expansion_factor`` (unless ``num_latents`` is set).
        k: active latents per row.
        num_latents: dictionary size; overrides ``expansion_factor``.
        lr: Adam learning rate (default ``2e-4 / sqrt(num_latents / 16384)``, sparsify's scaling).
        batch_size: rows per step (capped at the number of training rows).
        max_steps: optimizer steps in all (default: ``epochs`` passes over the training rows).
        epochs: passes over the data when ``max_steps`` is not given.
        auxk_alpha: weight of the AuxK loss on dead latents (0 disables it).
        dead_rows: a latent is dead once it has not fired for this many training rows (default:
            one epoch of training rows, at most 10M, so small data sets still get AuxK).
        seed: SAE init and data order.
        checkpoint_every: steps between checkpoints (0: only at the end).
        checkpoint_seconds: also checkpoint when this many seconds passed since the last one
            (``None``: no time-based checkpoints).
        device: ``"cuda"``, ``"cpu"``... (default: CUDA when available).
        eval_batch_size: rows per batch in the final evaluation (default ``batch_size``).
    """

    expansion_factor: float = 4
    k: int = 32
    num_latents: int | None = None
    lr: float | None = None
    batch_size: int = 4096
    max_steps: int | None = None
    epochs: int = 1
    auxk_alpha: float = 1 / 32
    dead_rows: int | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    checkpoint_seconds: float | None = 600.0
    device: str | None = None
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            bad = isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1)
            if bad:
                raise InvalidOptionError(
                    f"TrainConfig.{name}={value!r} must be an integer >= {0 if allow_zero else 1}"
                    + (" or None." if allow_none else ".")
                )

        for name in ("k", "batch_size", "epochs"):
            positive_int(name)
        for name in ("num_latents", "max_steps", "dead_rows", "eval_batch_size"):
            positive_int(name, allow_none=True)
        positive_int("checkpoint_every", allow_zero=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidOptionError(f"TrainConfig.seed={self.seed!r} must be a non-negative integer.")
        for name, allow_zero in (("expansion_factor", False), ("auxk_alpha", True), ("lr", False)):
            value = getattr(self, name)
            if value is None and name == "lr":
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not allow_zero):
                raise InvalidOptionError(f"TrainConfig.{name}={value!r} must be a finite number > 0.")
        if self.checkpoint_seconds is not None and not (
            isinstance(self.checkpoint_seconds, (int, float)) and self.checkpoint_seconds > 0
        ):
            raise InvalidOptionError(f"TrainConfig.checkpoint_seconds={self.checkpoint_seconds!r} must be > 0 or None.")

    def sae_config(self, d_in: int) -> SAEConfig:
        if self.num_latents is not None:
            return SAEConfig(d_in=d_in, num_latents=self.num_latents, k=self.k)
        return SAEConfig.from_expansion(d_in, self.expansion_factor, self.k)

    def resolved_lr(self, num_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(num_latents / 2**14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidOptionError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(names)}.")
        return cls(**data)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_sae` returns.

    Attributes:
        sae: the trained SAE (on the training device, float32).
        metrics: the contents of ``metrics.json``.
        out_dir: the checkpoint folder (loadable with :func:`~safeguard.sae.load_sae`).
        step: optimizer steps done in all.
        resumed_from: the step a resumed run started from (0 for a fresh run).
    """

    sae: TopKSAE
    metrics: dict[str, Any]
    out_dir: Path
    step: int
    resumed_from: int


# ---------------------------------------------------------------------------- loss pieces


def _remove_parallel_grad(sae: TopKSAE) -> None:
    """Drop the component of each decoder row's gradient along the row (sparsify)."""
    grad = sae.W_dec.grad
    if grad is None:
        return
    w = sae.W_dec.data
    parallel = (grad * w).sum(dim=1, keepdim=True)
    grad.sub_(parallel * w)


def _step_losses(
    sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fvu, auxk loss, TopK indices) of one batch; ``dead`` is a bool mask over latents."""
    pre = sae.pre_acts(x)
    values, indices = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    x_hat = sae.decode(values, indices)
    e = x - x_hat
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    fvu = e.pow(2).sum() / total_var
    auxk = x.new_zeros(())
    if dead is not None:
        num_dead = int(dead.sum())
        if num_dead:
            k_aux = max(1, x.shape[-1] // 2)
            scale = min(num_dead / k_aux, 1.0)
            k_aux = min(k_aux, num_dead)
            aux_vals, aux_idx = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1, sorted=False)
            e_hat = F.embedding_bag(aux_idx, sae.W_dec, per_sample_weights=aux_vals, mode="sum")
            auxk = scale * (e_hat - e.detach()).pow(2).sum() / total_var
    return fvu, auxk, indices


# ---------------------------------------------------------------------------- checkpoints


def _param_names(sae: TopKSAE) -> list[str]:
    return [name for name, _ in sae.named_parameters()]


def _save_state(out: Path, sae: TopKSAE, opt: torch.optim.Adam, since_fired: torch.Tensor, info: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {"since_fired": since_fired.detach().cpu().contiguous()}
    adam_steps = {}
    for name, param in sae.named_parameters():
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        state = opt.state.get(param, {})
        if "exp_avg" in state:
            tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
            adam_steps[name] = float(state["step"])
    info = {**info, "adam_steps": adam_steps}
    tmp = out / (STATE_FILE + ".tmp")
    save_file(
        tensors, str(tmp), metadata={"format": STATE_FORMAT, "version": str(STATE_VERSION), "state": json.dumps(info)}
    )
    os.replace(tmp, out / STATE_FILE)
    save_sae(sae, out)
    tmp_json = out / (STATE_JSON + ".tmp")
    tmp_json.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_json, out / STATE_JSON)


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") != STATE_FORMAT or meta.get("version") != str(STATE_VERSION):
        raise InvalidOptionError(
            f"{str(path)!r} is not a safeguard SAE trainer state (format {STATE_FORMAT!r} v{STATE_VERSION}); "
            "delete it or train with resume=False (--no-resume)."
        )
    return tensors, json.loads(meta["state"])


def _restore(
    sae: TopKSAE, opt: torch.optim.Adam, since_fired: torch.Tensor, tensors: dict[str, torch.Tensor], info: dict
) -> None:
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(tensors[f"param.{name}"])
        since_fired.copy_(tensors["since_fired"])
    state = {}
    for i, name in enumerate(_param_names(sae)):
        if f"exp_avg.{name}" in tensors:
            state[i] = {
                "step": torch.tensor(info["adam_steps"][name], dtype=torch.float32),
                "exp_avg": tensors[f"exp_avg.{name}"],
                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"],
            }
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _fingerprint(dataset: ActivationDataset) -> dict[str, Any]:
    return {
        "folder": str(dataset.folder),
        "module": dataset.meta.get("module"),
        "d": dataset.d,
        "rows": dataset.rows,
        "train_rows": dataset.train_rows,
        "prompts_sha256": dataset.meta.get("prompts_sha256"),
    }


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_sae(
    sae: TopKSAE, dataset: ActivationDataset, batch_size: int = 8192, device: str | torch.device | None = None
) -> dict[str, Any]:
    """FVU, measured L0 and never-active share of ``sae`` on the held-out rows of ``dataset``
    (the training rows when it has none).

    Returns a dict with ``fvu`` (sum of squared errors over the summed squared deviation from the
    held-out mean), ``l0`` (mean count of nonzero latent activations per row), ``heldout_dead_share``
    (share of latents that never fire on those rows), ``eval_rows`` and ``eval_split``.
    """
    device = torch.device(device) if device is not None else sae.device
    split = "heldout" if dataset.heldout_rows else "train"
    if split == "heldout":
        batches = dataset.heldout_batches(batch_size)
    else:
        batches = (b for i in range(len(dataset.files)) for b in dataset._part(i, train=True).split(batch_size))
    err = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
    nonzero = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    n = 0
    for batch in batches:
        x = batch.to(device=device, dtype=sae.dtype)
        values, indices = sae.encode(x)
        x_hat = sae.decode(values, indices)
        x64 = x.to(torch.float64)
        err += (x64 - x_hat.to(torch.float64)).pow(2).sum()
        sum_x += x64.sum(0)
        sum_x2 += x64.pow(2).sum()
        active = values > 0
        nonzero += active.sum()
        fired[indices[active]] = True
        n += x.shape[0]
    if n == 0:
        raise InvalidOptionError(f"no rows to evaluate in {dataset!r}.")
    total_var = (sum_x2 - sum_x.pow(2).sum() / n).clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "fvu": float(err / total_var),
        "l0": float(nonzero / n),
        "heldout_dead_share": float(1.0 - fired.float().mean()),
        "eval_rows": n,
        "eval_split": split,
    }


# ---------------------------------------------------------------------------- training


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_sae(
    dataset: ActivationDataset | str | Path,
    cfg: TrainConfig | None = None,
    out_dir: str | Path = "sae",
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train a TopK SAE on ``dataset`` and write it, its trainer state and ``metrics.json`` to ``out_dir``.

    Args:
        dataset: an :class:`~safeguard.sae.activations.ActivationDataset` or its folder.
        cfg: the :class:`TrainConfig` (default ``TrainConfig()``).
        out_dir: checkpoint folder (a sparsify SAE folder once done).
        resume: continue from ``out_dir/trainer_state.safetensors`` when present. Only
            ``max_steps``, ``epochs``, checkpoint settings, ``device`` and ``eval_batch_size`` may
            differ from the saved run; a run already at ``max_steps`` is only re-evaluated.
            ``resume=False`` starts over and replaces the folder's checkpoint.
        progress: tqdm bar with the loss, the (smoothed) training FVU and the dead-latent share.

    Returns:
        A :class:`TrainResult`; ``metrics`` holds ``fvu`` (held-out), ``dead_share`` (latents that did
        not fire in the last ``dead_rows`` training rows), ``heldout_dead_share`` (never firing on the
        held-out rows), ``l0`` (measured mean nonzeros per row), ``steps``, ``rows_seen``...
    """
    from tqdm.auto import tqdm

    if not isinstance(dataset, ActivationDataset):
        dataset = ActivationDataset(dataset)
    cfg = cfg or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise InvalidOptionError(f"train_sae needs a TrainConfig, got {type(cfg).__name__}.")
    device = _device(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sae_cfg = cfg.sae_config(dataset.d)
    batch_size = min(cfg.batch_size, dataset.train_rows)
    per_epoch = dataset.steps_per_epoch(batch_size)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    dead_rows = cfg.dead_rows if cfg.dead_rows is not None else min(MAX_DEAD_ROWS, per_epoch * batch_size)
    lr = cfg.resolved_lr(sae_cfg.num_latents)

    sae = TopKSAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae_cfg.num_latents, dtype=torch.long, device=device)
    run = {
        "sae": sae_cfg.to_dict(),
        "train": cfg.to_dict(),
        "lr": lr,
        "batch_size": batch_size,
        "dead_rows": dead_rows,
        "data": _fingerprint(dataset),
    }
    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "rows_seen": 0, "seconds": 0.0, "fvu_ema": None}

    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        tensors, info = _load_state(state_path)
        _check_compatible(info["run"], run, state_path)
        _restore(sae, opt, since_fired, tensors, info)
        counters.update(info["counters"])
        logger.info("resuming %s from step %d", out, counters["step"])
    else:
        with torch.no_grad():
            sae.b_dec.copy_(dataset.mean().to(device))
    resumed_from = counters["step"]

    def checkpoint() -> None:
        _save_state(out, sae, opt, since_fired, {"run": run, "counters": counters, "total_steps": total_steps})

    bar = tqdm(total=total_steps, initial=counters["step"], desc="train sae", unit="step", disable=not progress)
    t_start, t_ckpt, steps_since_ckpt = time.perf_counter(), time.perf_counter(), 0
    seconds_before = counters["seconds"]
    try:
        while counters["step"] < total_steps:
            for batch in dataset.train_batches(
                batch_size, counters["epoch"], skip=counters["batch_in_epoch"], seed=cfg.seed
            ):
                x = batch.to(device=device, dtype=torch.float32, non_blocking=True)
                dead = since_fired > dead_rows if cfg.auxk_alpha > 0 else None
                fvu, auxk, indices = _step_losses(sae, x, dead)
                loss = fvu + cfg.auxk_alpha * auxk
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _remove_parallel_grad(sae)
                opt.step()
                sae.set_decoder_norm_to_unit_norm()
                with torch.no_grad():
                    since_fired += x.shape[0]
                    since_fired[indices.reshape(-1)] = 0

                counters["step"] += 1
                counters["batch_in_epoch"] += 1
                counters["rows_seen"] += x.shape[0]
                steps_since_ckpt += 1
                bar.update(1)
                step = counters["step"]
                if step % 10 == 0 or step == total_steps or step == resumed_from + 1:
                    f = float(fvu.detach())
                    ema = counters["fvu_ema"]
                    counters["fvu_ema"] = f if ema is None else 0.9 * ema + 0.1 * f
                    dead_share = float((since_fired > dead_rows).float().mean())
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.4f}",
                        fvu=f"{counters['fvu_ema']:.4f}",
                        dead=f"{100 * dead_share:.1f}%",
                    )
                counters["seconds"] = seconds_before + time.perf_counter() - t_start
                due_steps = cfg.checkpoint_every and steps_since_ckpt >= cfg.checkpoint_every
                due_time = cfg.checkpoint_seconds is not None and time.perf_counter() - t_ckpt >= cfg.checkpoint_seconds
                if step < total_steps and (due_steps or due_time):
                    checkpoint()
                    t_ckpt, steps_since_ckpt = time.perf_counter(), 0
                if step >= total_steps:
                    break
            else:  # epoch finished
                counters["epoch"] += 1
                counters["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        if counters["step"] > resumed_from:
            checkpoint()
            logger.warning("interrupted at step %d; checkpoint saved, run again to resume", counters["step"])
        raise
    finally:
        bar.close()
    checkpoint()

    metrics = evaluate_sae(sae, dataset, batch_size=cfg.eval_batch_size or batch_size, device=device)
    metrics = {
        "fvu": metrics["fvu"],
        "dead_share": float((since_fired > dead_rows).float().mean()),
        "heldout_dead_share": metrics["heldout_dead_share"],
        "l0": metrics["l0"],
        "k": sae_cfg.k,
        "num_latents": sae_cfg.num_latents,
        "d_in": sae_cfg.d_in,
        "steps": counters["step"],
        "rows_seen": counters["rows_seen"],
        "epochs_seen": counters["rows_seen"] / dataset.train_rows,
        "train_fvu_ema": counters["fvu_ema"],
        "lr": lr,
        "batch_size": batch_size,
        "dead_rows": dead_rows,
        "auxk_alpha": cfg.auxk_alpha,
        "eval_rows": metrics["eval_rows"],
        "eval_split": metrics["eval_split"],
        "train_rows": dataset.train_rows,
        "module": dataset.meta.get("module"),
        "activations": str(dataset.folder),
        "seconds": counters["seconds"],
        "resumed_from": resumed_from,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return TrainResult(sae=sae, metrics=metrics, out_dir=out, step=counters["step"], resumed_from=resumed_from)


def _check_compatible(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    diffs = []
    for key in ("sae", "lr", "batch_size", "dead_rows"):
        if saved.get(key) != now[key]:
            diffs.append(f"{key}: saved {saved.get(key)!r}, now {now[key]!r}")
    saved_train, now_train = saved.get("train", {}), now["train"]
    for key in now_train:
        if key not in _RESUMABLE_CHANGES and key not in ("lr",) and saved_train.get(key) != now_train[key]:
            diffs.append(f"train.{key}: saved {saved_train.get(key)!r}, now {now_train[key]!r}")
    saved_data, now_data = saved.get("data", {}), now["data"]
    for key in ("d", "rows", "train_rows", "module", "prompts_sha256"):
        if saved_data.get(key) != now_data[key]:
            diffs.append(f"data.{key}: saved {saved_data.get(key)!r}, now {now_data[key]!r}")
    if diffs:
        raise InvalidOptionError(
            f"cannot resume from {str(path)!r}: the run differs ({'; '.join(diffs)}). Train with resume=False "
            "(--no-resume) to start over in that folder, or use another output folder."
        )
