"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` and subclasses, e.g. ShapesWorld)."""

from __future__ import annotations

from .base import Condition, PipelineAdapter


class SDAdapter(PipelineAdapter):
    family = "sd"
    cond_paths = (("encoder_hidden_states",),)

    def _encode(self, text: str, negative: str | None = None) -> tuple[Condition, Condition]:
        pos, neg = self.pipe.encode_prompt(
            prompt=text,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
        return {("encoder_hidden_states",): pos}, {("encoder_hidden_states",): neg}
