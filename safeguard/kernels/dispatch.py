"""Which implementation a kernel call takes: Triton or the eager reference (see :mod:`safeguard.kernels`)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings

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


_warned_interpreter = False


def interpreter_ready() -> bool:
    """Whether triton was imported with its interpreter on (it compiles its standard library at import).

    Imports triton if nothing has yet, so call it only when ``TRITON_INTERPRET=1``. When triton was
    imported earlier without the interpreter, CPU tensors cannot run the kernels in this process: warn
    once and let the caller take the eager path.
    """
    global _warned_interpreter
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    ready = isinstance(tl.sum, InterpretedFunction)
    if not ready and not _warned_interpreter:
        _warned_interpreter = True
        warnings.warn(
            "TRITON_INTERPRET=1 was set after triton was imported in this process, so its CPU interpreter "
            "cannot run; safeguard's kernels take their eager path. Set TRITON_INTERPRET=1 before anything "
            "imports triton (e.g. in the shell) to run them interpreted.",
            stacklevel=3,
        )
    return ready


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel call on ``tensors`` takes the Triton path.

    CUDA tensors: yes, unless kernels are disabled, Triton is missing, or autograd is recording
    through one of them (the kernels have no backward; the eager path keeps the graph). CPU tensors:
    only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton was first imported).
    Other devices (MPS, XPU...): the eager reference.
    """
    kind = tensors[0].device.type
    # the cheapest test first: a CPU tensor outside the interpreter (every CPU decode step) reads one variable
    if kind != "cuda" and (kind != "cpu" or not interpreting()):
        return False
    if kernels_disabled() or not triton_available():
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return kind == "cuda" or interpreter_ready()


def num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel of ``block`` elements: more for wide rows, so registers do not spill."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def block_size(n: int, cap: int = 1 << 16) -> int:
    """The next power of two >= ``n`` (Triton blocks are powers of two), at least 16."""
    return max(16, min(cap, 1 << max(0, (n - 1).bit_length())))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers: the number of blocks of ``b`` that cover ``a``."""
    return -(-a // b)


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current (Triton launches on the current device); a no-op on CPU."""
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
