"""The defense contract (DESIGN.md §2): attach / detach / reset_state, hooks only.

A defense is built from a config and resolved concepts, attached to an adapter (or a pipeline,
which is adapted on the fly), and detached in reverse order of attachment. Per-call state lives
in ``self.state`` and is replaced at the start of every pipeline call.

Example:
    >>> from safeguard import SLDConfig
    >>> from safeguard.defenses.sld import SLDDefense
    >>> from safeguard.concepts import resolve_concepts
    >>> d = SLDDefense(SLDConfig(), resolve_concepts(["violence"]))
    >>> with d.attach(pipe):              # doctest: +SKIP
    ...     image = pipe("a street at night").images[0]
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ..concepts.concept import Concept
from .config import DefenseConfig
from .errors import IncompatibleMethodError
from .hooks import HookRegistry
from .report import DefenseReport


class Defense:
    """Base class. Subclasses set ``name``, ``config_class``, ``order``, ``families`` and ``_attach``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    order: ClassVar[int] = 100  # composition order: text 0-99, guidance 100-199, denoiser 200-299
    families: ClassVar[tuple[str, ...]] = ()  # adapter families this defense works on

    def __init__(self, config: DefenseConfig, concepts: tuple[Concept, ...]):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.concepts = concepts
        self.hooks = HookRegistry(f"safeguard.{self.name}")
        self.adapter: Any = None
        self.monitor: Any = None  # CallMonitor or GenerationMonitor
        self._own_monitor = False
        self.report = DefenseReport(self.name)
        self.reset_state()

    # ------------------------------------------------------------------ contract
    @classmethod
    def check_compatible(cls, adapter: Any) -> None:
        """Raise :class:`IncompatibleMethodError` if this defense cannot act on ``adapter``."""
        if adapter.family not in cls.families:
            from .registry import available_methods, get_defense_class

            works = [m for m in available_methods() if adapter.family in get_defense_class(m).families]
            raise IncompatibleMethodError(
                f"method {cls.name!r} does not work on {adapter.pipeline_name} ({adapter.family}): "
                f"{cls.unsupported_reason(adapter)} Methods that work there: {works or 'none yet'}."
            )

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str:
        return f"it supports {list(cls.families)} only."

    def attach(self, target: Any, monitor: Any = None) -> Defense:
        """Install this defense's hooks on ``target`` (a pipeline or an adapter). Returns ``self``.

        On any error every hook installed so far is removed before the error propagates.
        """
        from ..adapters import get_adapter

        if self.adapter is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached; detach() it first")
        adapter = get_adapter(target)
        self.check_compatible(adapter)
        self.adapter = adapter
        try:
            if monitor is None:
                monitor = adapter.make_monitor().attach()
                self._own_monitor = True
            self.monitor = monitor
            monitor.listeners.append(self.reset_state)
            self._attach(adapter)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook this defense installed (idempotent, reverse order)."""
        self.hooks.remove_all()
        self._detach()
        if self.monitor is not None:
            if self.reset_state in self.monitor.listeners:
                self.monitor.listeners.remove(self.reset_state)
            if self._own_monitor:
                self.monitor.detach()
        self.monitor = None
        self._own_monitor = False
        self.adapter = None

    def reset_state(self) -> None:
        """Start a fresh per-call state (called by the monitor at the start of each call)."""
        self.report = DefenseReport(self.name)
        self._reset_state()

    def __enter__(self) -> Defense:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ for subclasses
    def _attach(self, adapter: Any) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        """Release anything besides hooks (caches). Hooks are removed by the base class."""

    def _reset_state(self) -> None:
        """Reset subclass per-call state."""

    @property
    def report(self) -> DefenseReport:
        """This call's report; details that a subclass builds from its per-call state are filled in on read."""
        self._fill_report(self._report)
        return self._report

    @report.setter
    def report(self, value: DefenseReport) -> None:
        self._report = value

    def _fill_report(self, report: DefenseReport) -> None:
        """Fill ``report`` from per-call state (called on each read of :attr:`report`, never by hooks)."""

    def timed(self, fn: Callable) -> Callable:
        """Wrap a hook: skip it when the guard is off, and add its wall time to the report."""

        @functools.wraps(fn)
        def hook(*args: Any, **kwargs: Any) -> Any:
            monitor = self.monitor
            if monitor is None or not monitor.active:
                return None
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._report.time_s += time.perf_counter() - t0

        return hook

    def mark_step(self) -> None:
        """Record that this defense changed something on the current step."""
        step = self.monitor.step if self.monitor is not None else -1
        acted = self._report.acted_steps  # not the property: hooks never rebuild a subclass's details
        if not acted or acted[-1] != step:
            acted.append(step)
