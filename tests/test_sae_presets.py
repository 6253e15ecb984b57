"""SAE presets: every module path resolves on a tiny random model of its family with the real layer count."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import tiny_bert_sd, tiny_sd

import safeguard
from safeguard.sae.activations import resolve_module
from safeguard.sae.presets import PRESETS, resolve_preset_module, sae_preset


class Holder:
    """Stands in for a pipeline: named components only (what module resolution looks at)."""

    def __init__(self, **components):
        self.components = components
        for k, v in components.items():
            setattr(self, k, v)


def clip(layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2, vocab_size=64
    )
    return CLIPTextModel(cfg)


def t5(blocks: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(d_model=8, d_ff=16, d_kv=4, num_layers=blocks, num_heads=2, vocab_size=64)
    return T5EncoderModel(cfg)


@pytest.mark.parametrize(
    "name,make",
    [
        ("sd1-text", lambda: Holder(text_encoder=clip(12))),  # CLIP ViT-L has 12 layers
        ("sdxl-text", lambda: Holder(text_encoder=clip(12), text_encoder_2=clip(32))),  # OpenCLIP bigG: 32
        ("flux-text", lambda: Holder(text_encoder=clip(1), text_encoder_2=t5(24))),  # T5-XXL: 24 blocks
        ("sd1-unet", lambda: tiny_sd()),
        ("shapes-unet", lambda: tiny_sd()),
    ],
)
def test_preset_modules_resolve_on_their_family(name, make):
    pipe = make()
    preset = sae_preset(name)
    for module in preset.modules:
        path, found = resolve_preset_module(pipe, module)
        assert isinstance(found, torch.nn.Module)
        _, _, _, kind = resolve_module(pipe, path)
        assert kind == ("text" if preset.method == "sae_text" else "denoiser")
    assert preset.expansion >= 4 and preset.k >= 32


def test_shapes_text_preset_matches_the_shipped_sae_and_names_are_checked():
    pipe = tiny_bert_sd()
    with pytest.raises(safeguard.InvalidOptionError):  # the tiny BERT has 1 layer; MiniLM has 6
        resolve_module(pipe, sae_preset("shapes-text").modules[0])
    from safeguard.defenses.sae_text import SHIPPED

    meta = (SHIPPED / "text" / "activations_meta.json").read_text()
    assert sae_preset("shapes-text").modules[0] in meta
    with pytest.raises(safeguard.InvalidOptionError, match="sd1-text"):
        sae_preset("sd1-txt")
    assert set(PRESETS) >= {"sd1-text", "sdxl-text", "flux-text", "sd1-unet"}
