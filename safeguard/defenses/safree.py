"""``method="safree"``: SAFREE (Yoon et al., ICLR 2025) toxic-subspace filtering, as hooks.

Text side, per text encoder (each with its own tokenizer, so each has its own token flags):

1. **Concept subspace.** Each concept phrase is encoded alone and pooled in the space of the states
   the pipeline passes on: the EOS-token state for CLIP encoders (at the layer the pipeline reads,
   e.g. ``hidden_states[-2]`` on SDXL and SD3), the masked mean of token states for BERT and T5
   encoders, or the encoder's pooled output itself for a pooled stream (SDXL's ``text_embeds``,
   FLUX's CLIP ``pooler_output``). The pooled vectors are the columns of ``C``;
   ``P_C = C (C^T C)^+ C^T``, cached per (encoder, stream).
2. **Token detection.** For each real token ``i`` of a prompt, the prompt is re-encoded with that
   token removed (all variants of all prompts of the call in one encoder call per encoder) and
   pooled to ``p_\\i``; ``d_i = ||(I - P_C) p_\\i||``. Removing a concept token moves the prompt away
   from the subspace, so token ``i`` is flagged iff ``d_i >= (1 + alpha) * mean_{j != i} d_j``.
3. **Projection.** Flagged token states ``e`` become ``(I - P_C) P_I e`` where ``P_I`` projects onto
   the span of the masked-prompt embeddings ``{p_\\j}``. The paper composes the two projections
   the other way round (``P_I`` applied last); we apply the concept-orthogonal projection last
   (``projection_order="concept_last"``, the default) because only then is the result exactly free
   of the concept subspace, which is the property the method is after; ``"input_last"`` gives the
   paper's order. A pooled embedding (SDXL, SD3, FLUX) is projected the same way, in its own space,
   when its encoder flagged a token of the prompt. Special tokens, padding, unflagged tokens and
   the negative branch are untouched.
4. **Self-validating filter.** ``beta = 1 - mean cos(filtered, original)`` over the prompt's real
   tokens of every stream (and its projected pooled embeddings), ``t' = round(10 * sigmoid(2k (10
   beta - t0)))`` steps of 50 use the filtered states (scaled to the call's step count), the
   original states after that.

Which slice of ``encoder_hidden_states`` (and of the pooled embedding) came from which encoder is
the adapter's ``text_layout`` / ``pooled_layout``; the rows are matched by content to this call's
encoder outputs (``out[0]`` or any ``hidden_states`` layer), so the encoding order, ``clip_skip`` on
SDXL/SD3, ``num_images_per_prompt``, and ``prompt_embeds`` made by ``pipe.encode_prompt`` all work.
Embeddings that no text encoder of the call produced have no token ids to re-encode: SAFREE cannot
act on them, and warns.

Denoiser side (UNet pipelines): **latent re-attention** rescales, on the rows and steps where
the filtered states are in use, the up-blocks' features in the Fourier domain as FreeU does: the
backbone's first half of channels by ``b1``/``b2`` and the low-frequency square (radius 1) of the
skip features by ``s1``/``s2`` (reference values 1.0, 1.0, 0.9, 0.2). Cost: two FFT pairs per up
block per affected step on the skip features, a few percent of a UNet step. Transformer denoisers
(SD3, FLUX) have no up-blocks; there it is skipped and the report says so.

Example:
    >>> pipe = safeguard.wrap(pipe, concepts=["nudity"], method="safree")  # doctest: +SKIP
    >>> safeguard.last_report(pipe).defenses[0].details["prompts"]  # doctest: +SKIP
    [{'flagged_tokens': ['nude'], 'beta': 0.21, 'filtered_steps_of_50': 0}]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from ..adapters.base import get_path, set_path
from ..adapters.layout import EncoderCall, Key, Slice, match_row, prompt_rows, tensor_of
from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.errors import InvalidOptionError
from ..core.monitor import _timestep_value, bypassing
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
        self._check_bool("re_attention")
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


def project_out(e: torch.Tensor, p_concept: torch.Tensor, p_input: torch.Tensor, order: str) -> torch.Tensor:
    """SAFREE's projection of row vectors ``e``: ``(I - P_C) P_I e`` or, for ``"input_last"``, ``P_I (I - P_C) e``."""
    e = e.double()
    if order == "concept_last":
        x = e @ p_input
        return x - x @ p_concept
    return (e - e @ p_concept) @ p_input


@dataclasses.dataclass
class _Stream(Slice):
    """One encoder's slice of a prompt row and, after detection, its filtered form."""

    flagged: list[int] = dataclasses.field(default_factory=list)
    filtered: torch.Tensor | None = None  # (L, D) or (D,), float64, only when something was flagged


@dataclasses.dataclass
class _Prompt:
    """Everything SAFREE decided for one prompt row of the denoiser batch."""

    streams: list[_Stream]
    ehs: torch.Tensor | None = None  # the filtered encoder_hidden_states row
    pooled: torch.Tensor | None = None  # the filtered pooled row
    steps_of_50: int = 0
    beta: float = 0.0
    flagged: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # encoder -> flagged tokens

    @property
    def flagged_tokens(self) -> list[str]:
        seen: list[str] = []
        for words in self.flagged.values():
            for w in words:
                if w not in seen:
                    seen.append(w)
        return seen


def _word(token: str) -> str:
    return token.replace("</w>", "").replace("\u2581", "").replace("\u0120", "").removeprefix("##") or token


@register_defense
class SAFREEDefense(Defense):
    name = "safree"
    config_class = SAFREEConfig
    order = 10
    families = ("sd", "sdxl", "sd3", "flux")

    # ------------------------------------------------------------------ attach
    def _attach(self, adapter: Any) -> None:
        self.encoders = {n: adapter.encoder_by_name(n) for n in adapter.conditioning_encoders()}
        self.tokenizers = {n: adapter.tokenizer_for(n) for n in self.encoders}
        missing = [n for n, t in self.tokenizers.items() if t is None]
        if missing:
            raise InvalidOptionError(f"safree needs the tokenizer of each text encoder; {missing} have none.")
        self.phrases = [p for c in self.concepts for p in c.phrases]
        self._subspaces: dict[tuple[str, Key], torch.Tensor] = {}
        for n, enc in self.encoders.items():  # records the call; detection waits for the denoiser
            self.hooks.forward_hook(enc, f"{n}_post", self.timed(self._enc_post(n)))
        self.hooks.forward_pre_hook(adapter.denoiser, "denoiser_pre", self.timed(self._denoise_pre))
        ups = getattr(adapter.denoiser, "up_blocks", None)
        self.re_attention = bool(self.config.re_attention and ups is not None and len(ups) >= 2)
        if self.re_attention:
            for i, (b, s) in enumerate(((self.config.b1, self.config.s1), (self.config.b2, self.config.s2))):
                self.hooks.forward_pre_hook(ups[i], f"up_block_{i}_re_attention", self.timed(self._re_attention(b, s)))

    def _detach(self) -> None:
        self._subspaces = {}

    def _reset_state(self) -> None:
        self._calls: list[EncoderCall] = []
        self._masks: dict[int, torch.Tensor] = {}  # id(call) -> mask of its real tokens
        self._rows: list[tuple[int, _Prompt]] | None = None  # (denoiser row, prompt) for rows to filter
        self._prompts: list[_Prompt] = []  # every matched prompt of the call, flagged or not
        self._originals: list[tuple[torch.Tensor, _Prompt]] = []  # first forward's prompt rows to filter
        self._other_rows: dict[int, list[tuple[int, _Prompt]]] = {}  # id(conditioning) -> rows to filter
        self._active_rows: list[int] = []
        self._last_t: float | None = None
        self._step = -1

    # ------------------------------------------------------------------ text encoders
    def _real_mask(self, name: str, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention mask of the tokens up to and including EOS (or the non-pad tokens)."""
        if mask is not None:
            return mask.to(ids.device).long()
        tok = self.tokenizers[name]
        eos = tok.eos_token_id
        if eos is not None and bool((ids == eos).any(-1).all()):
            first = (ids == eos).int().argmax(-1, keepdim=True)
            return (torch.arange(ids.shape[-1], device=ids.device) <= first).long()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return (ids != pad).long()

    def _enc_post(self, name: str):
        def hook(module, args, kwargs, output):
            call = EncoderCall(name, output, args, kwargs)
            if call.input_ids is not None:
                self._masks[id(call)] = self._real_mask(name, call.input_ids, call.kwargs.get("attention_mask"))
                self._calls.append(call)
            return None

        return hook

    def _pool(self, name: str, output: Any, key: Key, mask: torch.Tensor) -> torch.Tensor:
        """Pooled vectors (N, D) of one stream of an encoder output, float64."""
        t = tensor_of(output, key)
        if t.ndim == 2:
            return t.double()
        t = t.double()
        if "clip" in getattr(self.encoders[name].config, "model_type", ""):
            last = mask.to(t.device).sum(-1) - 1  # CLIP: the EOS state, the last real token
            return t[torch.arange(t.shape[0], device=t.device), last]
        m = mask.to(t.device, t.dtype).unsqueeze(-1)
        return (t * m).sum(1) / m.sum(1).clamp(min=1)

    def _encode(self, name: str, ids: torch.Tensor, mask: torch.Tensor, keys: list[Key]) -> dict[Key, torch.Tensor]:
        enc = self.encoders[name]
        want_hs = any(k[0] == "hs" for k in keys)
        with bypassing(self.monitor), torch.no_grad():
            kw = {"output_hidden_states": True} if want_hs else {}
            output = enc(ids.to(enc.device), attention_mask=mask.to(enc.device), **kw)
        return {k: self._pool(name, output, k, mask.to(enc.device)) for k in keys}

    def _subspace(self, name: str, key: Key) -> torch.Tensor:
        """``P_C`` of the concept phrases in one stream of one encoder (cached)."""
        if (name, key) not in self._subspaces:
            tok = self.tokenizers[name]
            t = tok(self.phrases, padding=True, truncation=True, return_tensors="pt")
            pooled = self._encode(name, t.input_ids, t.attention_mask, [key])[key]
            self._subspaces[(name, key)] = projector(pooled.T)
        return self._subspaces[(name, key)]

    # ------------------------------------------------------------------ detection and projection
    def _detect(self, prompts: list[_Prompt]) -> None:
        """Flag and project every matched stream; one encoder call per encoder for all variants."""
        by_encoder: dict[str, list[_Stream]] = {}
        for p in prompts:
            for s in p.streams:
                by_encoder.setdefault(s.name, []).append(s)
        for name, streams in by_encoder.items():
            tok = self.tokenizers[name]
            special = set(tok.all_special_ids)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            # detection space: the token stream if this encoder has one, else its pooled output
            token_keys = sorted({s.key for s in streams if not s.pooled})
            pooled_keys = sorted({s.key for s in streams if s.pooled})
            det_key = token_keys[0] if token_keys else pooled_keys[0]
            keys = sorted(set(token_keys) | set(pooled_keys))
            rows: dict[tuple[int, int], tuple[torch.Tensor, list[int], int]] = {}  # (call, row) -> ids, real, n
            for s in streams:
                rk = (id(s.call), s.row)
                if rk not in rows:
                    ids, n = s.call.input_ids[s.row], int(self._masks[id(s.call)][s.row].sum())
                    real = [i for i in range(n) if int(ids[i]) not in special]
                    rows[rk] = (ids, real if len(real) >= 2 else [], n)
            n_max = max(n for _, _, n in rows.values())
            variants, vmasks, spans, start = [], [], {}, 0
            for rk, (ids, real, n) in rows.items():
                for i in real:  # the prompt with token i removed, right-padded to n_max (trailing padding trimmed)
                    variants.append(torch.cat([ids[:i], ids[i + 1 : n], ids.new_full((n_max - n + 1,), pad)]))
                    vmasks.append((torch.arange(n_max) < n - 1).long())
                spans[rk] = (start, start + len(real))
                start += len(real)
            if not variants:
                continue
            pooled_all = self._encode(name, torch.stack(variants), torch.stack(vmasks), keys)
            flags: dict[tuple[int, int], list[int]] = {}
            for rk, (_ids, real, _n) in rows.items():
                a, b = spans[rk]
                flags[rk] = self._flag(real, pooled_all[det_key][a:b], self._subspace(name, det_key)) if real else []
            for s in streams:
                rk = (id(s.call), s.row)
                s.flagged = flags[rk]
                if not s.flagged:
                    continue
                a, b = spans[rk]
                p_in = projector(pooled_all[s.key][a:b].T)
                p_c = self._subspace(name, s.key)
                state = s.source()
                if s.pooled:
                    s.filtered = project_out(state[None], p_c, p_in, self.config.projection_order)[0]
                else:
                    f = state.double().clone()
                    f[s.flagged] = project_out(state[s.flagged], p_c, p_in, self.config.projection_order)
                    s.filtered = f
        for p in prompts:
            self._finish(p)

    def _flag(self, real: list[int], pooled: torch.Tensor, p_concept: torch.Tensor) -> list[int]:
        d = (pooled - pooled @ p_concept).norm(dim=-1)  # ||(I - P_C) p_\i||, P symmetric
        n = len(real)
        others_mean = (d.sum() - d) / (n - 1)
        return [real[j] for j in range(n) if d[j] >= (1 + self.config.alpha) * others_mean[j]]

    def _finish(self, p: _Prompt) -> None:
        """beta, t' and the filtered denoiser rows of one prompt."""
        cos: list[torch.Tensor] = []
        for s in p.streams:
            if s.flagged and s.name not in p.flagged:
                tokens = self.tokenizers[s.name].convert_ids_to_tokens(
                    [int(s.call.input_ids[s.row][i]) for i in s.flagged]
                )
                p.flagged[s.name] = [_word(t) for t in tokens]
            state = s.source().double()
            if s.pooled:
                if s.filtered is not None:
                    cos.append(torch.nn.functional.cosine_similarity(s.filtered, state, dim=-1).reshape(1))
                continue
            mask = self._masks[id(s.call)][s.row]
            special = set(self.tokenizers[s.name].all_special_ids)
            real = [i for i in range(int(mask.sum())) if int(s.call.input_ids[s.row][i]) not in special]
            if s.filtered is None:
                cos.append(torch.ones(len(real), dtype=torch.float64, device=state.device))
            else:
                cos.append(torch.nn.functional.cosine_similarity(s.filtered[real], state[real], dim=-1))
        if not any(s.filtered is not None for s in p.streams):
            return
        p.beta = float(1 - torch.cat(cos).mean()) if cos else 0.0
        p.steps_of_50 = max(filter_steps(p.beta, self.config.k, self.config.t0), self.config.min_steps)

    # ------------------------------------------------------------------ denoiser
    def _denoise_pre(self, module, args, kwargs):
        adapter = self.adapter
        ehs = kwargs.get("encoder_hidden_states")
        self._active_rows = []
        if not isinstance(ehs, torch.Tensor):
            return None
        pooled_path = adapter.pooled_layout[0] if adapter.pooled_layout is not None else None
        if self._rows is None:  # first denoiser forward of the call: match prompt rows, detect, project
            self._rows = self._match(ehs, get_path(kwargs, pooled_path) if pooled_path else None)
            self._originals = [(ehs[r], p) for r, p in self._rows]  # as the pipeline passed them
            self._calls, self._masks = [], {}
        monitor = self.monitor
        if monitor.cond_is_first and ehs.shape[0] == monitor.first_batch:
            rows = self._rows
        else:  # another forward: FLUX's negative pass (no prompt row), SD3's skip-layer pass (prompts only)
            if id(ehs) not in self._other_rows:
                self._other_rows[id(ehs)] = [
                    (i, p) for i in range(ehs.shape[0]) for orig, p in self._originals if torch.equal(ehs[i], orig)
                ]
            rows = self._other_rows[id(ehs)]
        t = _timestep_value(args, kwargs)
        if self._step < 0 or t != self._last_t:
            self._step += 1
            self._last_t = t
        total = getattr(adapter.pipe, "_num_timesteps", None) or REFERENCE_STEPS
        active = [(r, p) for r, p in rows if self._step < round(p.steps_of_50 * total / REFERENCE_STEPS)]
        if not active:
            return None
        new_ehs = ehs.clone()
        pooled = get_path(kwargs, pooled_path) if pooled_path else None
        new_pooled = pooled.clone() if isinstance(pooled, torch.Tensor) and pooled.shape[0] == ehs.shape[0] else None
        for r, p in active:
            if p.ehs is not None:
                new_ehs[r] = p.ehs.to(ehs.device, ehs.dtype)
            if p.pooled is not None and new_pooled is not None:
                new_pooled[r] = p.pooled.to(new_pooled.device, new_pooled.dtype)
            self._active_rows.append(r)
        self.mark_step()
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = new_ehs
        if new_pooled is not None:
            kwargs = set_path(kwargs, pooled_path, new_pooled)
        return args, kwargs

    def _match(self, ehs: torch.Tensor, pooled: Any) -> list[tuple[int, _Prompt]]:
        b = ehs.shape[0]
        rows = prompt_rows(self.adapter, b)[1]
        pooled = pooled if isinstance(pooled, torch.Tensor) and pooled.shape[0] == b else None
        prompts: dict[tuple, _Prompt] = {}
        first_row: dict[tuple, int] = {}
        out: list[tuple[int, _Prompt]] = []
        unmatched = 0
        for r in rows:
            streams = match_row(self.adapter, self._calls, ehs[r], pooled[r] if pooled is not None else None, _Stream)
            if not streams:
                unmatched += 1
                continue
            sig = tuple((s.name, id(s.call), s.row, s.key, s.pooled) for s in streams)
            if sig not in prompts:  # num_images_per_prompt repeats a row: decide once
                prompts[sig], first_row[sig] = _Prompt(streams), r
            out.append((r, prompts[sig]))
        if prompts:
            self._detect(list(prompts.values()))
            for sig, p in prompts.items():
                r = first_row[sig]
                self._build_rows(p, ehs[r], pooled[r] if pooled is not None else None)
        self._prompts = list(prompts.values())
        self._record(self._prompts, unmatched)
        return [(r, p) for r, p in out if p.steps_of_50 > 0]

    @staticmethod
    def _build_rows(p: _Prompt, ehs_row: torch.Tensor, pooled_row: torch.Tensor | None) -> None:
        """The prompt's filtered denoiser rows: its own rows with the filtered streams written in."""
        if p.steps_of_50 == 0:
            return
        for s in p.streams:
            if s.filtered is None:
                continue
            if not s.pooled:
                p.ehs = ehs_row.clone() if p.ehs is None else p.ehs
                p.ehs[s.seq, s.feat] = s.filtered.to(p.ehs.dtype)
            elif pooled_row is not None:
                p.pooled = pooled_row.clone() if p.pooled is None else p.pooled
                p.pooled[s.feat] = s.filtered.to(p.pooled.dtype)

    def _record(self, prompts: list[_Prompt], unmatched: int) -> None:
        multi = len(self.encoders) > 1
        entries = []
        for p in prompts:
            e: dict[str, Any] = {
                "flagged_tokens": p.flagged_tokens,
                "beta": round(p.beta, 4),
                "filtered_steps_of_50": p.steps_of_50,
            }
            if multi:
                e["flagged_by_encoder"] = dict(p.flagged)
            entries.append(e)
        self.report.details["prompts"] = entries
        if not self.re_attention and self.config.re_attention:
            self.report.details["re_attention"] = "not applicable: the denoiser has no UNet up-blocks"
        if unmatched:
            msg = (
                f"safree could not act on {unmatched} prompt row(s): their embeddings match no output of this "
                "pipeline's text encoders in this call (prompt_embeds made elsewhere; or SD 1.x with clip_skip, "
                "which layer-norms an inner layer), so there are no token ids to re-encode. Pass the prompt text, or build prompt_embeds with pipe.encode_prompt(...) right before "
                "the call, or use method='negative_prompt' / 'sld', which act on embeddings."
            )
            self.report.details["unguarded_rows"] = unmatched
            warnings.warn(msg, stacklevel=2)

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
