"""``method="sld"``: Safe Latent Diffusion (Schramowski et al., CVPR 2023) as denoiser hooks.

Each guided step gets one extra denoiser row per image, conditioned on the safety concept. With
``u``, ``c``, ``k`` the unconditional, prompt and concept predictions and ``s`` the pipeline's
guidance scale, SLD's update is::

    d      = c - k
    scale  = clamp(|d| * sld_scale, max=1), set to 0 where d >= threshold
    g      = scale * (k - u) + momentum_scale * m
    m      <- momentum_beta * m + (1 - momentum_beta) * g         (every step)
    eps    = u + s * (c - u - g)    from step warmup_steps on, else u + s * (c - u)

The hook hands the pipeline ``c - g`` in place of ``c``, so the pipeline's own guidance formula
``u + s * (c' - u)`` yields exactly SLD's ``eps``. Presets are diffusers' ``SafetyConfig`` values;
explicit options override the preset. Like diffusers, SLD is active only when
``guidance_scale > 1`` (classifier-free guidance on) and ``sld_scale > 1``.

Example:
    >>> pipe = safeguard.wrap(pipe, concepts=["nudity"], method="sld", preset="strong")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.registry import register_defense
from ..kernels import sld_guidance
from .guidance import ConditionCache, append_rows, concept_text, output_sample, sample_of, with_sample

# diffusers.pipelines.stable_diffusion_safe.SafetyConfig
PRESETS: dict[str, dict[str, float]] = {
    "weak": dict(warmup_steps=15, sld_scale=20, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": dict(warmup_steps=10, sld_scale=1000, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": dict(warmup_steps=7, sld_scale=2000, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": dict(warmup_steps=0, sld_scale=5000, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


@dataclasses.dataclass(frozen=True)
class SLDConfig(DefenseConfig):
    """Options of ``sld``. Unset values come from ``preset``.

    Args:
        preset: ``"weak"``, ``"medium"`` (default), ``"strong"`` or ``"max"``.
        sld_scale: safety guidance scale (diffusers' ``sld_guidance_scale``), >= 0.
        warmup_steps: steps before the safety term is applied (diffusers' ``sld_warmup_steps``).
        threshold: only elements where ``c - k < threshold`` are steered, in [0, 1].
        momentum_scale: weight of the momentum term, >= 0.
        momentum_beta: momentum decay, in [0, 1].
        text: text to encode instead of the concepts' phrases joined with ', '.
    """

    defense = "sld"
    version = 1
    preset: str = "medium"
    sld_scale: float | None = None
    warmup_steps: int | None = None
    threshold: float | None = None
    momentum_scale: float | None = None
    momentum_beta: float | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        self._check_choice("preset", list(PRESETS))
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, type(value)(value) if key != "warmup_steps" else int(value))
        super().__post_init__()

    def validate(self) -> None:
        self._check_number("sld_scale", 0.0, None)
        self._check_number("warmup_steps", 0, None, integer=True)
        self._check_number("threshold", 0.0, 1.0)
        self._check_number("momentum_scale", 0.0, None)
        self._check_number("momentum_beta", 0.0, 1.0)
        self._check_optional_text("text")


@register_defense
class SLDDefense(Defense):
    name = "sld"
    config_class = SLDConfig
    order = 110
    families = ("sd", "sdxl", "sd3")

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str:
        return "it has no batched classifier-free guidance for SLD to steer (guidance-distilled model)."

    def _attach(self, adapter: Any) -> None:
        text = self.config.text or concept_text(self.concepts)
        self.conditions = ConditionCache(adapter, self.monitor, text)
        self.hooks.forward_pre_hook(adapter.denoiser, "denoiser_pre", self.timed(self._pre))
        self.hooks.forward_hook(adapter.denoiser, "denoiser_post", self.timed(self._post), prepend=True)

    def _reset_state(self) -> None:
        self._momentum: torch.Tensor | None = None
        self._pending: int | None = None
        cfg = self.config
        self.report.details.update(preset=cfg.preset, warmup_steps=cfg.warmup_steps, sld_scale=cfg.sld_scale)

    def _pre(self, module, args, kwargs):
        self._pending = None
        monitor = self.monitor
        if not self.adapter.cfg_active() or monitor.batch % 2 or self.config.sld_scale <= 1:
            self.report.details["inactive"] = "classifier-free guidance is off (or sld_scale <= 1)"
            return None
        b = monitor.batch // 2
        concept, _ = self.conditions.get(kwargs)
        self._pending = sample_of(args, kwargs).shape[0]
        return append_rows(args, kwargs, range(b, 2 * b), concept, self.adapter.cond_paths)

    def _post(self, module, args, kwargs, output):
        if self._pending is None:
            return None
        n, self._pending = self._pending, None
        cfg = self.config
        b = self.monitor.batch // 2
        x = output_sample(output)
        u, c, k = x[:b], x[b : 2 * b], x[n : n + b]
        guided, self._momentum = sld_guidance(
            u, c, k, self._momentum, sld_scale=cfg.sld_scale, threshold=cfg.threshold,
            momentum_scale=cfg.momentum_scale, momentum_beta=cfg.momentum_beta,
        )  # fmt: skip
        head = x[:n]
        if self.monitor.step >= cfg.warmup_steps:
            head = head.clone()
            head[b : 2 * b] = guided
            self.mark_step()
        return with_sample(output, head)
