"""Locating data files shipped inside other PyPI packages, without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MissingDependencyError


def package_dir(module: str, needed_for: str, install: str) -> Path:
    """Folder of the installed ``module`` (found with ``find_spec``, so its imports never run).

    Raises:
        MissingDependencyError: naming ``needed_for`` and the ``install`` command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"{needed_for} needs the package {module!r}; install it with: {install}")
    return Path(spec.origin).parent
