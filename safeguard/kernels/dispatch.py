"""Which implementation a kernel call takes: Triton or the eager reference (see :mod:`safeguard.kernels`)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "SAFEGUARD_DISABLE_KERNELS"


def kernels_disabled() -> bool:
    """``True`` when ``SAFEGUARD_DISABLE_KERNELS`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel call on tensors like ``t`` takes the Triton path.

    CUDA tensors: yes, unless kernels are disabled or Triton is missing. CPU tensors: only under
    Triton's interpreter. Other devices (MPS, XPU...): the eager reference.
    """
    if kernels_disabled() or not triton_available():
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreting()


def block_size(n: int, cap: int = 1 << 16) -> int:
    """The next power of two >= ``n`` (Triton blocks are powers of two), at least 16."""
    return max(16, min(cap, 1 << max(0, (n - 1).bit_length())))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers: the number of blocks of ``b`` that cover ``a``."""
    return -(-a // b)
