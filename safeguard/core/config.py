"""Defense configs: frozen dataclasses, validated on creation, JSON round-trip with a version.

Example:
    >>> from safeguard import SLDConfig
    >>> cfg = SLDConfig.from_options(preset="strong")
    >>> SLDConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar, TypeVar

from .errors import InvalidOptionError, did_you_mean

C = TypeVar("C", bound="DefenseConfig")


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
    """Base class of every defense's config. Subclasses set ``defense`` and ``version``."""

    defense: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidOptionError` for bad values. Subclasses extend this."""

    # -- helpers for validate()
    def _check_number(
        self, name: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False
    ) -> None:
        value = getattr(self, name)
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
            raise InvalidOptionError(f"{type(self).__name__}.{name}={value!r} must be {kind}; fix the option value.")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise InvalidOptionError(
                f"{type(self).__name__}.{name}={value!r} is out of range {rng}; pass a value in range."
            )

    def _check_choice(self, name: str, choices: list[str]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise InvalidOptionError(
                f"{type(self).__name__}.{name}={value!r} is not one of {choices}.{did_you_mean(str(value), choices)}"
            )

    def _check_bool(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, bool):
            raise InvalidOptionError(f"{type(self).__name__}.{name}={value!r} must be True or False.")

    def _check_optional_text(self, name: str) -> None:
        value = getattr(self, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidOptionError(f"{type(self).__name__}.{name}={value!r} must be non-blank text or None.")

    # -- (de)serialisation
    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls: type[C], **options: Any) -> C:
        """Build from keyword options, with a clear error for unknown ones."""
        names = cls.option_names()
        unknown = [k for k in options if k not in names]
        if unknown:
            hint = did_you_mean(unknown[0], names)
            raise InvalidOptionError(
                f"unknown option(s) {unknown} for method {cls.defense!r}.{hint} Valid options: {names}."
            )
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return {"defense": self.defense, "version": self.version, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefenseConfig:
        """Rebuild a config; called on the base class it dispatches on ``data["defense"]``."""
        from .registry import get_defense_class

        data = dict(data)
        name = data.pop("defense", cls.defense or None)
        if not name:
            raise InvalidOptionError(f"config dict {data!r} has no 'defense' key; add e.g. 'defense': 'sld'.")
        target = get_defense_class(name).config_class
        if cls is not DefenseConfig and target is not cls:
            raise InvalidOptionError(
                f"config for {name!r} given to {cls.__name__}.from_dict; use DefenseConfig.from_dict."
            )
        version = data.pop("version", target.version)
        if version != target.version:
            raise InvalidOptionError(
                f"{name!r} config version {version!r} is not supported (this safeguard writes version {target.version})."
            )
        for f in dataclasses.fields(target):  # JSON turns tuples into lists
            if isinstance(data.get(f.name), list):
                data[f.name] = tuple(data[f.name])
        return target.from_options(**data)

    @classmethod
    def from_json(cls, text: str) -> DefenseConfig:
        return cls.from_dict(json.loads(text))
