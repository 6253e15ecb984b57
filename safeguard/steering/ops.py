"""The two residual-stream edits, shared by the ``repe`` defense and calibration.

Both take a decoder layer's output (a tensor, or a tuple whose first item is the hidden
states, depending on the transformers version) and return the same structure with new hidden
states; ``gate`` is ``None`` (every token) or a ``[B, q, 1]`` (or ``[B, 1, 1]``) 0/1 tensor in the
activation dtype that selects the rows and tokens to edit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import ablate_rows


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def add_vector(h: torch.Tensor, vec: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``h + gate * vec``: shift the selected token states by exactly ``vec``."""
    return h + vec if gate is None else h + gate * vec


def ablate_direction(h: torch.Tensor, unit: torch.Tensor, strength: float, gate: torch.Tensor | None) -> torch.Tensor:
    """``h - strength * (h . u) u`` on the selected tokens (``strength=1`` leaves no component along ``u``).

    The fused kernel :func:`safeguard.kernels.ablate_rows` where it applies, else its eager reference.
    """
    return ablate_rows(h, unit, strength, gate)
