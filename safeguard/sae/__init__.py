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
"""

from .checkpoint import convert_pickled_state_dict, load_sae, save_sae
from .topk import SAEConfig, SAEFormatError, SAEOutput, TopKSAE, fvu

__all__ = [
    "SAEConfig",
    "SAEFormatError",
    "SAEOutput",
    "TopKSAE",
    "convert_pickled_state_dict",
    "fvu",
    "load_sae",
    "save_sae",
]
