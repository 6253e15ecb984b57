"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two text encoders and a pooled embedding."""

from __future__ import annotations

from .base import Condition, PipelineAdapter

_EHS = ("encoder_hidden_states",)
_POOLED = ("added_cond_kwargs", "text_embeds")


class SDXLAdapter(PipelineAdapter):
    family = "sdxl"
    cond_paths = (_EHS, _POOLED)
    text_layout = (("text_encoder", "text_encoder_2"),)
    pooled_layout = (_POOLED, ("text_encoder_2",))

    def _encode(self, text: str, negative: str | None = None) -> tuple[Condition, Condition]:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=text,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
        return {_EHS: pos, _POOLED: pooled}, {_EHS: neg, _POOLED: neg_pooled}
