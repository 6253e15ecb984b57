"""Exact colour and background reading for ShapesWorld images (DESIGN.md §3).

Background: the median colour of the image border, snapped to the nearest world background.
Colour: the pixels far from that background (the object's core, so anti-aliased edges do not
pull the mean towards the background), their mean RGB, snapped to the nearest palette colour.

Example:
    >>> from safeguard.models.shapesworld.world import SceneSpec, render
    >>> read_color(render(SceneSpec("black", "yellow", "circle"))).color
    'yellow'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.shapesworld.world import BACKGROUNDS, COLORS

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)
_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.array([COLORS[n] for n in _COLOR_NAMES], dtype=np.float32)

MIN_OBJECT_PIXELS = 12  # fewer object pixels than this: no object found
MIN_OBJECT_DISTANCE = 60.0  # RGB distance from the background that counts as "object"
CORE_FRACTION = 0.6  # object core: distance >= this share of the largest distance


@dataclass(frozen=True)
class ColorReading:
    background: str
    background_confidence: float
    color: str | None
    color_confidence: float
    object_pixels: int
    mean_rgb: tuple[float, float, float] | None


def _nearest(rgb: np.ndarray, table: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(table - rgb[None, :], axis=1)
    order = np.argsort(d)
    best, second = d[order[0]], d[order[1]]
    confidence = float(1.0 - best / max(second, 1e-6))
    return int(order[0]), confidence


def read_color(image: np.ndarray) -> ColorReading:
    """Read background and object colour of a ``(64, 64, 3)`` uint8 (or 0..1 float) image."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.asarray(img, dtype=np.float32) * 255.0, 0, 255)
    img = img.astype(np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    bg_rgb = np.median(border, axis=0)
    bg_idx, bg_conf = _nearest(bg_rgb, _BG_RGB)
    dist = np.linalg.norm(img - _BG_RGB[bg_idx][None, None, :], axis=-1)
    far = dist >= MIN_OBJECT_DISTANCE
    n_far = int(far.sum())
    if n_far < MIN_OBJECT_PIXELS:
        return ColorReading(_BG_NAMES[bg_idx], bg_conf, None, 0.0, n_far, None)
    core = dist >= max(MIN_OBJECT_DISTANCE, CORE_FRACTION * float(dist.max()))
    mean = img[core].mean(axis=0)
    c_idx, c_conf = _nearest(mean, _COLOR_RGB)
    return ColorReading(
        _BG_NAMES[bg_idx], bg_conf, _COLOR_NAMES[c_idx], c_conf, n_far, (float(mean[0]), float(mean[1]), float(mean[2]))
    )
