"""``method="negative_prompt"``: concept phrases as negative guidance, merged with the user's own.

On each denoising step with classifier-free guidance, the negative rows of the denoiser batch
whose conditioning is the pipeline's empty-prompt conditioning get the concept's conditioning
instead: exactly what ``pipe(prompt, negative_prompt=<concept text>)`` computes, at no extra cost.
Rows where the user gave a negative prompt (or ``negative_prompt_embeds``) keep it, and one
extra row per such prompt is run with the concept conditioning; the negative prediction handed
back to the pipeline is ``(1 - w) * eps_user + w * eps_concept`` with ``w = merge_weight``, so the
pipeline's guidance pushes away from both.

Example:
    >>> pipe = safeguard.wrap(pipe, concepts=["violence"], method="negative_prompt")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..adapters.base import get_path
from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.registry import register_defense
from .guidance import ConditionCache, append_rows, concept_text, output_sample, replace_rows, sample_of, with_sample


@dataclasses.dataclass(frozen=True)
class NegativePromptConfig(DefenseConfig):
    """Options of ``negative_prompt``.

    Args:
        merge_weight: weight of the concept in the negative prediction where the user also gave a
            negative prompt (0 keeps only the user's, 1 only the concept's).
        text: text to encode instead of the concepts' phrases joined with ', '.
    """

    defense = "negative_prompt"
    version = 1
    merge_weight: float = 0.5
    text: str | None = None

    def validate(self) -> None:
        self._check_number("merge_weight", 0.0, 1.0)
        self._check_optional_text("text")


@register_defense
class NegativePromptDefense(Defense):
    name = "negative_prompt"
    config_class = NegativePromptConfig
    order = 100
    families = ("sd", "sdxl", "sd3")

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str:
        return "it has no batched negative-prompt branch to steer (guidance-distilled model)."

    def _attach(self, adapter: Any) -> None:
        text = self.config.text or concept_text(self.concepts)
        self.conditions = ConditionCache(adapter, self.monitor, text)
        self.report.details["text"] = text
        self.hooks.forward_pre_hook(adapter.denoiser, "denoiser_pre", self.timed(self._pre))
        self.hooks.forward_hook(adapter.denoiser, "denoiser_post", self.timed(self._post), prepend=True)

    def _reset_state(self) -> None:
        self._rows: tuple[list[int], list[int]] | None = None  # (replaced rows, merged rows), fixed per call
        self._pending: tuple[int, list[int]] | None = None
        if hasattr(self, "conditions"):
            self.report.details["text"] = self.conditions.text

    def _pre(self, module, args, kwargs):
        self._pending = None
        adapter, monitor = self.adapter, self.monitor
        if not adapter.cfg_active() or monitor.batch % 2:
            self.report.details["inactive"] = "classifier-free guidance is off for this call"
            return None
        b = monitor.batch // 2
        concept, empty = self.conditions.get(kwargs)
        if self._rows is None:
            ref = adapter.cond_paths[0]
            neg = get_path(kwargs, ref)[:b]
            same = [bool(torch.allclose(neg[i : i + 1], empty[ref], atol=1e-4, rtol=1e-4)) for i in range(b)]
            self._rows = ([i for i in range(b) if same[i]], [i for i in range(b) if not same[i]])
            self.report.details["rows_replaced"] = len(self._rows[0])
            self.report.details["rows_merged_with_user_negative"] = len(self._rows[1])
        replaced, merged = self._rows
        paths = adapter.cond_paths
        if replaced:
            kwargs = replace_rows(kwargs, replaced, concept, paths)
        if merged:
            n = sample_of(args, kwargs).shape[0]
            args, kwargs = append_rows(args, kwargs, merged, concept, paths)
            self._pending = (n, merged)
        self.mark_step()
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        if self._pending is None:
            return None
        n, merged = self._pending
        self._pending = None
        x = output_sample(output)
        w = self.config.merge_weight
        head = x[:n].clone()
        idx = torch.as_tensor(merged, device=x.device)
        head[idx] = (1 - w) * x[idx] + w * x[n : n + len(merged)]
        return with_sample(output, head)
