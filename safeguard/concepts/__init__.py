"""Concepts: built-in phrase sets and free-text concepts."""

from .builtin import BUILTIN, SHAPESWORLD, UNSAFE
from .concept import Concept, builtin_concept, builtin_concepts, resolve_concepts

__all__ = ["BUILTIN", "SHAPESWORLD", "UNSAFE", "Concept", "builtin_concept", "builtin_concepts", "resolve_concepts"]
