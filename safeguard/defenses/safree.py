"""``method="safree"``: SAFREE (Yoon et al., ICLR 2025) toxic-subspace filtering, as hooks.

Text side, on every text-encoder call of a pipeline call (hooks on the encoder):

1. **Concept subspace.** Each concept phrase is encoded alone and pooled (the EOS-token state for
   CLIP encoders, the masked mean of token states for BERT-style encoders such as MiniLM); the
   pooled vectors form the columns of ``C`` and ``P_C = C (C^T C)^+ C^T`` (cached per encoder).
2. **Token detection.** For each real token ``i`` of a prompt, the prompt is re-encoded with that
   token removed (all variants of all prompts in one batched encoder call) and pooled to
   ``p_\\i``; ``d_i = ||(I - P_C) p_\\i||``. Removing a concept token moves the prompt away from the
   subspace, so token ``i`` is flagged iff ``d_i >= (1 + alpha) * mean_{j != i} d_j``.
3. **Projection.** Flagged token states ``e`` become ``(I - P_C) P_I e`` where ``P_I`` projects onto
   the span of the masked-prompt embeddings ``{p_\\j}``. The paper composes the two projections
   the other way round (``P_I`` applied last); we apply the concept-orthogonal projection last
   (``projection_order="concept_last"``, the default) because only then is the result exactly free
   of the concept subspace, which is the property the method is after; ``"input_last"`` gives the
   paper's order. Special tokens, padding, unflagged tokens and the negative branch are untouched.
4. **Self-validating filter.** ``beta = 1 - mean cos(projected, original)`` over the prompt's real
   tokens, ``t' = round(10 * sigmoid(2k (10 beta - t0)))`` steps of 50 use the filtered states
   (scaled to the call's step count), the original states after that.

Denoiser side (UNet pipelines): **latent re-attention** rescales, on the rows and steps where
the filtered states are in use, the up-blocks' features in the Fourier domain as FreeU does: the
backbone's first half of channels by ``b1``/``b2`` and the low-frequency square (radius 1) of the
skip features by ``s1``/``s2`` (reference values 1.0, 1.0, 0.9, 0.2). Cost: two FFT pairs per up
block per affected step on the skip features, a few percent of a UNet step.

The filtered states replace the prompt rows in the denoiser's pre-hook, matched by content to the
encoder outputs of this call, so the order in which the pipeline encodes prompt and negative
prompt does not matter. Calls made with ``prompt_embeds=`` have no token ids to re-encode: SAFREE
cannot act on them and says so in the report.

Example:
    >>> pipe = safeguard.wrap(pipe, concepts=["nudity"], method="safree")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.errors import InvalidOptionError
from ..core.monitor import bypassing
from ..core.registry import register_defense

REFERENCE_STEPS = 50


@dataclasses.dataclass(frozen=True)
class SAFREEConfig(DefenseConfig):
    """Options of ``safree``.

    Args:
        alpha: detection margin: flag token ``i`` iff ``d_i >= (1 + alpha) * mean_{j != i} d_j``.
        k, t0: self-validating filter ``t' = round(10 * sigmoid(2k (10 beta - t0)))`` (of 50 steps).
        min_steps: filter at least this many steps of 50 when any token is flagged (0: pure formula).
        projection_order: ``"concept_last"`` ((I - P_C) P_I e, default) or ``"input_last"`` (P_I (I - P_C) e).
        re_attention: apply latent re-attention (UNet pipelines only).
        b1, b2, s1, s2: latent re-attention scales (backbone half-channels, skip low frequencies).
    """

    defense = "safree"
    version = 1
    alpha: float = 0.01
    k: float = 2.5
    t0: float = 5.333
    min_steps: int = 0
    projection_order: str = "concept_last"
    re_attention: bool = True
    b1: float = 1.0
    b2: float = 1.0
    s1: float = 0.9
    s2: float = 0.2

    def validate(self) -> None:
        self._check_number("alpha", -0.5, 10.0)
        self._check_number("k", 0.0, 100.0)
        self._check_number("t0", -100.0, 100.0)
        self._check_number("min_steps", 0, REFERENCE_STEPS, integer=True)
        self._check_choice("projection_order", ["concept_last", "input_last"])
        if not isinstance(self.re_attention, bool):
            raise InvalidOptionError(f"SAFREEConfig.re_attention={self.re_attention!r} must be True or False.")
        for name in ("b1", "b2", "s1", "s2"):
            self._check_number(name, 0.0, 10.0)


def projector(columns: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the span of ``columns`` (D, K): ``A (A^T A)^+ A^T``, float64."""
    a = columns.double()
    return a @ torch.linalg.pinv(a.T @ a) @ a.T


def filter_steps(beta: float, k: float, t0: float) -> int:
    """SAFREE's self-validating filter: steps (of 50) that use the filtered embedding."""
    z = 2 * k * (10 * beta - t0)
    return round(10 / (1 + math.exp(-z))) if z > -700 else 0


def fourier_lowpass_scale(x: torch.Tensor, scale: float, radius: int = 1) -> torch.Tensor:
    """Scale the centred ``2 radius x 2 radius`` low-frequency square of ``x``'s spatial spectrum."""
    dtype = x.dtype
    f = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = f.shape[-2:]
    ch, cw = h // 2, w // 2
    mask = torch.ones((h, w), device=x.device)
    mask[max(ch - radius, 0) : ch + radius, max(cw - radius, 0) : cw + radius] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(f * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(dtype)


@dataclasses.dataclass
class _Filtered:
    original: torch.Tensor  # (L, D) encoder output row, as the pipeline got it
    filtered: torch.Tensor
    steps_of_50: int
    beta: float
    flagged: list[str]


@register_defense
class SAFREEDefense(Defense):
    name = "safree"
    config_class = SAFREEConfig
    order = 10
    families = ("sd",)

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str:
        return "this release implements SAFREE for single-encoder SD 1.x/2.x pipelines only (SDXL, SD3, FLUX: planned)."

    # ------------------------------------------------------------------ attach
    def _attach(self, adapter: Any) -> None:
        self.encoder = adapter.text_encoders[0]
        self.tokenizer = adapter.tokenizers[0]
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.clip_pool = "clip" in getattr(self.encoder.config, "model_type", "")
        phrases = [p for c in self.concepts for p in c.phrases]
        with bypassing(self.monitor), torch.no_grad():
            t = self.tokenizer(
                phrases,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            pooled = self._pooled(t.input_ids.to(adapter.device), t.attention_mask.to(adapter.device))
        self.p_concept = projector(pooled.T)  # (D, D) float64
        self._in_encoder = False
        self.hooks.forward_pre_hook(self.encoder, "text_encoder_pre", self.timed(self._enc_pre))
        self.hooks.forward_hook(self.encoder, "text_encoder_post", self.timed(self._enc_post))
        self.hooks.forward_pre_hook(adapter.denoiser, "denoiser_pre", self.timed(self._denoise_pre))
        ups = getattr(adapter.denoiser, "up_blocks", None)
        if self.config.re_attention and ups is not None and len(ups) >= 2:
            for i, (b, s) in enumerate(((self.config.b1, self.config.s1), (self.config.b2, self.config.s2))):
                self.hooks.forward_pre_hook(ups[i], f"up_block_{i}_re_attention", self.timed(self._re_attention(b, s)))

    def _reset_state(self) -> None:
        self._ids: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._entries: list[_Filtered] = []
        self._active_rows: list[int] = []
        self._row_entries: list[_Filtered | None] | None = None

    # ------------------------------------------------------------------ text encoder
    def _pooled(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled sentence embedding, in the space of the token states the pipeline uses."""
        am = (
            mask
            if (mask is not None and not self.clip_pool and getattr(self.encoder.config, "use_attention_mask", True))
            else None
        )
        states = self.encoder(ids, attention_mask=am)[0].float()
        if self.clip_pool:
            eos = self.tokenizer.eos_token_id
            pos = (ids == eos).int().argmax(-1)
            return states[torch.arange(len(ids)), pos]
        m = (mask if mask is not None else torch.ones_like(ids)).float().unsqueeze(-1)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)

    def _enc_pre(self, module, args, kwargs):
        if self._in_encoder:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        self._ids = (ids, kwargs.get("attention_mask"))
        return None

    def _enc_post(self, module, args, kwargs, output):
        if self._in_encoder or self._ids is None:
            return None
        ids, mask = self._ids
        self._ids = None
        self._in_encoder = True
        try:
            with torch.no_grad(), bypassing(self.monitor):
                self._entries += [e for e in self._filter_rows(ids, mask, output[0]) if e is not None]
        finally:
            self._in_encoder = False
        return None

    def _filter_rows(
        self, ids: torch.Tensor, mask: torch.Tensor | None, states: torch.Tensor
    ) -> list[_Filtered | None]:
        """Detect and project every prompt of an encoder batch; all masked variants in one encoder call."""
        full_mask = mask if mask is not None else torch.ones_like(ids)
        reals, variants, vmasks = [], [], []
        for row in range(ids.shape[0]):
            r_ids, r_mask = ids[row], full_mask[row]
            real = [i for i in range(len(r_ids)) if int(r_ids[i]) not in self.special_ids and int(r_mask[i]) == 1]
            reals.append(real if len(real) >= 2 else [])
            for i in reals[-1]:  # the prompt with token i removed, padded at the end
                variants.append(torch.cat([r_ids[:i], r_ids[i + 1 :], r_ids.new_full((1,), self.pad_id)]))
                vmasks.append(torch.cat([r_mask[:i], r_mask[i + 1 :], r_mask.new_zeros(1)]))
        if not variants:
            return [None] * ids.shape[0]
        pooled_all = self._pooled(torch.stack(variants), torch.stack(vmasks))  # (sum of n, D)
        out: list[_Filtered | None] = []
        start = 0
        for row, real in enumerate(reals):
            pooled = pooled_all[start : start + len(real)]
            start += len(real)
            out.append(self._project_row(ids[row], real, pooled, states[row]) if real else None)
        return out

    def _project_row(
        self, ids: torch.Tensor, real: list[int], pooled: torch.Tensor, states: torch.Tensor
    ) -> _Filtered | None:
        resid = pooled.double() - pooled.double() @ self.p_concept  # (I - P_C) p, P symmetric
        d = resid.norm(dim=-1)
        n = len(real)
        others_mean = (d.sum() - d) / (n - 1)
        flagged = [real[j] for j in range(n) if d[j] >= (1 + self.config.alpha) * others_mean[j]]
        if not flagged:
            return None
        p_input = projector(pooled.T)
        e = states[flagged].double()
        if self.config.projection_order == "concept_last":
            proj = e @ p_input
            proj = proj - proj @ self.p_concept
        else:
            proj = e - e @ self.p_concept
            proj = proj @ p_input
        filtered = states.clone()
        filtered[flagged] = proj.to(states.dtype)
        cos = torch.nn.functional.cosine_similarity(filtered[real].double(), states[real].double(), dim=-1)
        beta = float(1 - cos.mean())
        steps = max(filter_steps(beta, self.config.k, self.config.t0), self.config.min_steps)
        words = self.tokenizer.convert_ids_to_tokens([int(ids[i]) for i in flagged])
        return _Filtered(states.detach().clone(), filtered, steps, beta, words)

    # ------------------------------------------------------------------ denoiser
    def _denoise_pre(self, module, args, kwargs):
        monitor, adapter = self.monitor, self.adapter
        self._active_rows = []
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            return None
        b2 = monitor.batch
        cfg = adapter.cfg_active() and b2 % 2 == 0
        rows = list(range(b2 // 2, b2)) if cfg else list(range(b2))
        if self._row_entries is None:  # match prompt rows to this call's encoder outputs, once per call
            self._row_entries = []
            for r in rows:
                hit = next(
                    (
                        e
                        for e in self._entries
                        if e.original.shape == ehs[r].shape
                        and torch.equal(e.original.to(ehs.device, ehs.dtype), ehs[r])
                    ),
                    None,
                )
                self._row_entries.append(hit)
            self._record()
            if not self._entries and monitor.step == 0 and not self.report.details.get("prompts"):
                self.report.details["inactive"] = "no token flagged (or prompt_embeds given: no token ids to re-encode)"
        total = getattr(self.adapter.pipe, "_num_timesteps", None) or REFERENCE_STEPS
        step = monitor.step
        new = None
        for r, entry in zip(rows, self._row_entries):
            if entry is None or step >= round(entry.steps_of_50 * total / REFERENCE_STEPS):
                continue
            if new is None:
                new = ehs.clone()
            new[r] = entry.filtered.to(ehs.device, ehs.dtype)
            self._active_rows.append(r)
        if new is None:
            return None
        self.mark_step()
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = new
        return args, kwargs

    def _record(self) -> None:
        seen: list[_Filtered] = []
        for e in self._row_entries or []:
            if e is not None and all(e is not s for s in seen):
                seen.append(e)
        self.report.details["prompts"] = [
            {"flagged_tokens": e.flagged, "beta": round(e.beta, 4), "filtered_steps_of_50": e.steps_of_50} for e in seen
        ]

    def _re_attention(self, b: float, s: float):
        def hook(module, args, kwargs):
            rows = self._active_rows
            if not rows:
                return None
            kwargs = dict(kwargs)
            hs = kwargs.get("hidden_states", args[0] if args else None)
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if hs is None or res is None:
                return None
            idx = torch.as_tensor(rows, device=hs.device)
            if b != 1.0:
                hs = hs.clone()
                half = hs.shape[1] // 2
                hs[idx, :half] = hs[idx, :half] * b
            if s != 1.0:
                new_res = []
                for r in res:
                    r2 = r.clone()
                    r2[idx] = fourier_lowpass_scale(r[idx], s)
                    new_res.append(r2)
                res = tuple(new_res)
            args = list(args)
            for pos, (name, value) in enumerate((("hidden_states", hs), ("res_hidden_states_tuple", res))):
                if name in kwargs or len(args) <= pos:
                    kwargs[name] = value
                else:
                    args[pos] = value
            return tuple(args), kwargs

        return hook
