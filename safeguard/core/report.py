"""Per-call reports: what each defense did on the last pipeline call."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DefenseReport:
    """What one defense did during one call.

    Attributes:
        name: method name.
        acted_steps: denoising steps (0-based) on which the defense changed something.
        time_s: wall time spent inside the defense's hooks (on a GPU this is launch time only,
            unless the pipeline synchronises; the latency benchmark measures end to end).
        details: defense-specific facts (flagged tokens, thresholds, why it stayed idle...).
    """

    name: str
    acted_steps: list[int] = field(default_factory=list)
    time_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CallReport:
    """What the guard did on one pipeline call (``safeguard.last_report(pipe)``)."""

    call_index: int
    guarded: bool
    steps: int
    defenses: list[DefenseReport]
    step_unit: str = "denoiser steps"  # "forward passes" for language models

    @property
    def time_s(self) -> float:
        return sum(d.time_s for d in self.defenses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"time_s": self.time_s}

    def summary(self) -> str:
        """A few human-readable lines."""
        head = f"call {self.call_index}: " + ("guarded" if self.guarded else "UNGUARDED (safeguard.disabled)")
        lines = [f"{head}, {self.steps} {self.step_unit}, {self.time_s * 1e3:.1f} ms in hooks"]
        for d in self.defenses:
            steps = format_steps(d.acted_steps) if d.acted_steps else "none"
            extra = ", ".join(f"{k}={v}" for k, v in d.details.items())
            lines.append(
                f"  {d.name}: acted on steps {steps}; {d.time_s * 1e3:.1f} ms" + (f"; {extra}" if extra else "")
            )
        return "\n".join(lines)


def format_steps(steps: list[int], sep: str = ",") -> str:
    """Step numbers as ranges, e.g. ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    steps = sorted(steps)
    out: list[str] = []
    start = prev = steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return sep.join(out)
