"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): two CLIP encoders, T5, an MMDiT denoiser."""

from __future__ import annotations

from .base import Condition, PipelineAdapter

_EHS = ("encoder_hidden_states",)
_POOLED = ("pooled_projections",)


class SD3Adapter(PipelineAdapter):
    family = "sd3"
    cond_paths = (_EHS, _POOLED)
    text_layout = (("text_encoder", "text_encoder_2"), ("text_encoder_3",))
    pooled_layout = (_POOLED, ("text_encoder", "text_encoder_2"))

    def _encode(self, text: str, negative: str | None = None) -> tuple[Condition, Condition]:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=text,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
        return {_EHS: pos, _POOLED: pooled}, {_EHS: neg, _POOLED: neg_pooled}
