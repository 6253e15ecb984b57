"""FLUX.1 (``FluxPipeline``): guidance-distilled, so no batched negative branch.

FLUX runs true classifier-free guidance (when ``true_cfg_scale > 1``) as two separate
transformer calls, and its distilled models are usually run without any negative branch, so the
guidance-side defenses (``negative_prompt``, ``sld``) do not apply; text-side and denoiser-side
defenses do.
"""

from __future__ import annotations

from .base import Condition, PipelineAdapter

_EHS = ("encoder_hidden_states",)
_POOLED = ("pooled_projections",)


class FluxAdapter(PipelineAdapter):
    family = "flux"
    cond_paths = (_EHS, _POOLED)
    cfg_batched = False
    text_layout = (("text_encoder_2",),)  # T5 tokens; CLIP gives only the pooled embedding
    pooled_layout = (_POOLED, ("text_encoder",))

    def _encode(self, text: str, negative: str | None = None) -> tuple[Condition, Condition]:
        pos, pooled, _ids = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, device=self.device, num_images_per_prompt=1
        )
        neg, neg_pooled, _ids = self.pipe.encode_prompt(
            prompt=negative or "", prompt_2=None, device=self.device, num_images_per_prompt=1
        )
        return {_EHS: pos, _POOLED: pooled}, {_EHS: neg, _POOLED: neg_pooled}
