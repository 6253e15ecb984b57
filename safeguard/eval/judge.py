"""The ShapesWorld judge: background, colour and shape of an image, with confidences.

Colour and background by the exact rule of :mod:`safeguard.eval.color_rule`; shape by the small
CNN of :mod:`safeguard.eval.shape_classifier` trained on renders (weights shipped with the model).

Example:
    >>> from safeguard.eval.judge import ShapesJudge
    >>> from safeguard.models.shapesworld.world import SceneSpec, render
    >>> ShapesJudge().read(render(SceneSpec("gray", "blue", "cross"))).describe()  # doctest: +SKIP
    'blue cross on gray (colour 0.93, shape 1.00, background 1.00)'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.shapesworld.world import SHAPES
from .color_rule import read_color
from .shape_classifier import ShapeClassifier

JUDGE_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "shapesworld" / "judge.safetensors"


@dataclass(frozen=True)
class Reading:
    background: str
    background_confidence: float
    color: str | None
    color_confidence: float
    shape: str | None
    shape_confidence: float

    def describe(self) -> str:
        if self.color is None:
            return f"no object on {self.background}"
        return (
            f"{self.color} {self.shape} on {self.background} (colour {self.color_confidence:.2f}, "
            f"shape {self.shape_confidence:.2f}, background {self.background_confidence:.2f})"
        )


def _as_array(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return arr


class ShapesJudge:
    """Reads ShapesWorld images. ``read`` takes a PIL image or an (H, W, 3) array (uint8 or 0..1)."""

    def __init__(self, weights: str | Path | None = None):
        from safetensors.torch import load_file

        from ..core.errors import MissingWeightsError

        if weights is None:
            env = os.environ.get("SAFEGUARD_SHAPESWORLD_WEIGHTS")
            weights = (
                Path(env) / "judge.safetensors" if env and (Path(env) / "judge.safetensors").exists() else JUDGE_WEIGHTS
            )
        path = Path(weights)
        if not path.exists():
            raise MissingWeightsError(
                f"judge weights {str(path)!r} not found; train them with 'python scripts/train_shapesworld.py judge' "
                "and export with 'python scripts/train_shapesworld.py export'"
            )
        self.model = ShapeClassifier()
        self.model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        self.model.eval()

    @torch.no_grad()
    def shapes(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shape index and confidence for an ``(N, 64, 64, 3)`` uint8 batch."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        probs = torch.cat([self.model(x[i : i + 256]).softmax(-1) for i in range(0, len(x), 256)])
        conf, idx = probs.max(-1)
        return idx.numpy(), conf.numpy()

    def read_many(self, images) -> list[Reading]:
        arrays = np.stack([_as_array(im) for im in images])
        idx, conf = self.shapes(arrays)
        out = []
        for arr, i, c in zip(arrays, idx, conf):
            col = read_color(arr)
            has = col.color is not None
            out.append(
                Reading(
                    col.background, col.background_confidence, col.color, col.color_confidence,
                    SHAPES[int(i)] if has else None, float(c) if has else 0.0,
                )
            )  # fmt: skip
        return out

    def read(self, image) -> Reading:
        return self.read_many([image])[0]
