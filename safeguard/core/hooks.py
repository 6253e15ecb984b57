"""Bookkeeping of the PyTorch hooks a defense installs, so removal restores the model exactly.

Example:
    >>> import torch
    >>> reg = HookRegistry("safeguard.demo")
    >>> lin = torch.nn.Linear(2, 2)
    >>> reg.forward_hook(lin, "double", lambda m, a, k, out: out * 2)
    >>> len(lin._forward_hooks)
    1
    >>> reg.remove_all()
    >>> len(lin._forward_hooks)
    0
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)


@dataclass
class HookRecord:
    name: str
    module: nn.Module
    kind: str  # "forward_pre" | "forward"
    handle: RemovableHandle


class HookRegistry:
    """Installs named ``with_kwargs`` hooks and removes them in reverse order (LIFO)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.records: list[HookRecord] = []

    def forward_pre_hook(self, module: nn.Module, name: str, fn: Callable, *, prepend: bool = False) -> None:
        handle = module.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend)
        self.records.append(HookRecord(f"{self.prefix}.{name}", module, "forward_pre", handle))

    def forward_hook(self, module: nn.Module, name: str, fn: Callable, *, prepend: bool = False) -> None:
        handle = module.register_forward_hook(fn, with_kwargs=True, prepend=prepend)
        self.records.append(HookRecord(f"{self.prefix}.{name}", module, "forward", handle))

    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def remove_all(self) -> None:
        while self.records:
            rec = self.records.pop()
            rec.handle.remove()
            logger.debug("removed hook %s", rec.name)


def hook_snapshot(root: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward hook and pre-hook under ``root`` as ``(module path, kind, hook id)``.

    Compare snapshots taken before wrapping and after unwrapping to prove nothing stayed behind
    (libraries such as transformers install hooks of their own, which a plain count would confuse).
    """
    out: set[tuple[str, str, int]] = set()
    for name, m in root.named_modules():
        out.update((name, "forward", k) for k in m._forward_hooks)
        out.update((name, "forward_pre", k) for k in m._forward_pre_hooks)
    return out
