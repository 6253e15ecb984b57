"""``method="sae_unet"``: SAeUron (Cywinski & Deja 2025) as a denoiser-block hook.

A TopK SAE sits on the output of one denoiser block (reference: ``up_blocks.1.attentions.1``),
one row per spatial position. At wrap time the pipeline runs (hooks bypassed) on prompts that
show the concept and on prompts that show other things; for every denoising step ``t`` and
latent ``j`` the score is ``mean_t,j(concept) / (mean_t,j(others) + eps)`` and the latents above
the ``percentile`` of that step's scores (and active on the concept at all) are selected. At
inference, on the conditional rows, wherever a selected latent exceeds its average activation
at that step, it is multiplied by ``multiplier``; the block output becomes
``h + sum_j (z'_j - z_j) W_dec[j]``, i.e. the edited reconstruction plus the SAE's own
reconstruction error, so every untouched feature passes unchanged (``multiplier = 1`` is
bit-identical to unguarded).

Steps are matched by position in the schedule, so a call with another step count uses the
nearest scored step. Scoring prompts: for ShapesWorld colours and shapes, training captions with
the concept word versus the same captions with other words; otherwise ``"a photo of <phrase>"``
style prompts versus a fixed set of everyday scenes.

Example:
    >>> pipe = safeguard.wrap(pipe, concepts=["star"], method="sae_unet", multiplier=-1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import torch

from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.errors import InvalidOptionError
from ..core.monitor import bypassing
from ..core.registry import register_defense
from ..steering.ops import hidden_of, replace_hidden
from .sae_common import sae_and_module

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "weights" / "sae" / "unet"
GENERIC_TEMPLATES = ("a photo of {}", "a picture showing {}", "an image of {}", "a detailed photo of {}")
EVERYDAY = (
    "a photo of a city street", "a bowl of fruit on a table", "a mountain lake at dawn", "a dog in a park",
    "a cup of coffee", "a bicycle leaning on a wall", "a library interior", "a field of sunflowers",
    "a sailing boat at sea", "a kitchen with wooden cabinets", "a snowy forest", "a child flying a kite",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SAEUNetConfig(DefenseConfig):
    """Options of ``sae_unet``.

    Args:
        multiplier: factor applied to a selected latent where it exceeds its average (negative
            reverses it; 1 leaves everything unchanged).
        percentile: latents above this percentile of a step's concept scores are selected.
        sae: SAE folder (sparsify or SAELens layout); default: the SAE shipped for ShapesWorld.
        module: dotted path of the denoiser block the SAE was trained on (default: recorded with it).
        prompts: scoring prompts per side.
    """

    defense = "sae_unet"
    version = 1
    multiplier: float = -1.0
    percentile: float = 99.0
    sae: str | None = None
    module: str | None = None
    prompts: int = 16

    def validate(self) -> None:
        self._check_number("multiplier", -100.0, 100.0)
        self._check_number("percentile", 0.0, 100.0)
        self._check_optional_text("sae")
        self._check_optional_text("module")
        self._check_number("prompts", 1, 1024, integer=True)


def scoring_prompts(concept: Any, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(prompts with the concept, prompts without)`` for feature scoring."""
    from ..models.shapesworld.captions import (
        TRAIN_BG_WORDS,
        TRAIN_COLOR_WORDS,
        TRAIN_SHAPE_WORDS,
        TRAIN_TEMPLATES,
        fill,
    )

    rng = random.Random(seed)
    name = concept.name.lower()
    if name in TRAIN_COLOR_WORDS or name in TRAIN_SHAPE_WORDS:
        is_color = name in TRAIN_COLOR_WORDS
        words = TRAIN_COLOR_WORDS if is_color else TRAIN_SHAPE_WORDS
        other_names = [k for k in words if k != name]
        pos, neg = [], []
        for i in range(n):
            t = TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)]
            b = rng.choice([w for ws in TRAIN_BG_WORDS.values() for w in ws])
            c_pos = rng.choice(words[name])
            c_neg = rng.choice(words[rng.choice(other_names)])
            other = rng.choice(
                [w for ws in (TRAIN_SHAPE_WORDS if is_color else TRAIN_COLOR_WORDS).values() for w in ws]
            )
            pos.append(fill(t, c_pos, other, b) if is_color else fill(t, other, c_pos, b))
            neg.append(fill(t, c_neg, other, b) if is_color else fill(t, other, c_neg, b))
        return pos, neg
    pos = [
        GENERIC_TEMPLATES[i % len(GENERIC_TEMPLATES)].format(concept.phrases[i % len(concept.phrases)])
        for i in range(n)
    ]
    return pos, [EVERYDAY[i % len(EVERYDAY)] for i in range(n)]


@register_defense
class SAEUNetDefense(Defense):
    """SAeUron: scale a denoiser block's concept features, per timestep, keeping the SAE error."""

    name = "sae_unet"
    config_class = SAEUNetConfig
    order = 210
    families = ("sd", "sdxl")

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str:
        return "it needs a UNet block with an SAE trained on it (SD 1.x/2.x and SDXL)."

    def _attach(self, adapter: Any) -> None:
        cfg: SAEUNetConfig = self.config  # type: ignore[assignment]
        self.sae, module, blocks = sae_and_module(adapter, cfg.sae, SHIPPED, cfg.module, "denoiser")
        if len(blocks) != 1:
            raise InvalidOptionError(f"module={module!r}: sae_unet reads one denoiser block, not several.")
        block = blocks[0]
        self.block = block
        self._score(adapter, cfg)
        self.report.details = {"module": module, "multiplier": cfg.multiplier, "features_per_step": self.counts}
        self.hooks.forward_hook(block, "ablate", self.timed(self._on_block))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, adapter: Any, cfg: SAEUNetConfig) -> None:
        pos, neg = [], []
        for c in self.concepts:
            p, n = scoring_prompts(c, cfg.prompts)
            pos += p
            neg += n
        sums: dict[str, dict[int, torch.Tensor]] = {"pos": {}, "neg": {}}
        counts: dict[str, dict[int, int]] = {"pos": {}, "neg": {}}
        side = {"name": "pos", "step": 0}

        def hook(module, args, output):
            h = hidden_of(output).float()
            h = h[h.shape[0] // 2 :] if adapter.cfg_active() else h  # conditional rows only
            rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]) if h.dim() == 4 else h.reshape(-1, h.shape[-1])
            z = self.sae.encode_dense(rows)
            s, t = side["name"], side["step"]
            sums[s][t] = sums[s].get(t, 0) + z.sum(0)
            counts[s][t] = counts[s].get(t, 0) + rows.shape[0]
            side["step"] += 1

        handle = self.block.register_forward_hook(hook)
        try:
            with bypassing(self.monitor):
                for name, prompts in (("pos", pos), ("neg", neg)):
                    side["name"] = name
                    for i in range(0, len(prompts), 16):
                        side["step"] = 0
                        gen = torch.Generator(device="cpu").manual_seed(i)
                        adapter.pipe(prompts[i : i + 16], generator=gen, output_type="latent")
        finally:
            handle.remove()
        steps = sorted(sums["pos"])
        mean_pos = torch.stack([sums["pos"][t] / counts["pos"][t] for t in steps])  # [T, latents]
        mean_neg = torch.stack([sums["neg"][t] / counts["neg"][t] for t in steps])
        score = mean_pos / (mean_neg + 1e-6)
        cut = torch.quantile(score, cfg.percentile / 100.0, dim=1, keepdim=True)
        self.selected = (score >= cut) & (mean_pos > 0)  # [T, latents]
        self.average = (mean_pos + mean_neg) / 2  # a latent's average activation at that step
        self.counts = [int(x) for x in self.selected.sum(1)]
        self._dev: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _tensors(self, device: torch.device, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (device, t)
        if key not in self._dev:
            idx = self.selected[t].nonzero().flatten()
            self._dev[key] = (idx.to(device), self.average[t, idx].to(device), self.sae.W_dec[idx].float().to(device))
        return self._dev[key]

    def step_index(self, step: int) -> int:
        """The scored step matching denoising step ``step`` of this call (by position in the schedule)."""
        T = self.selected.shape[0]
        n_call = getattr(self.adapter.pipe, "_num_timesteps", None) or T
        if n_call == T:
            return min(step, T - 1)
        return min(T - 1, round(step * (T - 1) / max(n_call - 1, 1)))

    # ------------------------------------------------------------------ hook
    def _on_block(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        t = self.step_index(self.monitor.step)
        h = hidden_of(output)
        idx, avg, w = self._tensors(h.device, t)
        if idx.numel() == 0 or self.config.multiplier == 1.0:
            return None
        start = h.shape[0] // 2 if self.adapter.cfg_active() else 0
        x = h[start:]
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
        z = self.sae.encode_dense(rows.float())[:, idx]  # top-k codes of the selected latents
        gate = (z > avg).to(z.dtype)
        if not bool(gate.any()):
            return None
        delta = ((self.config.multiplier - 1.0) * z * gate) @ w  # edited minus original reconstruction
        if x.dim() == 4:
            delta = delta.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        else:
            delta = delta.reshape(x.shape)
        new = h.clone()
        new[start:] = x + delta.to(h.dtype)
        self.mark_step()
        return replace_hidden(output, new)
