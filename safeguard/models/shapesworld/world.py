"""ShapesWorld: a synthetic world where every concept of an image can be measured exactly.

One filled object on a plain background, rendered at 64x64 RGB (DESIGN.md §3). Every render is a
pure function of its :class:`SceneSpec`, and :func:`sample_specs` is a pure function of its seed,
so a data set is reproducible from ``(n, seed)`` alone.

Example:
    >>> from safeguard.models.shapesworld.world import SceneSpec, render
    >>> img = render(SceneSpec(background="white", color="red", shape="star"))
    >>> img.shape, img.dtype
    ((64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 64
SUPERSAMPLE = 4

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZE_RANGE = (0.35, 0.75)  # object extent (circumscribed diameter) as a share of the canvas width

# Rotational symmetry of each shape in degrees: rotating further shows nothing new.
_SYMMETRY = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0}
STAR_INNER_RATIO = 0.45
CROSS_HALF_WIDTH = 0.32  # arm half-width as a share of the circumradius


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines one ShapesWorld image.

    Args:
        background: key of :data:`BACKGROUNDS`.
        color: key of :data:`COLORS`.
        shape: one of :data:`SHAPES`.
        size: circumscribed diameter as a share of the canvas width, within :data:`SIZE_RANGE`.
        cx, cy: centre as a share of the canvas (the object always lies fully inside).
        rotation: degrees, counter-clockwise (ignored for circles).
    """

    background: str
    color: str
    shape: str
    size: float = 0.55
    cx: float = 0.5
    cy: float = 0.5
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} not in {sorted(BACKGROUNDS)}")
        if self.color not in COLORS:
            raise ValueError(f"color {self.color!r} not in {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} not in {list(SHAPES)}")
        if not SIZE_RANGE[0] - 1e-9 <= self.size <= SIZE_RANGE[1] + 1e-9:
            raise ValueError(f"size {self.size} outside {SIZE_RANGE}")
        r = self.size / 2
        if not (r - 1e-9 <= self.cx <= 1 - r + 1e-9 and r - 1e-9 <= self.cy <= 1 - r + 1e-9):
            raise ValueError(f"centre ({self.cx}, {self.cy}) puts a size-{self.size} object off the canvas")


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with circumradius ``r`` (pixels), centre ``(cx, cy)``, rotated."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.deg2rad([90, 210, 330])]
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * STAR_INNER_RATIO
            a = math.radians(90 + 36 * i)
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif shape == "cross":
        w = CROSS_HALF_WIDTH * r
        a = math.sqrt(r * r - w * w)  # arm length such that the corners lie on the circumcircle
        pts = [
            (w, w),
            (a, w),
            (a, -w),
            (w, -w),
            (w, -a),
            (-w, -a),
            (-w, -w),
            (-a, -w),
            (-a, w),
            (-w, w),
            (-w, a),
            (w, a),
        ]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    th = math.radians(rotation)
    c, s = math.cos(th), math.sin(th)
    # image y grows downwards: flip y so that rotation is counter-clockwise on screen
    return [(cx + c * x - s * y, cy - (s * x + c * y)) for x, y in pts]


def render(spec: SceneSpec) -> np.ndarray:
    """Render ``spec`` to a ``(64, 64, 3)`` uint8 array (4x supersampled, box-filtered down)."""
    big = CANVAS * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = spec.cx * big, spec.cy * big, spec.size * big / 2
    fill = COLORS[spec.color]
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, r, spec.rotation), fill=fill)
    return np.asarray(img.resize((CANVAS, CANVAS), Image.Resampling.BOX), dtype=np.uint8)


def sample_spec(rng: np.random.Generator, **fixed: str) -> SceneSpec:
    """Draw one random scene; keyword arguments pin ``background``, ``color`` or ``shape``."""
    bg = fixed.get("background") or str(rng.choice(list(BACKGROUNDS)))
    color = fixed.get("color") or str(rng.choice(list(COLORS)))
    shape = fixed.get("shape") or str(rng.choice(SHAPES))
    size = float(rng.uniform(*SIZE_RANGE))
    r = size / 2
    cx, cy = (float(v) for v in rng.uniform(r, 1 - r, size=2))
    sym = _SYMMETRY[shape]
    rotation = float(rng.uniform(0, sym)) if sym else 0.0
    return SceneSpec(bg, color, shape, size, cx, cy, rotation)


def sample_specs(n: int, seed: int) -> list[SceneSpec]:
    """``n`` random scenes, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(n)]


def render_many(specs: list[SceneSpec]) -> np.ndarray:
    """Render a list of scenes to an ``(n, 64, 64, 3)`` uint8 array."""
    out = np.empty((len(specs), CANVAS, CANVAS, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        out[i] = render(spec)
    return out
