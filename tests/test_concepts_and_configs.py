"""Concept resolution, config validation and JSON round-trips (no pipeline needed)."""

from __future__ import annotations

import json

import pytest

import safeguard
from safeguard.concepts import Concept, builtin_concept, resolve_concepts
from safeguard.core.config import DefenseConfig
from safeguard.defenses.sld import PRESETS

SAFREE_NUDITY = [
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
    "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
    "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification",
]  # fmt: skip


def test_nudity_set_is_safree_reference_list():
    assert list(builtin_concept("nudity").phrases) == SAFREE_NUDITY


@pytest.mark.parametrize(
    "name", ["nudity", "violence", "hate", "self-harm", "weapons", "drugs", "red", "purple", "star", "cross"]
)
def test_builtin_sets_exist(name):
    c = builtin_concept(name)
    assert c.name == name and len(c.phrases) >= 1 and all(p.strip() for p in c.phrases)


def test_builtin_name_uses_set_and_free_text_is_verbatim():
    nud, free = resolve_concepts(["Nudity", "a scarlet disk"])
    assert nud.phrases == tuple(SAFREE_NUDITY)
    assert free == Concept("a scarlet disk", ("a scarlet disk",))
    assert free.text == "a scarlet disk"


@pytest.mark.parametrize("bad", [[], None, [""], ["  "], ["ok", " "], [3]])
def test_bad_concepts_raise(bad):
    with pytest.raises(safeguard.InvalidConceptError) as e:
        resolve_concepts(bad)
    assert "concepts" in str(e.value)


def test_unknown_builtin_lookup_suggests():
    with pytest.raises(safeguard.UnknownConceptError, match="Did you mean 'nudity'"):
        builtin_concept("nudty")
    with pytest.raises(KeyError):  # also a builtin KeyError
        builtin_concept("nudty")


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_sld_presets_match_diffusers_safety_config(preset):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    ref = getattr(SafetyConfig, preset.upper())
    cfg = safeguard.SLDConfig(preset=preset)
    assert cfg.sld_scale == ref["sld_guidance_scale"]
    assert cfg.warmup_steps == ref["sld_warmup_steps"]
    assert cfg.threshold == ref["sld_threshold"]
    assert cfg.momentum_scale == ref["sld_momentum_scale"]
    assert cfg.momentum_beta == ref["sld_mom_beta"]
    assert PRESETS[preset]["sld_scale"] == ref["sld_guidance_scale"]


def test_explicit_option_overrides_preset():
    cfg = safeguard.SLDConfig(preset="strong", warmup_steps=3)
    assert cfg.warmup_steps == 3 and cfg.sld_scale == 2000


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"sld_scale": -1.0}, "sld_scale=-1.0"),
        ({"threshold": 1.5}, "threshold=1.5"),
        ({"momentum_beta": 2.0}, "momentum_beta=2.0"),
        ({"warmup_steps": 2.5}, "warmup_steps=2.5"),
        ({"preset": "extreme"}, "'extreme'"),
        ({"sld_scael": 3.0}, "Did you mean 'sld_scale'"),
    ],
)
def test_invalid_sld_options(options, fragment):
    with pytest.raises(safeguard.InvalidOptionError) as e:
        safeguard.SLDConfig.from_options(**options)
    assert fragment in str(e.value)


@pytest.mark.parametrize("cfg", [safeguard.SLDConfig(preset="max", text="x"), safeguard.NegativePromptConfig(0.3)])
def test_config_json_round_trip(cfg):
    data = json.loads(cfg.to_json())
    assert data["defense"] == cfg.defense and data["version"] == 1
    assert DefenseConfig.from_json(cfg.to_json()) == cfg


def test_config_bad_version_and_defense():
    d = safeguard.SLDConfig().to_dict()
    with pytest.raises(safeguard.InvalidOptionError, match="version 99"):
        DefenseConfig.from_dict({**d, "version": 99})
    with pytest.raises(safeguard.UnknownMethodError, match="'sldd'"):
        DefenseConfig.from_dict({**d, "defense": "sldd"})
