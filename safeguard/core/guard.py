"""A guard: the defenses attached to one pipeline, sharing one call monitor."""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..concepts.concept import Concept
from .config import DefenseConfig
from .defense import Defense
from .registry import get_defense_class
from .report import CallReport

logger = logging.getLogger(__name__)


class Guard:
    """Defenses in composition order (text, guidance, denoiser side) on one adapter."""

    def __init__(self, adapter: Any, concepts: tuple[Concept, ...], configs: tuple[DefenseConfig, ...]):
        self.adapter = adapter
        self.concepts = concepts
        self.configs = tuple(sorted(configs, key=lambda c: get_defense_class(c.defense).order))
        self.monitor: Any = None
        self.defenses: list[Defense] = []

    @property
    def key(self) -> tuple:
        return (self.concepts, self.configs)

    def check(self) -> None:
        for cfg in self.configs:
            get_defense_class(cfg.defense).check_compatible(self.adapter)

    def attach(self) -> Guard:
        self.monitor = self.adapter.make_monitor()
        try:
            self.monitor.attach()
            for cfg in self.configs:
                defense = get_defense_class(cfg.defense)(cfg, self.concepts)
                defense.attach(self.adapter, monitor=self.monitor)
                self.defenses.append(defense)
                logger.info("attached %s to %s", cfg.defense, self.adapter.pipeline_name)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        while self.defenses:
            self.defenses.pop().detach()
        if self.monitor is not None:
            self.monitor.detach()
            self.monitor = None

    def report(self) -> CallReport | None:
        m = self.monitor
        if m is None or m.calls == 0:
            return None
        return CallReport(
            call_index=m.calls,
            guarded=m.guarded_call,
            steps=m.step + 1,
            step_unit=getattr(self.adapter, "step_unit", "denoiser steps"),
            defenses=[copy.deepcopy(d.report) for d in self.defenses],
        )
