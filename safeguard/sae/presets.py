"""Where to put SAEs on each model family: layer and block choices from the papers, as presets.

Each preset names the module(s) a defense's SAE reads (dotted paths from the pipeline, as
``python -m safeguard sae train --module`` takes them), the dictionary size as a multiple of the
width, and ``k``. Reference choices:

- Concept Steerers (Kim & Ghadiyaram 2025): SD 1.4's CLIP text encoder, layer 9 output, 4x, k = 32;
  SDXL: layers 10 (CLIP ViT-L) and 28 (OpenCLIP bigG), concatenated per token; FLUX: T5-XXL
  block 22, 16x, k = 64.
- SAeUron (Cywinski & Deja 2025): SD 1.x UNet ``up_blocks.1.attentions.1``, 16x, k = 32.
- ShapesWorld (this project's model, SAEs shipped in ``safeguard/models/weights/sae``): MiniLM
  layer 4 and the same UNet block, both 4x, k = 32 (a small model with little data).

Example:
    >>> from safeguard.sae.presets import sae_preset
    >>> sae_preset("sd1-text").modules
    ('text_encoder.encoder.layers.9',)

CLIP paths are written as transformers 5 names them (``encoder.layers.N``); transformers 4 wraps
them in ``text_model.``: :func:`resolve_preset_module` tries both.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InvalidOptionError, did_you_mean


@dataclass(frozen=True)
class SAEPreset:
    """Modules, size and sparsity of the SAE a defense uses on one model family."""

    method: str  # "sae_text" or "sae_unet"
    modules: tuple[str, ...]  # more than one: activations concatenated per token
    expansion: int
    k: int
    source: str


PRESETS: dict[str, SAEPreset] = {
    "sd1-text": SAEPreset("sae_text", ("text_encoder.encoder.layers.9",), 4, 32, "Concept Steerers, SD 1.4"),
    "sdxl-text": SAEPreset(
        "sae_text",
        ("text_encoder.encoder.layers.10", "text_encoder_2.encoder.layers.28"),
        4,
        32,
        "Concept Steerers, SDXL (two encoders concatenated)",
    ),
    "flux-text": SAEPreset("sae_text", ("text_encoder_2.encoder.block.22",), 16, 64, "Concept Steerers, FLUX T5"),
    "sd1-unet": SAEPreset("sae_unet", ("unet.up_blocks.1.attentions.1",), 16, 32, "SAeUron, SD 1.4"),
    "shapes-text": SAEPreset("sae_text", ("text_encoder.encoder.layer.4",), 4, 32, "ShapesWorld (shipped)"),
    "shapes-unet": SAEPreset("sae_unet", ("unet.up_blocks.1.attentions.1",), 4, 32, "ShapesWorld (shipped)"),
}


def resolve_preset_module(pipe: object, path: str) -> tuple[str, object]:
    """``(path as found, module)`` for a preset path, with or without CLIP's ``text_model.`` level."""
    from .activations import resolve_module

    component, _, rest = path.partition(".")
    tries = [path, f"{component}.text_model.{rest}"] if rest and not rest.startswith("text_model.") else [path]
    error: InvalidOptionError | None = None
    for candidate in tries:
        try:
            return candidate, resolve_module(pipe, candidate)[2]
        except InvalidOptionError as e:
            error = error or e
    assert error is not None
    raise error


def sae_preset(name: str) -> SAEPreset:
    """The preset ``name`` (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise InvalidOptionError(
            f"unknown SAE preset {name!r}.{did_you_mean(name, list(PRESETS))} Presets: {sorted(PRESETS)}."
        )
    return PRESETS[name]
