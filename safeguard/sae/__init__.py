"""TopK sparse autoencoders (SAEs) for concept steering, with safetensors checkpoints.

:class:`TopKSAE` uses EleutherAI sparsify's parameter layout (``encoder.weight``,
``encoder.bias``, ``W_dec``, ``b_dec``). :func:`load_sae` reads sparsify and SAELens folders;
:func:`save_sae` writes sparsify folders; :func:`convert_pickled_state_dict` turns a pickled
``.pt``/``.pth`` state dict (e.g. Concept Steerers' ``state_dict.pth``) into one, refusing pickles
that hold anything but tensors.

Example:
    >>> import torch
    >>> from safeguard.sae import SAEConfig, TopKSAE, load_sae, save_sae
    >>> sae = TopKSAE(SAEConfig(d_in=16, num_latents=64, k=4), generator=torch.Generator().manual_seed(0))
    >>> x = torch.randn(2, 5, 16)
    >>> values, indices = sae.encode(x)           # [2, 5, 4] each
    >>> x_hat = sae.decode(values, indices)       # [2, 5, 16]
    >>> concept = sae.encode_dense(x, topk=False)  # [2, 5, 64], every ReLU pre-activation
    >>> save_sae(sae, "my_sae")  # doctest: +SKIP
    >>> sae = load_sae("my_sae", device="cuda", dtype=torch.float16)  # doctest: +SKIP

Training (:mod:`safeguard.sae.activations`, :mod:`safeguard.sae.trainer`, ``python -m safeguard sae``):
    >>> from safeguard.sae import ActivationDataset, TrainConfig, collect_activations, train_sae
    >>> collect_activations(pipe, "unet.up_blocks.1.attentions.0", prompts, "acts")  # doctest: +SKIP
    >>> result = train_sae(ActivationDataset("acts"), TrainConfig(k=32, max_steps=2000), "acts/sae")  # doctest: +SKIP
    >>> result.metrics["fvu"], result.metrics["dead_share"], result.metrics["l0"]  # doctest: +SKIP
"""

from .activations import ActivationDataset, collect_activations, list_modules, write_activations
from .checkpoint import convert_pickled_state_dict, load_sae, save_sae
from .topk import SAEConfig, SAEFormatError, SAEOutput, TopKSAE, fvu
from .trainer import TrainConfig, TrainResult, evaluate_sae, train_sae

__all__ = [
    "ActivationDataset",
    "SAEConfig",
    "SAEFormatError",
    "SAEOutput",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "collect_activations",
    "convert_pickled_state_dict",
    "evaluate_sae",
    "fvu",
    "list_modules",
    "load_sae",
    "save_sae",
    "train_sae",
    "write_activations",
]
