"""A small learned head over the detector's views: the ``"mlp"`` detector.

The linear detectors (:mod:`safeguard.steering.detector`) score each view by its cosine with one direction and add
the standardised cosines. The ``"mlp"`` detector reads the same views (the last prompt token's state, the mean over
the request's tokens, the request's MiniLM embedding), puts each one's unit-normalised state side by side,
standardises every feature by its training mean and deviation, and scores the row by the mean logit of a few
one-hidden-layer networks trained with different seeds. It was chosen over the linear sum by leave-one-set-out over
the seven read later sets (``scripts/detector_family_experiment.py``).

Training is deterministic for a given seed on one machine: full-batch AdamW on class-weighted binary cross-entropy
(each class carries half the loss), dropout on the standardised inputs.

Example:
    >>> import torch
    >>> pos, neg = torch.randn(40, 8) + 1, torch.randn(50, 8)
    >>> head = train_mlp_head(pos, neg, hidden=16, steps=50)
    >>> head(pos).mean() > head(neg).mean()
    tensor(True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

HEAD_PARAMS = ("mean", "std", "w1", "b1", "w2", "b2")


@dataclass(frozen=True)
class MLPHead:
    """Standardisation ``mean`` / ``std`` ``[D]`` and ``S`` networks ``w1 [S, H, D]``, ``b1 [S, H]``, ``w2 [S, H]``,
    ``b2 [S]``; calling it on features ``[B, D]`` gives the mean logit ``[B]`` (float32)."""

    mean: torch.Tensor
    std: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    _copies: dict[str, MLPHead] = field(default_factory=dict, compare=False, repr=False)

    @property
    def in_features(self) -> int:
        return int(self.mean.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).float().contiguous() for k in HEAD_PARAMS}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> MLPHead:
        return cls(**{k: t[k].float() for k in HEAD_PARAMS})

    def to(self, device: torch.device | str) -> MLPHead:
        """This head on ``device`` (copied once per device, then reused)."""
        device = torch.device(device)
        if device == self.mean.device:
            return self
        key = str(device)
        if key not in self._copies:
            self._copies[key] = MLPHead(**{k: getattr(self, k).to(device) for k in HEAD_PARAMS})
        return self._copies[key]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / self.std
        h = torch.relu(torch.einsum("bd,shd->sbh", z, self.w1) + self.b1[:, None, :])
        return ((h * self.w2[:, None, :]).sum(-1) + self.b2[:, None]).mean(0)


def head_features(pooled: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, sum d]``: each view's pooled states ``[B, d]`` unit-normalised, side by side (float32)."""
    return torch.cat([x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) for x in pooled], dim=-1)


def feature_standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and deviation ``[D]`` of rows ``[N, D]`` (deviation floored at 1e-6)."""
    return x.mean(0), x.std(0).clamp_min(1e-6)


def class_weighted_targets(n_pos: int, n_neg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and per-row loss weights ``[n_pos + n_neg]`` (positives first) giving each class half the weight."""
    y = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)])
    w = torch.cat([torch.full((n_pos,), 0.5 / n_pos), torch.full((n_neg,), 0.5 / n_neg)])
    return y, w


def train_mlp_head(
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    hidden: int = 256,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    dropout: float = 0.3,
) -> MLPHead:
    """Fit the head on positive ``[N, D]`` and negative ``[M, D]`` feature rows (see the module docstring)."""
    both = torch.cat([pos, neg]).float()
    mean, std = feature_standardisation(both)
    x = (both - mean) / std
    y, w = class_weighted_targets(len(pos), len(neg))
    nets = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
            torch.manual_seed(seed)
            nets.append(_fit_one(x, y, w, hidden, steps, lr, weight_decay, dropout))
    return MLPHead(
        mean=mean,
        std=std,
        w1=torch.stack([n[1].weight.detach() for n in nets]),
        b1=torch.stack([n[1].bias.detach() for n in nets]),
        w2=torch.stack([n[3].weight.detach()[0] for n in nets]),
        b2=torch.stack([n[3].bias.detach()[0] for n in nets]),
    )


def _fit_one(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, hidden: int, steps: int, lr: float, wd: float, dropout: float
) -> torch.nn.Sequential:
    with torch.enable_grad():
        net = torch.nn.Sequential(
            torch.nn.Dropout(dropout), torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
        for _ in range(steps):
            opt.zero_grad()
            loss = (w * F.binary_cross_entropy_with_logits(net(x)[:, 0], y, reduction="none")).sum()
            loss.backward()
            opt.step()
    return net


def out_of_fold(
    pos: torch.Tensor,
    neg: torch.Tensor,
    fit: Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]],
    folds: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of each row ``[N, D]`` / ``[M, D]`` under ``fit(pos, neg)`` trained without its fold (row index mod
    ``folds``, the calibration's folds); ``fit`` returns a scorer of rows ``[K, D] -> [K]``."""
    op, on = torch.zeros(len(pos)), torch.zeros(len(neg))
    for tp, tn in fold_masks(len(pos), len(neg), folds):
        score = fit(pos[~tp], neg[~tn])
        op[tp], on[tn] = score(pos[tp]), score(neg[tn])
    return op, on


def fold_masks(n_pos: int, n_neg: int, folds: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each fold ``f`` the boolean masks of the positive and negative rows whose index mod ``folds`` is ``f``."""
    return [(torch.arange(n_pos) % folds == f, torch.arange(n_neg) % folds == f) for f in range(folds)]


def out_of_fold_head_scores(
    pos: torch.Tensor, neg: torch.Tensor, folds: int = 5, **train: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of each row under a head trained without its fold (:func:`out_of_fold` of :func:`train_mlp_head`)."""
    return out_of_fold(pos, neg, lambda p, n: train_mlp_head(p, n, **train), folds)  # type: ignore[arg-type]
