"""Loader of the embedded ShapesWorld text-to-image model (DESIGN.md §3).

Example:
    >>> from safeguard.models import shapes_pipeline
    >>> pipe = shapes_pipeline()
    >>> image = pipe("a red star on a white background").images[0]  # 64x64 PIL image
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from .minilm import load_minilm

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "shapesworld"


class ShapesWorldPipeline(StableDiffusionPipeline):
    """A plain ``StableDiffusionPipeline`` whose call defaults suit the tiny ShapesWorld model.

    ``default_num_inference_steps`` and ``default_guidance_scale`` are used when a call does not
    give ``num_inference_steps`` / ``guidance_scale``; change them on the instance if you like.
    """

    default_num_inference_steps: int = 20
    default_guidance_scale: float = 5.0

    def __call__(
        self, *args: Any, num_inference_steps: int | None = None, guidance_scale: float | None = None, **kwargs: Any
    ):
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        return super().__call__(*args, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)


def shapes_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
    progress: bool = False,
) -> ShapesWorldPipeline:
    """Build the ShapesWorld pipeline from the weights shipped in the package, with no network.

    Args:
        device: where to put the modules.
        dtype: parameter dtype (weights are stored in fp16 and upcast on load).
        weights_dir: a folder with ``vae/``, ``unet/`` and ``scheduler/`` (default: the environment
            variable ``SAFEGUARD_SHAPESWORLD_WEIGHTS`` if set, else the weights shipped in the package).
        progress: show the pipeline's per-step progress bar.

    Returns:
        A :class:`ShapesWorldPipeline` (a ``StableDiffusionPipeline``) on ``device``.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

    from ..core.errors import MissingWeightsError

    if weights_dir is None:
        weights_dir = os.environ.get("SAFEGUARD_SHAPESWORLD_WEIGHTS") or WEIGHTS_DIR
    folder = Path(weights_dir)
    missing = [n for n in ("vae", "unet", "scheduler") if not (folder / n).is_dir()]
    if missing:
        raise MissingWeightsError(
            f"ShapesWorld weights folder {str(folder)!r} lacks {missing}; train and export them with "
            "'python scripts/train_shapesworld.py all' or pass weights_dir= pointing at an exported folder"
        )
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    tokenizer, text_encoder = load_minilm(device, dtype)
    pipe = ShapesWorldPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)
