"""``method="sae_text"``: Concept Steerers (Kim & Ghadiyaram 2025) as text-encoder hooks.

A TopK sparse autoencoder sits on one text-encoder layer. The concept's activation is the SAE
code of the concept text's tokens at that layer, encoded *without* top-k (all ReLU
pre-activations) and averaged over its real non-special tokens; the steering vector is
``strength * decode(code)`` without the decoder bias. The vector is added at that layer to every
position the pipeline's encoder call attends to (strength < 0 steers away from the concept): the
real tokens where the pipeline passes an attention mask (BERT-style encoders), every position,
padding and EOS copies included, where it passes none (CLIP and T5 in the diffusers pipelines,
whose denoisers then read all those positions); its opposite goes to the negative prompt when
guidance is on.

Which encoding is the prompt and which the negative prompt is decided where it is certain: at
the denoiser, whose guided batch is ``[negative rows; positive rows]`` (FLUX's true CFG: the
forward whose conditioning differs from the first one's). Every encoding gets
``+strength * v``; a second pass of the encoder on the same input, with ``-strength * v``, is kept
beside it, and the slices of the denoiser's negative rows that this encoder produced (its token
states and, on SDXL/SD3/FLUX, its share of the pooled embedding; found with
:mod:`safeguard.adapters.layout`) are swapped for their second-pass version. So the order in
which a pipeline encodes prompt and negative prompt never matters. The second pass runs only
for encodings found in the negative rows, and is cached by input (the empty negative prompt
repeats across calls), so the steady cost is one layer hook per encoding and a row swap per
denoising step.

Any text encoder of any supported family can carry the SAE (SD 1.x CLIP, SDXL's either CLIP,
SD3's CLIPs or T5, FLUX's T5): the defense hooks the encoder that owns the SAE's module. An SAE
over layers of two encoders concatenated per token (``module="text_encoder.encoder.layers.10+
text_encoder_2.encoder.layers.28"``, Concept Steerers' SDXL choice) has its vector split between
the two layers, each getting its own slice.

``prompt_embeds=`` made by the wrapped pipeline's ``encode_prompt`` right before the call were
steered when they were made, and their negative rows are found as above. Embeddings made
anywhere else never passed the SAE's layer: such calls run unguarded, with a warning.

Example:
    >>> pipe = safeguard.wrap(pipe, concepts=["red"], method="sae_text", strength=-1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import get_path, set_path
from ..adapters.layout import EncoderCall, match_row, prompt_rows, tensor_of
from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.errors import InvalidOptionError
from ..core.monitor import bypassing
from ..core.registry import register_defense
from ..steering.ops import hidden_of, replace_hidden
from .guidance import concept_text
from .sae_common import sae_and_module

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "weights" / "sae"


@dataclasses.dataclass(frozen=True)
class SAETextConfig(DefenseConfig):
    """Options of ``sae_text``.

    Args:
        strength: multiple of the decoded concept activation added to the prompt's tokens
            (negative removes; Concept Steerers uses -0.5 for nudity and -0.7 for violence).
        sae: folder of the SAE (sparsify or SAELens layout); default: the SAE shipped for the
            embedded ShapesWorld model.
        module: dotted path of the text-encoder layer the SAE was trained on, from the pipeline
            (e.g. ``"text_encoder.text_model.encoder.layers.9"``); default: recorded with the SAE.
        negative: add the opposite vector to the negative prompt under guidance.
        text: text to encode for the concept instead of its phrases joined with ', '.
        gate: steer only prompts that carry the concept: a prompt (and its negative row) is steered
            when the dense SAE code of one of its real tokens has cosine >= ``gate`` with the concept's
            code. None (default) steers every prompt, as Concept Steerers does. Not a paper option:
            calibrate it on captions of your own domain (``scripts/calibrate_sae_gate.py`` does so
            for ShapesWorld). Single-layer SAEs only.
    """

    defense = "sae_text"
    version = 1
    strength: float = -1.0
    sae: str | None = None
    module: str | None = None
    negative: bool = True
    text: str | None = None
    gate: float | None = None

    def validate(self) -> None:
        self._check_number("strength", -100.0, 100.0)
        if self.gate is not None:
            self._check_number("gate", -1.0, 1.0)
        self._check_optional_text("sae")
        self._check_optional_text("module")
        self._check_optional_text("text")
        self._check_bool("negative")


@register_defense
class SAETextDefense(Defense):
    """Concept Steerers: steer a text-encoder layer along the SAE decoding of the concept."""

    name = "sae_text"
    config_class = SAETextConfig
    order = 30
    families = ("sd", "sdxl", "sd3", "flux")

    def _reset_state(self) -> None:
        self.sign = 1.0
        self.masks: dict[str, torch.Tensor | None] = {}  # encoder -> attention mask of its current call
        self.ids: dict[str, torch.Tensor | None] = {}  # encoder -> input ids of its current call
        self.row_gate: dict[str, torch.Tensor] = {}  # encoder -> rows of its current call that were steered
        self.call_gates: dict[int, torch.Tensor] = {}  # id(EncoderCall) -> its steered rows
        self.encodings: list[EncoderCall] = []  # this call's text-encoder calls (the SAE's encoders: with +v)
        self.swapped: dict[tuple[bool, int], tuple[torch.Tensor, torch.Tensor | None] | None] = {}
        self.warned = False

    def _attach(self, adapter: Any) -> None:
        cfg: SAETextConfig = self.config  # type: ignore[assignment]
        self.sae, module, layers = sae_and_module(adapter, cfg.sae, SHIPPED / "text", cfg.module, "text")
        # one or more (encoder, layer) parts; an SAE over several layers reads them concatenated per token
        self.parts: list[tuple[str, Any, Any, int]] = []  # (encoder name, encoder, layer, width)
        for name, layer in zip(module.split("+"), layers):
            enc_name = name.strip().partition(".")[0]
            encoder, tok = adapter.encoder_by_name(enc_name), adapter.tokenizer_for(enc_name)
            if encoder is None or tok is None:
                raise InvalidOptionError(
                    f"module={name!r} is not inside a text encoder with a tokenizer on {adapter.pipeline_name}."
                )
            width = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "d_model", None)
            self.parts.append((enc_name, encoder, layer, int(width)))
        if len({p[0] for p in self.parts}) != len(self.parts):
            raise InvalidOptionError(f"module={module!r}: each part must sit in a different text encoder.")
        d = self.sae.cfg.d_in
        if sum(p[3] for p in self.parts) != d:
            raise InvalidOptionError(
                f"the SAE expects width {d} but module={module!r} gives {'+'.join(str(p[3]) for p in self.parts)}."
            )
        self.owners = {p[0] for p in self.parts}
        if cfg.gate is not None and len(self.parts) != 1:
            raise InvalidOptionError(f"gate={cfg.gate!r} works with single-layer SAEs; module={module!r} has several.")
        if cfg.gate is not None and not any(self.parts[0][0] in group for group in adapter.text_layout):
            raise InvalidOptionError(
                f"gate={cfg.gate!r} needs the SAE on an encoder whose token states reach the denoiser; "
                f"{self.parts[0][0]} feeds only the pooled embedding on {adapter.pipeline_name}. Drop gate."
            )
        self._opposites: dict[tuple, Any] = {}  # input -> -v encoding (the empty negative prompt repeats)
        self.vector = cfg.strength * self._concept_vector(adapter, cfg.text or concept_text(self.concepts))
        self.report.details = {
            "module": module,
            "strength": cfg.strength,
            "vector_norm": round(float(self.vector.norm()), 4),
        }
        start = 0
        for enc_name, encoder, layer, width in self.parts:
            self.hooks.forward_pre_hook(encoder, f"mask_{enc_name}", self.timed(self._on_encoder_pre(enc_name)))
            # The steering hook also runs (monitor bypassed) in the second pass. It goes first among the
            # layer's hooks: transformers 5 records ``hidden_states`` (which SDXL and SD3 read) with a forward
            # hook of its own, installed at the first call; placed after it, the edit would miss them.
            self.hooks.forward_hook(
                layer, f"steer_{enc_name}", self._on_layer(enc_name, slice(start, start + width)), prepend=True
            )
            start += width
        # every text encoder's calls are recorded: placing this encoder's slice in a row needs the others
        for name in adapter.conditioning_encoders():
            self.hooks.forward_hook(
                adapter.encoder_by_name(name), f"encodings_{name}", self.timed(self._on_encoder(name))
            )
        self.hooks.forward_pre_hook(adapter.denoiser, "swap_negative", self.timed(self._on_denoise))

    def _detach(self) -> None:
        self._opposites = {}

    @torch.no_grad()
    def _layer_states(self, enc_name: str, encoder: Any, layer: Any, texts: list[str]) -> tuple[torch.Tensor, Any]:
        """``(states at the SAE's layer, tokenizer output)`` for ``texts``, encoded as the pipeline would."""
        tok = self.adapter.tokenizer_for(enc_name)
        enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        captured: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda m, a, o: captured.append(hidden_of(o)))
        try:
            with bypassing(self.monitor):
                kwargs = {}
                if getattr(encoder.config, "use_attention_mask", False) or "bert" in type(encoder).__name__.lower():
                    kwargs["attention_mask"] = enc["attention_mask"].to(self.adapter.device)
                encoder(enc["input_ids"].to(self.adapter.device), **kwargs)
        finally:
            handle.remove()
        return captured[0], enc

    @torch.no_grad()
    def _concept_vector(self, adapter: Any, text: str) -> torch.Tensor:
        """``decode(mean dense code)`` of the concept text's real tokens, the parts' states concatenated."""
        states, keeps = [], []
        for enc_name, encoder, layer, _ in self.parts:
            h, enc = self._layer_states(enc_name, encoder, layer, [text])
            tok = adapter.tokenizer_for(enc_name)
            ids = enc["input_ids"][0]
            special = torch.tensor(
                tok.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True), dtype=torch.bool
            )
            keep = enc["attention_mask"][0].bool() & ~special
            states.append(h[0].float()[keep.to(h.device)])
            keeps.append(int(keep.sum()))
        if len(set(keeps)) != 1:
            raise InvalidOptionError(
                f"the concept text {text!r} has {keeps} real tokens under the parts' tokenizers; an SAE over "
                "concatenated layers needs tokenizers that split text alike (as SDXL's two CLIP tokenizers do)."
            )
        codes = self.sae.encode_dense(torch.cat(states, -1), topk=False).mean(0)
        self.concept_code = codes.detach()
        return (codes @ self.sae.W_dec.float()).detach()

    # ------------------------------------------------------------------ hooks
    def _on_encoder_pre(self, enc_name: str):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            self.masks[enc_name] = mask if isinstance(mask, torch.Tensor) else None
            ids = args[0] if args else kwargs.get("input_ids")
            self.ids[enc_name] = ids if isinstance(ids, torch.Tensor) else None

        return hook

    def _on_layer(self, enc_name: str, part: slice):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            m = self.monitor
            if m is None or not m.enabled or (m.bypass and self.sign > 0):
                return None  # concept encoding, or safeguard.disabled()
            h = hidden_of(output)
            vec = (self.sign * self.vector[part]).to(h.device, h.dtype)
            mask = self.masks.get(enc_name)
            gate = mask.to(h.dtype).unsqueeze(-1) if mask is not None and mask.shape == h.shape[:2] else None
            gate = gate if gate is not None else torch.ones((*h.shape[:2], 1), dtype=h.dtype, device=h.device)
            if self.config.gate is not None and self.sign > 0:  # the second pass (-v) serves gated rows only
                on = self._concept_rows(enc_name, h)
                self.row_gate[enc_name] = on
                gate = gate * on.to(h.dtype)[:, None, None]
            return replace_hidden(output, h + gate * vec)

        return hook

    @torch.no_grad()
    def concept_scores(self, texts: list[str]) -> torch.Tensor:
        """The gate's score of each text: the largest cosine between a real token's dense SAE code and
        the concept's code (single-layer SAEs). Texts scoring ``>= gate`` are steered.

        Example:
            >>> defense.concept_scores(["a red star", "a blue circle"])  # doctest: +SKIP
            tensor([0.4400, 0.2000])
        """
        enc_name, encoder, layer, _ = self.parts[0]
        h, enc = self._layer_states(enc_name, encoder, layer, texts)
        saved = self.masks.get(enc_name), self.ids.get(enc_name)
        self.masks[enc_name], self.ids[enc_name] = enc["attention_mask"], enc["input_ids"]
        try:
            return self._scores(enc_name, h).cpu()
        finally:
            self.masks[enc_name], self.ids[enc_name] = saved

    def _concept_rows(self, enc_name: str, h: torch.Tensor) -> torch.Tensor:
        """Rows of a layer output with a real token whose dense SAE code is close to the concept's."""
        return (self._scores(enc_name, h) >= self.config.gate).cpu()

    def _scores(self, enc_name: str, h: torch.Tensor) -> torch.Tensor:
        codes = self.sae.encode_dense(h.float(), topk=False)
        cos = torch.nn.functional.cosine_similarity(codes, self.concept_code.to(codes.device)[None, None], dim=-1)
        real = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        mask, ids = self.masks.get(enc_name), self.ids.get(enc_name)
        if mask is not None and mask.shape == real.shape:
            real &= mask.bool().to(h.device)
        if ids is not None and ids.shape == real.shape:
            special = torch.tensor(self.adapter.tokenizer_for(enc_name).all_special_ids, device=ids.device)
            real &= ~torch.isin(ids, special).to(h.device)
        return cos.masked_fill(~real, -2.0).amax(-1)

    def _on_encoder(self, name: str):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            call = EncoderCall(name, output, args, kwargs)
            self.encodings.append(call)
            if name in self.row_gate:
                self.call_gates[id(call)] = self.row_gate.pop(name)

        return hook

    def _opposite(self, call: EncoderCall, key: Any) -> torch.Tensor:
        """The ``key`` output (see :mod:`safeguard.adapters.layout`) of the encoder for the same input
        with ``-strength * v``; cached by input, so the empty negative prompt is encoded once."""

        def fingerprint(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                t = v.detach().cpu().contiguous()
                return (tuple(t.shape), str(t.dtype), t.view(torch.uint8).numpy().tobytes())
            return repr(v)

        cache_key = (
            call.name,
            key,
            tuple(fingerprint(a) for a in call.args),
            tuple((k, fingerprint(v)) for k, v in sorted(call.kwargs.items())),
        )
        if cache_key not in self._opposites:
            mask, ids = call.kwargs.get("attention_mask"), call.input_ids
            saved = self.masks.get(call.name), self.ids.get(call.name)
            self.masks[call.name] = mask if isinstance(mask, torch.Tensor) else None  # this input's, not the last's
            self.ids[call.name] = ids
            self.sign = -1.0
            try:
                with bypassing(self.monitor), torch.no_grad():
                    again = self.adapter.encoder_by_name(call.name)(*call.args, **call.kwargs)
            finally:
                self.sign = 1.0
                self.masks[call.name], self.ids[call.name] = saved
            if len(self._opposites) >= 64:
                self._opposites.pop(next(iter(self._opposites)))
            self._opposites[cache_key] = tensor_of(again, key)  # only the tensor the row needs
        return self._opposites[cache_key]

    def _negative_rows(self, ehs: torch.Tensor) -> tuple[bool, range]:
        """``(is this FLUX-style separate negative pass, rows to give -v)`` for one denoiser forward.

        Decided on the conditioning as the pipeline passed it (the call monitor's view, before any
        defense edited it): the first forward's batch under batched guidance is ``[negative;
        prompt]``; a forward with other conditioning is FLUX's separate negative pass; a forward
        with the same conditioning but another batch (SD3's skip-layer guidance) has prompts only.
        """
        monitor = self.monitor
        if monitor.cond_is_first:
            if self.adapter.cfg_batched and ehs.shape[0] == monitor.first_batch:
                return False, prompt_rows(self.adapter, ehs.shape[0])[0]
            return False, range(0)
        if self.adapter.cfg_batched:
            return False, range(0)
        return True, range(ehs.shape[0])

    def _prompt_steered(self, ehs: torch.Tensor, r: int, separate: bool) -> bool:
        """Whether the prompt row paired with negative row ``r`` was steered (always, without a gate)."""
        if self.config.gate is None:
            return True
        if separate:
            first = self.monitor.first_cond
            row = first[r] if first is not None and r < first.shape[0] else None
        else:
            row = ehs[r + ehs.shape[0] // 2]
        return row is not None and self._row_gate_of(row)

    def _row_gate_of(self, row: torch.Tensor) -> bool:
        """Whether the encoding behind this denoiser row was steered by the gate."""
        for s in match_row(self.adapter, self.encodings, row):
            if s.name in self.owners and id(s.call) in self.call_gates:
                return bool(self.call_gates[id(s.call)][s.row])
        return False

    def _on_denoise(self, module: Any, args: tuple, kwargs: dict) -> Any:
        ehs = kwargs.get("encoder_hidden_states")
        if not isinstance(ehs, torch.Tensor):
            return None
        if not any(c.name in self.owners for c in self.encodings):
            if not self.warned:
                warnings.warn(
                    "sae_text: this call passed prompt_embeds made outside the pipeline's text encoder; the SAE's "
                    "layer cannot be steered, so the call runs unguarded. Pass prompt= instead, or build the "
                    "embeddings with the wrapped pipeline's encode_prompt(...) right before the call.",
                    stacklevel=2,
                )
                self.warned = True
            return None
        self.mark_step()
        if self.config.gate is not None and "steered_prompts" not in self.report.details:
            prompt = prompt_rows(self.adapter, ehs.shape[0])[1]
            self.report.details["steered_prompts"] = [self._row_gate_of(ehs[r]) for r in prompt]
        if not self.config.negative:
            return None
        separate, rows = self._negative_rows(ehs)
        if not rows:
            return None
        pooled_path = self.adapter.pooled_layout[0] if self.adapter.pooled_layout is not None else None
        pooled = get_path(kwargs, pooled_path) if pooled_path else None
        pooled = pooled if isinstance(pooled, torch.Tensor) and pooled.shape[0] == ehs.shape[0] else None
        new_ehs, new_pooled = ehs.clone(), None if pooled is None else pooled.clone()
        changed = False
        for r in rows:
            if (separate, r) not in self.swapped and not self._prompt_steered(ehs, r, separate):
                self.swapped[(separate, r)] = None  # its prompt was not steered: nor is it
            if self.swapped.get((separate, r), ()) is None:
                continue
            if (separate, r) not in self.swapped:  # once per call: this row's slices from the SAE's encoder, at -v
                e_row, p_row = ehs[r].clone(), None if pooled is None else pooled[r].clone()
                for s in match_row(self.adapter, self.encodings, ehs[r], None if pooled is None else pooled[r]):
                    if s.name not in self.owners:
                        continue
                    value = self._opposite(s.call, s.key)[s.row]
                    if s.pooled and p_row is not None:
                        p_row[s.feat] = value.to(p_row.dtype)
                    elif not s.pooled:
                        e_row[s.seq, s.feat] = value.to(e_row.dtype)
                self.swapped[(separate, r)] = (e_row, p_row)
            e_row, p_row = self.swapped[(separate, r)]
            new_ehs[r] = e_row
            if p_row is not None and new_pooled is not None:
                new_pooled[r] = p_row
            changed = True
        if not changed:
            return None
        kwargs = {**kwargs, "encoder_hidden_states": new_ehs}
        if new_pooled is not None:
            kwargs = set_path(kwargs, pooled_path, new_pooled)
        return args, kwargs
