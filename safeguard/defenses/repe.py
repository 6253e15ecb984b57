"""``method="repe"``: representation-engineering steering of a causal LM's residual stream.

Reading vectors come from contrast pairs (see :mod:`safeguard.steering`); the defense edits
the output of decoder layers with forward hooks, for the prompt and every generated token,
through ``model.generate`` with or without KV cache, greedy or sampled, in batches:

- ``add``: ``h + strength * scale_l * d_l`` on the behaviour layers (e.g. toward refusal);
- ``ablate``: ``h - strength * (h . u_l) u_l`` on every layer (or ``layers``): with strength 1 no
  component along the concept direction is left;
- ``conditional`` (default for ``harmful``): at the prefill, a detector
  (:mod:`safeguard.steering.detector`) scores each prompt from its states: the last prompt token's
  state at the condition layer, the mean over the request's own tokens at another layer, or both
  (the calibrated choice); rows above the calibrated threshold get ``add``, the others run
  untouched. Each row decides for itself, once per call. When the detector's deepest layer lies
  deeper than the first behaviour layer, the decision is made by a look-ahead pass over the prompt
  that stops at that layer (its cost is reported; decode steps never pay it), so the prompt and the
  first generated token are steered too. With ``release`` (calibrated), the rows the detector passes get
  the behaviour (refusal) direction ablated on the calibrated ``release_layers`` for the reply's first calibrated
  ``release_tokens`` tokens instead of running untouched, which removes most of the model's own false refusals of
  harmless requests (the false-refusal ablation of Wang et al. 2024; the refusal-direction ablation of Arditi et al.
  2024 applied to passed rows only, and only while the reply opens, where refusal is decided).

Each row's first real token (position 0, whose residual norm is orders of magnitude larger
than the rest) is never edited; left and right padding are both handled from the attention mask.

Example:
    >>> model, tok = safeguard.models.smollm2()  # doctest: +SKIP
    >>> model = safeguard.wrap(model, tokenizer=tok, concepts=["harmful"])  # doctest: +SKIP
    >>> out = model.generate(**tok(["..."], return_tensors="pt"), max_new_tokens=40)  # doctest: +SKIP
    >>> safeguard.last_report(model).defenses[0].details["fired"]  # doctest: +SKIP
    [True]
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch

from ..concepts.concept import Concept
from ..core.config import DefenseConfig
from ..core.defense import Defense
from ..core.errors import InvalidOptionError
from ..core.registry import register_defense
from ..steering.build import cached_vectors, is_refusal_concept
from ..steering.detector import DETECTORS, pool_states, resolve_detector, view_scores
from ..steering.encoder import SentenceEncoder, chat_suffix, request_texts
from ..steering.ops import ablate_direction, add_vector, hidden_of, replace_hidden
from ..steering.reading import METHODS, prefix_matches, prompt_weights
from ..steering.vectors import SteeringVectors

logger = logging.getLogger(__name__)

MODES = ("conditional", "add", "ablate")


class _StopLookAhead(Exception):
    """Ends the look-ahead pass once the detector's deepest layer has run."""


@dataclasses.dataclass(frozen=True)
class RepEConfig(DefenseConfig):
    """Options of ``repe``. ``None`` takes the calibrated value stored with the vectors.

    Args:
        mode: ``"conditional"``, ``"add"`` or ``"ablate"``; default ``conditional`` for the
            ``harmful`` concept and ``ablate`` for topics.
        strength: ``add``: multiple of the mean-difference vector per layer; ``ablate``: 1 removes
            the component along the direction, more pushes past zero.
        layers: decoder-layer indices to edit (behaviour layers, or ablation layers).
        condition_layer: the layer whose last-prompt-token state is scored (``conditional``); given
            without ``detector`` it selects the ``"last"`` detector.
        threshold: score above which a row is steered (``conditional``): a cosine for the one-view
            detectors, a sum of standardised cosines for ``"both"`` and ``"both+encoder"``, the learned head's
            logit for ``"mlp"``.
        detector: ``"last"``, ``"prompt"``, ``"both"``, ``"both+encoder"`` (the two views plus the request's
            MiniLM sentence embedding) or ``"mlp"`` (a small learned head over the same three views' states, the
            shipped SmolLM2 choice since READING_VERSION 14); see :mod:`safeguard.steering.detector`;
            default: the calibrated choice.
        release: ``conditional`` only: ablate the behaviour (refusal) direction in the rows the detector passes,
            so that the model does not refuse them by itself; default: on if the vectors carry a calibrated
            ``release_layers`` window (the shipped SmolLM2 vectors: layers 5-17 for 4 tokens, see
            ``scripts/release_tokens_experiment.py``).
        release_layers: the layers of that ablation (default: the calibrated window, else every layer).
        release_tokens: end that ablation after the first ``release_tokens`` reply tokens: the prompt and the
            reply's first ``release_tokens - 1`` tokens are ablated (so the first ``release_tokens`` tokens are
            chosen with it in place) and the reply then runs on untouched (default: the calibrated value, else
            every token). The same with or without KV cache.
        direction_method: ``"mean_diff"`` or ``"pca"``.
        vectors: folder of saved :class:`~safeguard.steering.SteeringVectors` (else read from the
            project's contrast data on first use and cached).
        layer_path: dotted path of the decoder-layer ``ModuleList`` (default: discovered).
        skip_first: leave each row's first real token alone (recommended).
    """

    defense = "repe"
    version = 1
    mode: str | None = None
    strength: float | None = None
    layers: tuple[int, ...] | None = None
    condition_layer: int | None = None
    threshold: float | None = None
    detector: str | None = None
    release: bool | None = None
    release_layers: tuple[int, ...] | None = None
    release_tokens: int | None = None
    direction_method: str = "mean_diff"
    vectors: str | None = None
    layer_path: str | None = None
    skip_first: bool = True

    def validate(self) -> None:
        if self.mode is not None:
            self._check_choice("mode", list(MODES))
        if self.strength is not None:
            self._check_number("strength", -100.0, 100.0)
        for name in ("layers", "release_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise InvalidOptionError(
                    f"RepEConfig.{name}={layers!r} must be a list of layer indices, e.g. [10, 11]."
                )
            object.__setattr__(self, name, tuple(layers))
            if not layers:
                raise InvalidOptionError(f"RepEConfig.{name}=() is empty; give layer indices or None.")
        if self.condition_layer is not None:
            self._check_number("condition_layer", 0, None, integer=True)
        if self.threshold is not None:
            self._check_number("threshold", -100.0, 100.0)
        if self.detector is not None:
            self._check_choice("detector", list(DETECTORS))
        if self.release is not None:
            self._check_bool("release")
            if self.release and self.mode not in (None, "conditional"):
                raise InvalidOptionError(
                    f"RepEConfig.release=True needs mode='conditional' (got mode={self.mode!r}): it ablates refusal "
                    "in the rows the detector passes. Drop release or use the conditional mode."
                )
        if self.release_tokens is not None:
            self._check_number("release_tokens", 1, None, integer=True)
        self._check_choice("direction_method", list(METHODS))
        self._check_optional_text("vectors")
        self._check_optional_text("layer_path")
        self._check_bool("skip_first")


class _ConceptSteering:
    """The hooks' view of one concept: resolved plan plus per-device vector caches."""

    def __init__(self, concept: Concept, vecs: SteeringVectors, cfg: RepEConfig, num_layers: int):
        cal = vecs.calibration
        self.concept = concept
        self.vecs = vecs
        self.mode = cfg.mode or ("conditional" if is_refusal_concept(concept) else "ablate")
        if self.mode == "conditional" and "behaviour" not in vecs.directions:
            raise InvalidOptionError(
                f"mode='conditional' needs a behaviour direction, which concept {concept.name!r} has not "
                "(only 'harmful' has one); use mode='ablate' or mode='add' for topics."
            )
        self.behaviour = "behaviour" if "behaviour" in vecs.directions else "concept"
        default_layers = cal.get("layers") if self.mode != "ablate" or cal.get("mode") == "ablate" else None
        layers = cfg.layers if cfg.layers is not None else default_layers
        if layers is None:
            layers = list(range(num_layers)) if self.mode == "ablate" else [num_layers // 2]
        self.layers = sorted(set(int(i) for i in layers))
        default_strength = cal.get("strength", 1.0) if self.mode != "ablate" or cal.get("mode") == "ablate" else 1.0
        self.strength = float(cfg.strength if cfg.strength is not None else default_strength)
        self.detector = (
            resolve_detector(vecs, cfg.detector, cfg.condition_layer, cfg.threshold)
            if self.mode == "conditional"
            else None
        )
        calibrated = cal.get("release_layers")
        release = cfg.release if cfg.release is not None else calibrated is not None
        self.release = bool(release) and self.detector is not None
        # the passed rows' ablation: the behaviour set's unit directions, on the given / calibrated / every layer
        window = cfg.release_layers or calibrated or range(num_layers)
        self.release_layers = sorted(set(int(i) for i in window)) if self.release else []
        tokens = cfg.release_tokens if cfg.release_tokens is not None else cal.get("release_tokens")
        self.release_tokens = int(tokens) if tokens is not None else None  # None: every token
        detector_layers = self.detector.layers if self.detector else []
        bad = [i for i in [*self.layers, *self.release_layers, *detector_layers] if not 0 <= i < num_layers]
        if bad:
            raise InvalidOptionError(
                f"layer indices {bad} are out of range: the model has {num_layers} decoder layers (0..{num_layers - 1})."
            )
        self._cache: dict[tuple, dict[int, torch.Tensor]] = {}
        self.units = self.detector.units(vecs) if self.detector else []
        # decide before the prompt reaches the first edited layer
        self.lookahead = self.detector is not None and self.detector.deepest > min(self.layers + self.release_layers)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            if self.mode == "ablate":
                src = {i: self.vecs.directions["concept"][i] for i in self.layers}
            else:
                src = {i: self.vecs.vector(self.behaviour, i, self.strength) for i in self.layers}
            self._cache[key] = {i: t.to(device=device, dtype=dtype) for i, t in src.items()}
        return self._cache[key]

    def release_units(self, device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        key = ("release", device, dtype)
        if key not in self._cache:
            units = self.vecs.directions[self.behaviour]
            self._cache[key] = {i: units[i].to(device=device, dtype=dtype) for i in self.release_layers}
        return self._cache[key]


@register_defense
class RepEDefense(Defense):
    """Reading-vector steering of a causal LM (RepE / refusal direction / conditional steering)."""

    name = "repe"
    config_class = RepEConfig
    order = 20
    families = ("causal_lm",)

    def __init__(self, config: RepEConfig, concepts: tuple[Concept, ...], vectors: list[SteeringVectors] | None = None):
        self._given_vectors = vectors
        self.plans: list[_ConceptSteering] = []
        super().__init__(config, concepts)

    @classmethod
    def unsupported_reason(cls, adapter: Any) -> str:
        return "it steers a language model's residual stream; wrap a transformers causal LM."

    def _reset_state(self) -> None:
        self.fired: list[torch.Tensor | None] = [None] * len(self.plans)
        self.fired_any: list[bool] = [False] * len(self.plans)  # host copy: edit hooks never sync the device
        self.fired_all: list[bool] = [False] * len(self.plans)
        self.scores: list[list[float]] = [[] for _ in self.plans]
        self.tok_gate: torch.Tensor | None = None  # [B, q, 1] bool: tokens other than each row's first
        self.pooled: list[dict[int, torch.Tensor]] = [{} for _ in self.plans]  # per plan: view index -> [B, d]
        self.prompt_w: torch.Tensor | None = None  # [B, T] request-token weights of this call's prefill
        self.prefix_matched: list[bool] = []  # per row: began with the chat template's prefix
        self.lookahead_s = 0.0
        self.row_gates: dict[tuple, torch.Tensor] = {}  # fired (or, for release, passed) rows as [B, 1, 1] in a dtype

    def _attach(self, adapter: Any) -> None:
        cfg: RepEConfig = self.config  # type: ignore[assignment]
        _, layers = adapter.decoder_layers(cfg.layer_path)
        if self._given_vectors is not None:
            all_vecs = list(self._given_vectors)
        elif cfg.vectors is not None:
            all_vecs = [SteeringVectors.load(cfg.vectors)]
        else:
            from ..core.monitor import bypassing

            with bypassing(self.monitor):
                all_vecs = [
                    cached_vectors(adapter, c, method=cfg.direction_method, layer_path=cfg.layer_path)
                    for c in self.concepts
                ]
        if len(all_vecs) != len(self.concepts):
            raise InvalidOptionError(
                f"{len(all_vecs)} vector sets for {len(self.concepts)} concepts; give one set per concept."
            )
        for vecs in all_vecs:
            if vecs.num_layers != len(layers) or vecs.hidden_size != adapter.hidden_size:
                raise InvalidOptionError(
                    f"steering vectors for {vecs.num_layers} layers x {vecs.hidden_size} do not fit "
                    f"{adapter.pipeline_name} ({len(layers)} layers x {adapter.hidden_size}); read them on this model."
                )
            read_on = vecs.meta.get("model", {}).get("model_type")
            here = adapter.fingerprint()["model_type"]
            if read_on and read_on != here:
                warnings.warn(
                    f"these steering vectors were read on a {read_on!r} model and are applied to a {here!r} one of the "
                    "same shape: residual-stream directions do not carry over between models; leave out vectors= to "
                    "read them on this model (cached after the first use) unless that is what you intend.",
                    stacklevel=5,  # the caller of safeguard.wrap
                )
        self.plans = [_ConceptSteering(c, v, cfg, len(layers)) for c, v in zip(self.concepts, all_vecs)]
        needs_prefix = [p for p in self.plans if p.detector is not None and p.detector.needs_prompt_weights]
        self._prefix = adapter.chat_prefix_ids() if needs_prefix else None
        self._warned_prefix = False
        encoded = [p for p in self.plans if p.detector is not None and p.detector.needs_encoder]
        if encoded:
            adapter.require_tokenizer(f"the {encoded[0].detector.name!r} detector (it embeds the request text)")
        self._encoder = SentenceEncoder(adapter.device) if encoded else None
        self._tokenizer = adapter.tokenizer
        self._suffix = chat_suffix(adapter) if encoded else ""
        calibrated_with = max(
            (p.vecs.meta.get("reading", {}).get("chat_prefix_tokens", 0) for p in needs_prefix), default=0
        )
        if needs_prefix and self._prefix is None and calibrated_with:
            warnings.warn(
                f"the {needs_prefix[0].detector.name!r} detector averages each request's tokens after the chat "
                f"template's prefix ({calibrated_with} tokens when calibrated), but no prefix could be found "
                f"(tokenizer: {type(adapter.tokenizer).__name__ if adapter.tokenizer is not None else None}); "
                "requests will be averaged from their second token. Pass the tokenizer the vectors were read "
                "with, or detector='last'.",
                stacklevel=4,
            )
        self._reset_state()
        owner = adapter.layer_owner(cfg.layer_path)
        self._owner, self._layers = owner, layers
        self.hooks.forward_pre_hook(owner, "gates", self.timed(self._on_forward))
        for p_idx, plan in enumerate(self.plans):
            if plan.detector is not None and not plan.lookahead:
                for layer in plan.detector.layers:
                    self.hooks.forward_hook(
                        layers[layer],
                        f"{plan.concept.name}.condition.{layer}",
                        self.timed(self._make_condition(p_idx, layer)),
                    )
            for i in plan.layers:
                self.hooks.forward_hook(
                    layers[i], f"{plan.concept.name}.{plan.mode}.{i}", self.timed(self._make_edit(p_idx, i))
                )
            for i in plan.release_layers:
                self.hooks.forward_hook(
                    layers[i], f"{plan.concept.name}.release.{i}", self.timed(self._make_release(p_idx, i))
                )

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        m = self.monitor
        after_first = m.first_real_bound is not None and m.past > m.first_real_bound  # known on the host
        if not self.config.skip_first or (m.step > 0 and after_first):
            self.tok_gate = None
        else:
            self.tok_gate = (m.positions[None, :] != m.first_real[:, None]).unsqueeze(-1)
        undecided = [i for i, p in enumerate(self.plans) if p.detector is not None and self.fired[i] is None]
        if any(self.plans[i].detector.needs_prompt_weights for i in undecided):
            ids = kwargs.get("input_ids", args[0] if args else None)
            ids = ids if isinstance(ids, torch.Tensor) else None
            mask = kwargs.get("attention_mask")
            mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            embeds = kwargs.get("inputs_embeds")
            shape = tuple(embeds.shape[:2]) if isinstance(embeds, torch.Tensor) else None
            self.prompt_w = prompt_weights(ids, mask, self._prefix, shape)
            self._note_prefix(ids, mask)
            for p_idx in undecided:
                if self.plans[p_idx].detector.needs_encoder:
                    self._encode(p_idx, ids)
        for p_idx in undecided:
            if self.plans[p_idx].lookahead:
                self._look_ahead(p_idx, args, kwargs)
        return None

    def _encode(self, p_idx: int, ids: torch.Tensor | None) -> None:
        """Keep the encoder view's input: each row's decoded request text, embedded by the sentence encoder."""
        det = self.plans[p_idx].detector
        if ids is None:
            raise InvalidOptionError(
                f"the {det.name!r} detector reads each request's text from input_ids, but this call passed "
                "inputs_embeds; pass input_ids, or wrap with detector='both'."
            )
        assert self._encoder is not None and self.prompt_w is not None
        emb = self._encoder.embed(request_texts(self._tokenizer, ids, self.prompt_w, self._suffix)).to(ids.device)
        for v_idx, view in enumerate(det.views):
            if view.pool == "encoder":
                self.pooled[p_idx][v_idx] = emb

    def _note_prefix(self, ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """Record which rows began with the chat template's prefix; warn once when some did not."""
        if ids is None or not self._prefix:
            self.prefix_matched = []
            return
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        self.prefix_matched = prefix_matches(ids, real, self._prefix).tolist()
        if not all(self.prefix_matched) and not self._warned_prefix:
            self._warned_prefix = True
            rows = [i for i, ok in enumerate(self.prefix_matched) if not ok]
            warnings.warn(
                f"rows {rows} do not begin with the chat template's prefix: the harmful-request detector was "
                "calibrated on chat-formatted requests (tokenizer.apply_chat_template(..., add_generation_prompt=True), "
                "tokenised with add_special_tokens=False); raw or differently formatted prompts are scored off "
                "calibration.",
                stacklevel=2,
            )

    def _pool(self, p_idx: int, layer: int, h: torch.Tensor) -> None:
        """Keep the pooled states of the detector views read at ``layer``; decide once the deepest has run."""
        plan = self.plans[p_idx]
        det = plan.detector
        for v_idx, view in enumerate(det.views):
            if view.layer == layer:
                self.pooled[p_idx][v_idx] = pool_states(h, view.pool, self.monitor.last_real, self.prompt_w)
        if layer == det.deepest:
            pooled = [self.pooled[p_idx][i] for i in range(len(det.views))]
            score = view_scores(pooled, plan.units, det)
            self.fired[p_idx] = score > det.threshold
            self.scores[p_idx] = [round(x, 4) for x in score.tolist()]  # one transfer, once per call
            rows = self.fired[p_idx].tolist()
            self.fired_any[p_idx], self.fired_all[p_idx] = any(rows), all(rows)
            self.pooled[p_idx] = {}

    def _make_condition(self, p_idx: int, layer: int):
        def hook(module, args, kwargs, output):
            if self.fired[p_idx] is None:
                self._pool(p_idx, layer, hidden_of(output))
            return None

        return hook

    def _look_ahead(self, p_idx: int, args: tuple, kwargs: dict) -> None:
        """Run the prompt through the layers up to the detector's deepest layer (no cache, hooks bypassed)."""
        import time

        from ..core.monitor import bypassing

        det = self.plans[p_idx].detector
        t0 = time.perf_counter()

        def reader(layer: int):
            def hook(module, a, k, output):
                self._pool(p_idx, layer, hidden_of(output))
                if layer == det.deepest:
                    raise _StopLookAhead

            return hook

        handles = [self._layers[i].register_forward_hook(reader(i), with_kwargs=True) for i in det.layers]
        kw = {k: v for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")}
        try:
            with bypassing(self.monitor), torch.no_grad():
                self._owner(*args, **kw, use_cache=False)
        except _StopLookAhead:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.lookahead_s += time.perf_counter() - t0

    def _make_edit(self, p_idx: int, layer: int):
        plan = self.plans[p_idx]

        def hook(module, args, kwargs, output):
            h = hidden_of(output)
            gate = self.tok_gate
            if plan.mode == "conditional":
                fired = self.fired[p_idx]
                if fired is None:  # the prompt has not reached the detector's deepest layer yet
                    return None
                if not self.fired_any[p_idx]:
                    return None
                if gate is None and self.fired_all[p_idx]:  # decode steps, every row steered: no gate
                    g = None
                elif gate is None:  # decode steps: the rows' gate alone, converted once per call and dtype
                    key = (p_idx, h.dtype)
                    if key not in self.row_gates:
                        self.row_gates[key] = fired.view(-1, 1, 1).to(h.dtype)
                    g = self.row_gates[key]
                else:
                    g = (gate & fired.view(-1, 1, 1)).to(h.dtype)
            else:
                g = None if gate is None else gate.to(h.dtype)
            vec = plan.tensors(h.device, h.dtype)[layer]
            if plan.mode == "ablate":
                new = ablate_direction(h, vec, plan.strength, g)
            else:
                new = add_vector(h, vec, g)
            self.mark_step()
            return replace_hidden(output, new)

        return hook

    def _make_release(self, p_idx: int, layer: int):
        """Ablate the behaviour direction in the rows the detector passed (``release``)."""
        plan = self.plans[p_idx]

        def hook(module, args, kwargs, output):
            fired = self.fired[p_idx]
            if fired is None or self.fired_all[p_idx]:  # undecided, or no passed row
                return None
            m = self.monitor
            end = None if plan.release_tokens is None else m.prompt_len + plan.release_tokens - 1
            if end is not None and m.past >= end:  # every token of this forward lies after the window (host check)
                return None
            h = hidden_of(output)
            key = ("release", p_idx, h.dtype)  # passed rows as [B, 1, 1], once per call and dtype
            if key not in self.row_gates:
                self.row_gates[key] = (~fired).view(-1, 1, 1).to(h.dtype)
            rows = self.row_gates[key]
            gate = self.tok_gate
            if end is not None and m.past + m.q > end:  # tokens past the window in this forward (no-cache calls)
                inside = (m.positions < end)[None, :, None]
                gate = inside if gate is None else gate & inside
            g = rows if gate is None else gate.to(h.dtype) * rows
            if gate is None and not self.fired_any[p_idx]:  # decode steps, every row passed: no gate
                g = None
            new = ablate_direction(h, plan.release_units(h.device, h.dtype)[layer], 1.0, g)
            self.mark_step()
            return replace_hidden(output, new)

        return hook

    # ------------------------------------------------------------------ report
    def _details(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p_idx, plan in enumerate(self.plans):
            d: dict[str, Any] = {"mode": plan.mode, "layers": plan.layers, "strength": round(plan.strength, 4)}
            if plan.mode == "conditional":
                fired = self.fired[p_idx]
                d |= {
                    "detector": plan.detector.name,
                    "detector_layers": plan.detector.layers,
                    "threshold": round(plan.detector.threshold, 4),
                    "release": plan.release,
                    **({"release_tokens": plan.release_tokens} if plan.release else {}),
                    "scores": self.scores[p_idx],
                    "fired": [bool(x) for x in fired] if fired is not None else [],
                    **({"prefix_matched": self.prefix_matched} if plan.detector.needs_prompt_weights else {}),
                    "lookahead_ms": round(self.lookahead_s * 1e3, 2),
                }
            out[plan.concept.name] = d
        return out[self.plans[0].concept.name] if len(self.plans) == 1 else out

    def _fill_report(self, report) -> None:  # details are built on read, from this call's state
        if self.plans:
            report.details = self._details()
