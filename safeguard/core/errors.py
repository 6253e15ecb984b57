"""Errors raised by safeguard.

Every error is a :class:`SafeguardError` and also subclasses the builtin a user would catch
(``KeyError``, ``TypeError``, ``ValueError``...). Messages quote the bad value, list the valid
choices where there are any, and say how to fix the call. Validation happens at wrap/config
time, never inside hooks, and a failed :func:`safeguard.wrap` leaves the pipeline untouched.
"""

from __future__ import annotations


class SafeguardError(Exception):
    """Base class of every error raised by safeguard."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class InvalidConceptError(SafeguardError, ValueError):
    """A concept list is empty, holds a blank string, or holds something that is not a concept."""


class UnknownConceptError(SafeguardError, KeyError):
    """A concept name was looked up as built-in but no such set exists."""


class UnknownMethodError(SafeguardError, ValueError):
    """``method=`` names no registered defense."""


class InvalidOptionError(SafeguardError, ValueError):
    """A defense option is unknown or its value is out of range."""


class UnsupportedPipelineError(SafeguardError, TypeError):
    """The object given to :func:`safeguard.wrap` is not a supported pipeline or model."""


class IncompatibleMethodError(SafeguardError, TypeError):
    """The defense cannot act on this kind of pipeline (e.g. negative prompts on FLUX)."""


class AlreadyWrappedError(SafeguardError, RuntimeError):
    """The pipeline is already guarded with a different configuration."""


class NotWrappedError(SafeguardError, RuntimeError):
    """The pipeline is not guarded (for calls that need a guard, like ``last_report``)."""


class MissingDependencyError(SafeguardError, ImportError):
    """An optional dependency is needed for this feature."""


class MissingWeightsError(SafeguardError, FileNotFoundError):
    """Weights that a feature needs are not on disk."""


class UnsafeCheckpointError(SafeguardError, ValueError):
    """A checkpoint format that could run code when loaded (pickle) was refused."""


def did_you_mean(value: str, choices: list[str]) -> str:
    """A ' Did you mean X?' suffix for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(value, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
