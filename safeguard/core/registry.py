"""Registry of defenses by method name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    from .defense import Defense

_REGISTRY: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make ``cls`` available as ``method=cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"defense name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_builtin_loaded() -> None:
    from .. import defenses  # noqa: F401  (registers the built-in defenses)


def available_methods() -> list[str]:
    """Names accepted by ``safeguard.wrap(method=...)``, in composition order."""
    _ensure_builtin_loaded()
    return [c.name for c in sorted(_REGISTRY.values(), key=lambda c: c.order)]


def get_defense_class(name: str) -> type[Defense]:
    _ensure_builtin_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        choices = available_methods()
        hint = did_you_mean(name, choices) if isinstance(name, str) else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Available methods: {choices}.")
    return _REGISTRY[name]
