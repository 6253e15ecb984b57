"""The conditional guard's detector: does this request deserve steering?

A detector scores each prompt from residual-stream states read during the prefill, through one or
two *views*; a view is a direction set, a decoder layer and a pooling of that layer's states:

- ``"last"``: the state of the prompt's last real token (the end of the chat template's assistant
  header, where the model has read the whole request);
- ``"prompt"``: the mean over the request's own tokens (:func:`~safeguard.steering.reading.prompt_weights`:
  after each row's first token and after the chat template's fixed prefix);
- ``"encoder"``: not a layer's state but the request text's all-MiniLM-L6-v2 sentence embedding
  (:mod:`safeguard.steering.encoder`), its direction the ``[1, 384]`` set ``condition_encoder``.

A view's score is the cosine of the pooled state with its direction. The calibrated detectors
(:mod:`safeguard.steering.build`) are ``"last"`` and ``"prompt"`` (one view, the raw cosine) and
``"both"``: the sum of the two views' cosines, each standardised by the mean and standard deviation
of its out-of-fold training scores, so neither view dominates by scale; ``"both+encoder"`` adds the
encoder view to those two the same way. ``"mlp"`` reads the same three views as ``"both+encoder"`` but scores
their unit-normalised states with a small learned head (:mod:`safeguard.steering.head`) instead of a sum of cosines;
its threshold is on the head's logit. A row is steered when its score exceeds the detector's threshold.

Example:
    >>> det = resolve_detector(vecs)  # doctest: +SKIP
    >>> det.name, det.layers, det.threshold  # doctest: +SKIP
    ('both', [14, 28], 0.71)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..core.errors import InvalidOptionError
from .head import MLPHead, head_features

POOLS = ("last", "prompt", "encoder")
DETECTORS = ("last", "prompt", "both", "both+encoder", "mlp")
SUMMED = ("both", "both+encoder", "mlp")  # thresholds not on a cosine's scale


@dataclass(frozen=True)
class View:
    """One reading of the prompt: direction set ``set`` at ``layer``, pooled by ``pool``; score ``(cos - center) / scale``."""

    set: str
    layer: int
    pool: str
    center: float = 0.0
    scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Detector:
    """A named set of views and the threshold on the sum of their scores (or on ``head``'s logit of them)."""

    name: str
    views: tuple[View, ...]
    threshold: float
    head: MLPHead | None = None

    @property
    def layers(self) -> list[int]:
        """The decoder layers the views read (the encoder view reads none)."""
        return sorted({v.layer for v in self.views if v.pool != "encoder"})

    @property
    def deepest(self) -> int:
        return max(self.layers)

    @property
    def needs_prompt_weights(self) -> bool:
        return any(v.pool in ("prompt", "encoder") for v in self.views)

    @property
    def needs_encoder(self) -> bool:
        return any(v.pool == "encoder" for v in self.views)

    def units(self, vecs: Any) -> list[torch.Tensor]:
        """Each view's unit direction (float32, CPU)."""
        return [vecs.directions[v.set][v.layer].float() for v in self.views]


def pool_states(h: torch.Tensor, pool: str, last_index: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``[B, d]`` float32: the last real token's state, or the weighted mean over the request's tokens.

    Picks or averages in ``h``'s own dtype (no float32 copy of the whole ``[B, T, d]`` state), then converts.
    """
    h = h.detach()
    if pool == "last":
        return h[torch.arange(h.shape[0], device=h.device), last_index].float()
    if weights is None:
        raise ValueError("the 'prompt' pooling needs the prompt weights of this forward")
    return torch.einsum("bt,btd->bd", weights.to(device=h.device, dtype=h.dtype), h).float()


def view_scores(pooled: Sequence[torch.Tensor], units: Sequence[torch.Tensor], det: Detector) -> torch.Tensor:
    """``[B]`` detector scores from each view's pooled states ``[B, d]``."""
    if det.head is not None:
        feats = head_features(pooled)
        return det.head.to(feats.device)(feats)
    total = None
    for x, u, v in zip(pooled, units, det.views):
        cos = (x @ u.to(x.device)) / x.norm(dim=-1).clamp_min(1e-12)
        s = (cos - v.center) / v.scale
        total = s if total is None else total + s
    assert total is not None
    return total


def resolve_detector(
    vecs: Any, name: str | None = None, condition_layer: int | None = None, threshold: float | None = None
) -> Detector:
    """The detector the options ask for, from the vectors' calibration.

    ``name=None`` takes the calibrated choice (``calibration["detector"]``; ``"last"`` for vectors calibrated
    before detectors had names). ``condition_layer`` moves the ``"last"`` view to that layer; given without
    ``name`` it selects the ``"last"`` detector. ``threshold`` replaces the detector's threshold (for ``"both"`` and ``"both+encoder"``
    it is on the standardised scale, for ``"mlp"`` on the head's logit).
    """
    cal = vecs.calibration
    table = cal.get("detectors") or {}
    if name is not None and name not in DETECTORS:
        raise InvalidOptionError(f"detector={name!r} is not one of {list(DETECTORS)}.")
    chosen = name or cal.get("detector") or "last"
    if condition_layer is not None and chosen != "last":
        if name is not None:
            raise InvalidOptionError(
                f"condition_layer={condition_layer} sets the layer of the 'last' detector, but detector={name!r}; "
                "drop condition_layer or use detector='last'."
            )
        chosen = "last"
    summed = chosen in SUMMED  # thresholds on a sum of standardised cosines or a logit
    if threshold is not None and not summed and not -1.0 <= threshold <= 1.0:
        raise InvalidOptionError(
            f"threshold={threshold} is outside [-1, 1]: detector {chosen!r} scores a cosine; give a cosine "
            "threshold, or detector='both' for a threshold on the sum of standardised cosines."
        )
    if threshold is not None and name is None and chosen != "last":
        entry = table.get(chosen, {})
        warnings.warn(
            f"threshold={threshold} applies to the calibrated detector {chosen!r}"
            + (
                " (a logit of the learned head"
                if chosen == "mlp"
                else " (a sum of standardised cosines"
                if summed
                else " (a cosine of the request-token mean"
            )
            + f"; calibrated threshold {entry.get('threshold', float('nan')):.3f}). Pass detector={chosen!r} to "
            "say so, or detector='last' for a cosine threshold on the last prompt token.",
            stacklevel=4,
        )
    if chosen == "last":
        layer = int(condition_layer if condition_layer is not None else cal.get("condition_layer", 0))
        base = "condition" if "condition" in vecs.directions else "concept"
        thr = threshold if threshold is not None else cal.get("threshold", 0.0)
        return Detector("last", (View(base, layer, "last"),), float(thr))
    if chosen not in table:
        raise InvalidOptionError(
            f"detector={chosen!r} is not calibrated in these vectors (calibrated: {sorted(table) or ['last']}); "
            "recalibrate them with scripts/calibrate_repe.py or use detector='last'."
        )
    entry = table[chosen]
    views = tuple(View(**v) for v in entry["views"])
    missing = sorted({v.set for v in views} - set(vecs.directions))
    if missing:
        raise InvalidOptionError(f"detector={chosen!r} needs direction sets {missing}, which these vectors lack.")
    head = None
    if entry.get("head"):
        if entry["head"] not in vecs.heads:
            raise InvalidOptionError(
                f"detector={chosen!r} needs the learned head {entry['head']!r}, which these vectors lack; "
                "recalibrate them with scripts/calibrate_repe.py or use detector='both+encoder'."
            )
        head = MLPHead.from_tensors(vecs.heads[entry["head"]])
    thr = threshold if threshold is not None else entry["threshold"]
    return Detector(chosen, views, float(thr), head)
