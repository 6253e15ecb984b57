"""Built-in defenses; importing this package registers them."""

from .negative_prompt import NegativePromptConfig, NegativePromptDefense
from .sld import SLDConfig, SLDDefense

__all__ = ["NegativePromptConfig", "NegativePromptDefense", "SLDConfig", "SLDDefense"]
