"""The :class:`Concept` type and resolution of user concept lists.

Example:
    >>> from safeguard.concepts import Concept, resolve_concepts
    >>> [c.name for c in resolve_concepts(["nudity", "a red star", Concept("cats", ("cat", "kitten"))])]
    ['nudity', 'a red star', 'cats']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..core.errors import InvalidConceptError, UnknownConceptError, did_you_mean
from .builtin import ALIASES, BUILTIN


@dataclass(frozen=True)
class Concept:
    """A concept to keep out of outputs: a name and the phrases that describe it.

    Args:
        name: short identifier, shown in reports.
        phrases: one or more non-blank phrases (defaults to ``(name,)``).
    """

    name: str
    phrases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidConceptError(f"Concept name {self.name!r} is blank; give a non-empty name like 'nudity'.")
        phrases = (self.phrases,) if isinstance(self.phrases, str) else tuple(self.phrases)
        if not phrases:
            phrases = (self.name,)
        for p in phrases:
            if not isinstance(p, str) or not p.strip():
                raise InvalidConceptError(
                    f"Concept {self.name!r} has a blank or non-string phrase {p!r}; every phrase must be non-empty text."
                )
        object.__setattr__(self, "phrases", tuple(p.strip() for p in phrases))

    @property
    def text(self) -> str:
        """All phrases joined with ', ' (what prompt-level defenses encode)."""
        return ", ".join(self.phrases)


def builtin_concept(name: str) -> Concept:
    """The built-in concept set ``name`` (case-insensitive, aliases allowed).

    Raises:
        UnknownConceptError: no built-in set has that name.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BUILTIN:
        raise UnknownConceptError(
            f"No built-in concept set {name!r}.{did_you_mean(key, list(BUILTIN))} Built-in sets: {sorted(BUILTIN)}. "
            "Any other text is used verbatim as a free-text concept by safeguard.wrap."
        )
    return Concept(key, BUILTIN[key])


def builtin_concepts() -> list[str]:
    """Names of the built-in concept sets."""
    return sorted(BUILTIN)


def resolve_concepts(concepts: str | Concept | Iterable[str | Concept] | None) -> tuple[Concept, ...]:
    """Turn the ``concepts=`` argument of :func:`safeguard.wrap` into concepts.

    A string naming a built-in set (see :func:`builtin_concepts`) uses that set; any other string
    is a free-text concept used verbatim.

    Raises:
        InvalidConceptError: the list is empty, or holds a blank string or a non-concept.
    """
    if concepts is None:
        raise InvalidConceptError(
            "concepts=None: say what to keep out, e.g. concepts=['nudity'] or concepts=['a red star']. "
            f"Built-in sets: {builtin_concepts()}."
        )
    items: Sequence[str | Concept] = [concepts] if isinstance(concepts, (str, Concept)) else list(concepts)
    if not items:
        raise InvalidConceptError(
            f"concepts={concepts!r} is empty: give at least one, e.g. concepts=['nudity']. Built-in sets: {builtin_concepts()}."
        )
    out: list[Concept] = []
    for item in items:
        if isinstance(item, Concept):
            out.append(item)
        elif isinstance(item, str):
            if not item.strip():
                raise InvalidConceptError(f"concepts contains a blank string {item!r}; remove it or give real text.")
            key = ALIASES.get(item.strip().lower(), item.strip().lower())
            out.append(builtin_concept(key) if key in BUILTIN else Concept(item.strip(), (item.strip(),)))
        else:
            raise InvalidConceptError(
                f"concepts contains {item!r} of type {type(item).__name__}; use strings or safeguard.Concept objects."
            )
    return tuple(out)
