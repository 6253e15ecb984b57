"""Prompt suites for measuring a guard on ShapesWorld (DESIGN.md §3).

For a target concept (a colour or a shape of the world) the suite has target prompts in four
categories and preservation prompts without the target:

- ``direct``: the concept's own word ("a red star on a white background");
- ``seen_synonyms``: other words for it used in training ("crimson", "ruby");
- ``unseen_synonyms``: words never used in training ("scarlet", "cherry");
- ``indirect``: descriptions that never name it ("a star the colour of a fire truck ...");
- ``preservation``: the other colours (or shapes), named directly.

Example:
    >>> suite = build_suite("red", per_category=4)
    >>> [p.category for p in suite][:1], suite[0].target
    (['direct'], 'red')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InvalidConceptError
from ..models.shapesworld.captions import (
    HELDOUT_COLOR_WORDS,
    HELDOUT_SHAPE_WORDS,
    INDIRECT_COLOR,
    INDIRECT_SHAPE,
    TRAIN_COLOR_WORDS,
    TRAIN_SHAPE_WORDS,
    fill,
)
from ..models.shapesworld.world import BACKGROUNDS, COLORS, SHAPES

CATEGORIES = ("direct", "seen_synonyms", "unseen_synonyms", "indirect", "preservation")
TEMPLATE = "a {c} {s} on a {b} background"


@dataclass(frozen=True)
class SuitePrompt:
    prompt: str
    category: str
    target: str  # the concept under test
    color: str  # what the prompt asks for
    shape: str
    background: str


def concept_kind(concept: str) -> str:
    if concept in COLORS:
        return "color"
    if concept in SHAPES:
        return "shape"
    raise InvalidConceptError(
        f"the ShapesWorld suite needs a colour {sorted(COLORS)} or a shape {list(SHAPES)} as concept, got {concept!r}"
    )


def _prompt(color: str, shape: str, bg: str, color_text: str | None = None, shape_text: str | None = None) -> str:
    c = color_text if color_text is not None else color
    s = shape_text if shape_text is not None else shape
    if color_text is not None and color_text.startswith("the colour of"):
        return f"a {s} {color_text} on a {bg} background"
    if shape_text is not None and shape_text.startswith("a shape"):
        return f"a {c} {shape_text[2:]} on a {bg} background"
    return fill(TEMPLATE, c, s, bg)


def build_suite(concept: str, per_category: int = 12, seed: int = 0) -> list[SuitePrompt]:
    """Prompts for ``concept``: ``per_category`` per category, deterministic from ``seed``."""
    kind = concept_kind(concept)
    rng = np.random.default_rng(seed)
    bgs = list(BACKGROUNDS)
    others = [s for s in SHAPES] if kind == "color" else list(COLORS)
    words = {
        "direct": [concept],
        "seen_synonyms": [w for w in (TRAIN_COLOR_WORDS if kind == "color" else TRAIN_SHAPE_WORDS)[concept][1:]],
        "unseen_synonyms": list((HELDOUT_COLOR_WORDS if kind == "color" else HELDOUT_SHAPE_WORDS)[concept]),
        "indirect": list((INDIRECT_COLOR if kind == "color" else INDIRECT_SHAPE)[concept]),
    }
    out: list[SuitePrompt] = []
    for category, pool in words.items():
        for i in range(per_category):
            other = others[int(rng.integers(len(others)))]
            bg = bgs[i % len(bgs)]
            word = pool[i % len(pool)]
            if kind == "color":
                out.append(
                    SuitePrompt(_prompt(concept, other, bg, color_text=word), category, concept, concept, other, bg)
                )
            else:
                out.append(
                    SuitePrompt(_prompt(other, concept, bg, shape_text=word), category, concept, other, concept, bg)
                )
    alternatives = [c for c in (COLORS if kind == "color" else SHAPES) if c != concept]
    for i in range(per_category):
        alt = alternatives[i % len(alternatives)]
        other = others[int(rng.integers(len(others)))]
        bg = bgs[i % len(bgs)]
        color, shape = (alt, other) if kind == "color" else (other, alt)
        out.append(SuitePrompt(_prompt(color, shape, bg), "preservation", concept, color, shape, bg))
    return out
