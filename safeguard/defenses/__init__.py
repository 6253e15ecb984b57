"""Built-in defenses; importing this package registers them."""

from .negative_prompt import NegativePromptConfig, NegativePromptDefense
from .repe import RepEConfig, RepEDefense
from .sae_text import SAETextConfig, SAETextDefense
from .sae_unet import SAEUNetConfig, SAEUNetDefense
from .safree import SAFREEConfig, SAFREEDefense
from .sld import SLDConfig, SLDDefense

__all__ = [
    "NegativePromptConfig",
    "NegativePromptDefense",
    "RepEConfig",
    "RepEDefense",
    "SAETextConfig",
    "SAETextDefense",
    "SAEUNetConfig",
    "SAEUNetDefense",
    "SAFREEConfig",
    "SAFREEDefense",
    "SLDConfig",
    "SLDDefense",
]
