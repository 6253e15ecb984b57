"""safeguard: training-free, hook-based safety guards for diffusion pipelines and language models.

Example:
    >>> import safeguard
    >>> pipe = safeguard.wrap(pipe, concepts=["nudity"], method="sld")  # doctest: +SKIP
    >>> image = pipe("a photo of a beach").images[0]  # doctest: +SKIP
    >>> safeguard.unwrap(pipe)  # doctest: +SKIP
"""

from .api import disabled, is_wrapped, last_report, unwrap, wrap
from .concepts import Concept, builtin_concepts
from .core.config import DefenseConfig
from .core.errors import (
    AlreadyWrappedError,
    IncompatibleMethodError,
    InvalidConceptError,
    InvalidOptionError,
    MissingDependencyError,
    MissingWeightsError,
    NotWrappedError,
    SafeguardError,
    UnknownConceptError,
    UnknownMethodError,
    UnsafeCheckpointError,
    UnsupportedPipelineError,
)
from .core.registry import available_methods
from .core.report import CallReport, DefenseReport
from .defenses import NegativePromptConfig, SLDConfig

__version__ = "0.1.0"

__all__ = [
    "AlreadyWrappedError",
    "CallReport",
    "Concept",
    "DefenseConfig",
    "DefenseReport",
    "IncompatibleMethodError",
    "InvalidConceptError",
    "InvalidOptionError",
    "MissingDependencyError",
    "MissingWeightsError",
    "NegativePromptConfig",
    "NotWrappedError",
    "SLDConfig",
    "SafeguardError",
    "UnknownConceptError",
    "UnknownMethodError",
    "UnsafeCheckpointError",
    "UnsupportedPipelineError",
    "__version__",
    "available_methods",
    "builtin_concepts",
    "disabled",
    "is_wrapped",
    "last_report",
    "unwrap",
    "wrap",
]
