"""Fused kernels for the defenses' per-step hot paths, each with an eager PyTorch reference.

Every kernel here has the same shape: a public function that takes and returns ordinary tensors,
an eager reference written with plain torch ops (the definition of what the kernel computes), and
a Triton implementation that does the same work in one pass over memory. :func:`use_triton`
decides per call:

- ``SAFEGUARD_DISABLE_KERNELS=1`` in the environment forces the eager reference (read at every
  call, so a benchmark or an A/B comparison can switch it without restarting);
- Triton must be importable (the ``gpu`` extra, or ``pip install triton``);
- CUDA tensors run the compiled kernel, on the tensors' device; CPU tensors run it only under
  Triton's interpreter (``TRITON_INTERPRET=1``, set before anything in the process imports
  triton), which is how the parity tests run without a GPU. Anything else takes the eager path;
- inputs autograd records through take the eager path (the kernels have no backward).

Parity: in float32 the two paths agree to rounding (tested). The kernels compute in float32
whatever the storage dtype, while the eager reference rounds after every op in float16 /
bfloat16, so in half precision the two paths differ by more than rounding: an SLD element near
its threshold can fall on the other side, and greedy tokens after a ``repe`` ablation can diverge.
Compare half-precision runs with and without ``SAFEGUARD_DISABLE_KERNELS=1`` with that in mind.

Kernels:

- :func:`sld_guidance`: Safe Latent Diffusion's per-step guidance and momentum update
  (``method="sld"``), ten element-wise torch ops fused into one read of ``u, c, k, m`` and one
  write of the new prompt prediction and momentum;
- :func:`ablate_rows`: ``h - strength * gate * (h . u) u`` per token (``repe`` ablation at every
  layer), the row dot product and the update in one pass instead of four kernels and a temporary.

Example:
    >>> from safeguard import kernels
    >>> kernels.use_triton(torch.zeros(2))  # doctest: +SKIP
    False
"""

from __future__ import annotations

from .dispatch import kernels_disabled, triton_available, use_triton
from .residual import ablate_rows, ablate_rows_eager
from .sld import sld_guidance, sld_guidance_eager

__all__ = [
    "ablate_rows",
    "ablate_rows_eager",
    "kernels_disabled",
    "sld_guidance",
    "sld_guidance_eager",
    "triton_available",
    "use_triton",
]
