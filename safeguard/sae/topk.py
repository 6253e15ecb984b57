"""TopK sparse autoencoder (Gao et al., 2024), laid out like EleutherAI's ``sparsify``.

With ``x`` an activation of width ``d_in``, the SAE computes::

    pre   = relu(encoder(x - b_dec))            # [..., num_latents]; encoder = nn.Linear(d_in, num_latents)
    vals, idx = topk(pre, k)                    # the k largest pre-activations of each row
    x_hat = sum_j vals_j * W_dec[idx_j] + b_dec # W_dec: [num_latents, d_in], unit-norm rows

Every method works on any leading shape ``[..., d_in]`` and keeps the module's dtype and
device; inputs are never cast silently (move them with ``x.to(sae.dtype)`` first).

Example:
    >>> import torch
    >>> from safeguard.sae import SAEConfig, TopKSAE
    >>> sae = TopKSAE(SAEConfig(d_in=16, num_latents=64, k=4), generator=torch.Generator().manual_seed(0))
    >>> out = sae(torch.randn(2, 3, 16))
    >>> out.sae_out.shape, out.latent_indices.shape
    (torch.Size([2, 3, 16]), torch.Size([2, 3, 4]))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InvalidOptionError, SafeguardError


class SAEFormatError(SafeguardError, ValueError):
    """A tensor given to or loaded into an SAE has the wrong shape, or a checkpoint's keys or
    settings do not describe a TopK SAE that :class:`TopKSAE` can run exactly."""


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{owner}.{name}={value!r} must be an integer; pass e.g. {name}=32.")
    if value < 1:
        raise InvalidOptionError(f"{owner}.{name}={value!r} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Shape of a :class:`TopKSAE`.

    Args:
        d_in: width of the activations the SAE reads (e.g. a text encoder's hidden size).
        num_latents: dictionary size (number of latents). See :meth:`from_expansion` to give an
            expansion factor instead.
        k: latents kept per row by the TopK activation, ``1 <= k <= num_latents``.
        normalize_decoder: keep decoder rows at unit norm during training. Loading a checkpoint
            never renormalises its weights.
    """

    d_in: int
    num_latents: int
    k: int
    normalize_decoder: bool = True

    def __post_init__(self) -> None:
        for name in ("d_in", "num_latents", "k"):
            _check_positive_int("SAEConfig", name, getattr(self, name))
        if self.k > self.num_latents:
            raise InvalidOptionError(
                f"SAEConfig.k={self.k!r} is larger than num_latents={self.num_latents!r}; pass k <= num_latents."
            )
        if not isinstance(self.normalize_decoder, bool):
            raise InvalidOptionError(f"SAEConfig.normalize_decoder={self.normalize_decoder!r} must be True or False.")

    @classmethod
    def from_expansion(cls, d_in: int, expansion_factor: float, k: int, normalize_decoder: bool = True) -> SAEConfig:
        """Config with ``num_latents = d_in * expansion_factor`` (which must be a whole number)."""
        _check_positive_int("SAEConfig", "d_in", d_in)
        ok = isinstance(expansion_factor, (int, float)) and not isinstance(expansion_factor, bool)
        if not ok or not math.isfinite(expansion_factor) or expansion_factor <= 0:
            raise InvalidOptionError(f"SAEConfig expansion_factor={expansion_factor!r} must be a positive number.")
        num_latents = d_in * expansion_factor
        if num_latents != int(num_latents):
            raise InvalidOptionError(
                f"SAEConfig: d_in={d_in!r} * expansion_factor={expansion_factor!r} = {num_latents!r} "
                "is not a whole number of latents; pick an expansion factor that gives one."
            )
        return cls(d_in=d_in, num_latents=int(num_latents), k=k, normalize_decoder=normalize_decoder)

    @property
    def expansion_factor(self) -> float:
        """``num_latents / d_in``."""
        return self.num_latents / self.d_in

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SAEOutput(NamedTuple):
    """What :meth:`TopKSAE.forward` returns.

    Attributes:
        sae_out: reconstruction, same shape as the input.
        latent_acts: the k kept activations, ``[..., k]``.
        latent_indices: their latent indices, ``[..., k]`` (int64).
        fvu: fraction of variance unexplained over the whole batch (a 0-d tensor), see :func:`fvu`.
    """

    sae_out: torch.Tensor
    latent_acts: torch.Tensor
    latent_indices: torch.Tensor
    fvu: torch.Tensor


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained of a batch: ``sum((x - x_hat)^2) / sum((x - mean(x))^2)``.

    All leading dimensions are flattened into one batch of rows ``[N, d]``; the mean is the mean
    row. 0 means a perfect reconstruction, 1 means no better than predicting the mean row.
    Computed in at least float32. A batch with zero variance gives ``inf`` (or ``nan`` when the
    error is zero too).
    """
    if x.shape != x_hat.shape:
        raise SAEFormatError(f"fvu: x has shape {list(x.shape)} but x_hat has shape {list(x_hat.shape)}.")
    work = torch.promote_types(x.dtype, torch.float32)
    rows = x.reshape(-1, x.shape[-1]).to(work)
    err = (rows - x_hat.reshape(-1, x.shape[-1]).to(work)).pow(2).sum()
    total = (rows - rows.mean(0)).pow(2).sum()
    return err / total


class TopKSAE(nn.Module):
    """TopK sparse autoencoder with sparsify's parameter names.

    Parameters: ``encoder`` (``nn.Linear(d_in, num_latents)``: ``encoder.weight``
    ``[num_latents, d_in]``, ``encoder.bias`` ``[num_latents]``), ``W_dec`` ``[num_latents, d_in]``
    and ``b_dec`` ``[d_in]``.

    Initialisation: decoder rows are random unit vectors, the encoder weight is a copy of the
    decoder (tied init), both biases are zero.

    Args:
        cfg: the SAE's shape.
        device: where the parameters live (``"meta"`` skips initialisation, for loading).
        dtype: parameter dtype (default: torch's default dtype).
        generator: random source for the init (default: the global RNG). Its device is used to
            draw the numbers, which are then moved to ``device``.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise InvalidOptionError(f"TopKSAE needs an SAEConfig, got {type(cfg).__name__} {cfg!r}.")
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(
            torch.empty(cfg.num_latents, cfg.d_in, device=device, dtype=self.encoder.weight.dtype)
        )
        self.b_dec = nn.Parameter(torch.empty(cfg.d_in, device=device, dtype=self.encoder.weight.dtype))
        if self.W_dec.device.type != "meta":
            self.reset_parameters(generator)

    # -- properties
    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    # -- init / normalisation
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder weight = decoder copy, zero biases."""
        draw_device = generator.device if generator is not None else torch.device("cpu")
        directions = torch.randn(
            self.cfg.num_latents, self.cfg.d_in, generator=generator, device=draw_device, dtype=torch.float32
        )
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self.W_dec.copy_(directions)
        self.encoder.weight.copy_(directions)
        self.encoder.bias.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit L2 norm (in place)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm + eps)

    # -- encoding
    def _check_input(self, x: torch.Tensor, what: str = "x") -> None:
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise SAEFormatError(
                f"TopKSAE: {what} has shape {list(x.shape)}; its last dimension must be d_in={self.cfg.d_in}."
            )

    def _resolve_k(self, k: int | None) -> int:
        if k is None:
            return self.cfg.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.cfg.num_latents:
            raise InvalidOptionError(f"TopKSAE: k={k!r} must be an integer in [1, {self.cfg.num_latents}].")
        return k

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """All latent activations before TopK: ``relu(encoder(x - b_dec))``, ``[..., num_latents]``."""
        self._check_input(x)
        return F.relu(self.encoder(x - self.b_dec))

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` (default ``cfg.k``) largest activations and their indices, each ``[..., k]``."""
        values, indices = self.pre_acts(x).topk(self._resolve_k(k), dim=-1, sorted=False)
        return values, indices

    def encode_dense(self, x: torch.Tensor, topk: bool = True, k: int | None = None) -> torch.Tensor:
        """Dense code ``[..., num_latents]``: TopK activations scattered into zeros, or with
        ``topk=False`` every ReLU pre-activation (how Concept Steerers encodes a concept prompt)."""
        if not topk:
            return self.pre_acts(x)
        values, indices = self.encode(x, k)
        return torch.zeros(*values.shape[:-1], self.cfg.num_latents, dtype=values.dtype, device=values.device).scatter_(
            -1, indices, values
        )

    # -- decoding
    def decode(self, top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` from :meth:`encode`'s values and indices (any leading shape)."""
        if top_vals.shape != top_idx.shape or top_vals.ndim == 0:
            raise SAEFormatError(
                f"TopKSAE.decode: top_vals {list(top_vals.shape)} and top_idx {list(top_idx.shape)} "
                "must have the same shape [..., k]."
            )
        lead, k = top_vals.shape[:-1], top_vals.shape[-1]
        out = F.embedding_bag(
            top_idx.reshape(-1, k),
            self.W_dec,
            per_sample_weights=top_vals.reshape(-1, k).to(self.W_dec.dtype),
            mode="sum",
        )
        return out.reshape(*lead, self.cfg.d_in) + self.b_dec

    def decode_dense(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``codes @ W_dec + b_dec`` from a dense code ``[..., num_latents]``."""
        if codes.ndim == 0 or codes.shape[-1] != self.cfg.num_latents:
            raise SAEFormatError(
                f"TopKSAE.decode_dense: codes have shape {list(codes.shape)}; "
                f"the last dimension must be num_latents={self.cfg.num_latents}."
            )
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, k: int | None = None) -> SAEOutput:
        """Encode with TopK, decode, and measure the batch's FVU."""
        values, indices = self.encode(x, k)
        x_hat = self.decode(values, indices)
        return SAEOutput(sae_out=x_hat, latent_acts=values, latent_indices=indices, fvu=fvu(x, x_hat))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, num_latents={c.num_latents}, k={c.k}, normalize_decoder={c.normalize_decoder}"
