"""Reading and calibrating the steering vectors of one concept on one model.

``"harmful"`` (the built-in LLM concept) gets four direction sets: ``concept``, harmful minus
harmless requests read at the last prompt token (their mean difference); ``condition`` and
``condition_prompt``, shrunk Fisher discriminants of the last-token states and of the mean over
each request's own tokens (the two views of the detector that decides whether a request is
harmful, :mod:`safeguard.steering.detector`); and ``behaviour``, refusing minus complying replies
read as the mean over the reply's tokens (what to push toward; its calibration also records ``release_layers`` and
``release_tokens``: where, and for how many reply tokens, the rows the detector passes get it ablated). Any other concept is a *topic*: its ``concept`` direction contrasts
template prompts about the topic with the same templates about neutral topics (the project's
topic phrases for ``violence``, ``weapons``, ``drugs``... or the concept's own phrases).

Results are cached per (model weights, concept, method) in the user cache directory.

Example:
    >>> from safeguard.adapters import CausalLMAdapter
    >>> vecs = read_vectors(CausalLMAdapter(model, tok), builtin_concept("harmful"))  # doctest: +SKIP
    >>> vecs.calibration["condition_layer"], vecs.calibration["threshold"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from ..concepts.concept import Concept
from ..core.errors import InvalidOptionError, MissingWeightsError
from . import data
from .calibrate import (
    best_threshold,
    calibrate_detectors,
    out_of_fold_scores,
    select_ablation_layers,
    select_behaviour,
    select_condition_layer,
)
from .encoder import ENCODER_SET
from .head import head_features, out_of_fold_head_scores, train_mlp_head
from .reading import collect_states, lda_directions, projections, read_directions
from .vectors import SteeringVectors

logger = logging.getLogger(__name__)

READING_VERSION = 20
LDA_SHRINKAGE = 0.3  # chosen with the extra training data (scripts/detector_negatives_experiment.py)
# the detector's training-only data: both extra files and the four read held-out sets, retired into training data less
# their items near a still-held-out prompt (data.RETIRED); the choice of scripts/detector_retired_experiment.py
# (leave-one-set-out over those four sets: mean flagged harmful 0.888 -> 0.912 at pooled harmless 0.046 -> 0.050),
# READING_VERSION 12; fresh5 joined them in 13, after its one read, fresh6 and fresh7 in 14, fresh8 and fresh9 in 15,
# fresh10 in 16, fresh11 and fresh12 in 17, fresh13 and fresh14 in 18, fresh15 and fresh16 in 19, fresh17 and fresh18 in
# 20. Up to version 11 the detector read the first extra file only (the topic-broad extra2 with the request-mean view,
# READING_VERSION 9, did worse: scripts/detector_breadth_experiment.py). The third extra file (extra3, six new writers)
# is not read: leave-one-set-out over fresh ... fresh5 (scripts/detector_extra3_experiment.py) lowered the harmless
# flagged share 0.053 -> 0.037 but also the harmful one 0.930 -> 0.923, short of its rule (+0.01)
EXTRA_DATA = ("extra", "extra2", *data.RETIRED)  # files whose pairs the detector reads
EXTRA_SCARY = ("extra", "extra2", *data.RETIRED)  # files whose scary-word harmless prompts it reads
# training pairs the detector also reads inside task-format wrappers (data.wrapped_pairs); 0 in the shipped recipe,
# an arm of scripts/detector_wrapped_experiment.py
WRAPPED_PAIRS = 0
# input dropout of the detector head's fit (safeguard.steering.head.train_mlp_head); 0.3 since READING_VERSION 14
HEAD_DROPOUT = 0.3
# READING_VERSION 14: the learned head over the three views, the choice of scripts/detector_family_experiment.py
# (leave-one-set-out over fresh ... fresh7 against version 13's shrunk Fisher sum: mean flagged harmful 0.877 -> 0.934,
# pooled harmless flagged 0.061 -> 0.039, AUROC 0.969 -> 0.987)
DETECTOR: str | None = "mlp"
# the sentence-encoder view (all-MiniLM-L6-v2 embeddings of the request) joins the detector's candidates: chosen on
# calibration data by scripts/detector_encoder_experiment.py (leave-one-category-out TPR within FPR 0.05 0.797,
# against 0.759 without it); READING_VERSION 11
ENCODER_VIEW = True
# the learned head over the three views (the "mlp" detector, safeguard.steering.head) is trained with them
HEAD_DETECTOR = True
HEAD_NAME = "detector_mlp"
# rows the detector passes get the refusal direction ablated on these layers for the reply's first RELEASE_TOKENS tokens
# (the prompt and the reply's first three tokens): scripts/release_tokens_experiment.py's choice, READING_VERSION 16
# (312 harmless calibration requests: SmolLM2's own 38 refusals -> 0, against 18 left by version 15's window, layers
# 8-14 on every token, scripts/release_experiment.py; mean distinct-word ratio 0.764 -> 0.735)
RELEASE_LAYERS = list(range(5, 18))
RELEASE_TOKENS = 4


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of the input embedding's first rows: tells apart checkpoints of one architecture."""
    w = model.get_input_embeddings().weight
    head = w[: min(16, w.shape[0])].detach().float().cpu().contiguous()
    return hashlib.sha1(head.numpy().tobytes()).hexdigest()[:16]


def cache_key(adapter: Any, concept: Concept, method: str) -> str:
    spec = json.dumps([READING_VERSION, concept.name, list(concept.phrases), method], sort_keys=True)
    return f"{weights_digest(adapter.model)}/{concept.name.replace('/', '_')[:40]}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


def is_refusal_concept(concept: Concept) -> bool:
    return concept.name.lower() == "harmful"


def read_vectors(
    adapter: Any,
    concept: Concept,
    *,
    method: str = "mean_diff",
    layer_path: str | None = None,
    progress: bool = False,
    seed: int = 0,
    extra_data: tuple[str, ...] = EXTRA_DATA,
    extra_scary: tuple[str, ...] = EXTRA_SCARY,
    lda_shrinkage: float = LDA_SHRINKAGE,
    detector: str | None = DETECTOR,
    encoder: bool = ENCODER_VIEW,
    head: bool = HEAD_DETECTOR,
    reuse_behaviour: SteeringVectors | None = None,
    wrapped: int = WRAPPED_PAIRS,
    head_dropout: float = HEAD_DROPOUT,
) -> SteeringVectors:
    """Read (and for ``harmful``, calibrate) the steering vectors of ``concept`` on ``adapter.model``.

    The last eight concern ``harmful`` only. ``extra_data`` and ``extra_scary`` name the training-only files
    (``"extra"``: 240 pairs and 200 scary-word harmless prompts; ``"extra2"``: 280 topic-broad pairs and 132 scary-word
    prompts; the retired held-out sets :data:`~safeguard.steering.data.RETIRED` less their exclusions; see
    :func:`~safeguard.steering.data.extra_pairs`) whose pairs, and whose scary-word prompts, join the
    detector directions' training data (their out-of-fold threshold scores included); the behaviour and concept
    directions stay on the original training split. ``detector`` fixes the detector view (``None``: the best by
    validation + out-of-fold AUROC). ``encoder`` adds the sentence-encoder view and with it the ``"both+encoder"``
    detector (:mod:`safeguard.steering.encoder`); ``head`` trains the learned head over the three views and with it
    the ``"mlp"`` detector (:mod:`safeguard.steering.head`). The defaults give the shipped vectors (:data:`READING_VERSION`;
    the versions from 14 on had the same recipe with fewer retired sets, 14 and 15 release on layers 8-14 for every
    token); ``detector="both+encoder", head=False`` with the retired sets fresh ... fresh5 gives those of 13 (without
    fresh5, 12);
    ``extra_data=extra_scary=("extra",)`` gives those of version 11, adding ``encoder=False`` the detectors of
    READING_VERSION 10; ``extra_data=("extra",), extra_scary=("extra",), encoder=False, detector=None``
    gives the detector of READING_VERSION 8 and ``extra_data=(), extra_scary=(), lda_shrinkage=0.7, detector=None``
    the one before it. ``reuse_behaviour``: earlier ``harmful`` vectors whose behaviour search (the slow part, about
    25 minutes on 2 cores) is taken over when its inputs are provably the same (:func:`_reusable_behaviour`).
    ``wrapped``: that many training pairs also join the detector's training data inside task-format wrappers
    (:func:`~safeguard.steering.data.wrapped_pairs`, seeded by ``seed``). ``head_dropout``: the input dropout of
    the head's fit.
    """
    adapter.require_tokenizer("reading steering vectors")
    model = adapter.model
    _, layers = adapter.decoder_layers(layer_path)
    meta: dict[str, Any] = {"concept": concept.name, "phrases": list(concept.phrases), "method": method}
    meta["model"] = adapter.fingerprint() | {"weights_digest": weights_digest(model)}
    was_training = model.training
    model.eval()
    try:
        if is_refusal_concept(concept):
            options = dict(extra_data=extra_data, extra_scary=extra_scary, shrinkage=lda_shrinkage, detector=detector,
                           encoder=encoder, head=head, wrapped=wrapped, head_dropout=head_dropout)  # fmt: skip
            vecs = _read_refusal(adapter, concept, layers, method, meta, progress, seed, reuse_behaviour, **options)
        else:
            vecs = _read_topic(adapter, concept, layers, method, meta, progress, seed)
    finally:
        model.train(was_training)
    return vecs


def _read_refusal(
    adapter,
    concept,
    layers,
    method,
    meta,
    progress,
    seed,
    reuse_behaviour,
    *,
    extra_data,
    extra_scary,
    shrinkage,
    detector,
    encoder,
    head,
    wrapped,
    head_dropout,
) -> SteeringVectors:
    if detector == "mlp" and not (encoder and head):
        raise InvalidOptionError(
            "detector='mlp' reads the learned head over the encoder view; keep encoder=True and head=True, or "
            "choose another detector."
        )
    model, tok, chat = adapter.model, adapter.tokenizer, adapter.chat_text
    train, val = data.harmful_pairs("train"), data.harmful_pairs("val")
    extra_data, extra_scary = tuple(extra_data), tuple(extra_scary)
    scary = [p["prompt"] for p in data.scary_harmless("train")]
    scary += [p["prompt"] for which in extra_scary for p in data.extra_scary_harmless(which)]
    harmful = [chat(p["harmful"]) for p in train]
    harmless = [chat(p["harmless"]) for p in train]
    pos, norms = collect_states(model, tok, harmful, layers, progress=progress)
    neg, _ = collect_states(model, tok, harmless, layers, progress=progress)
    scary_states, _ = collect_states(model, tok, [chat(p) for p in scary], layers, progress=progress)
    c_dirs, c_scales = read_directions(pos, neg, method)
    # the condition (detector) direction: with the extra training pairs (read as their own sets) and scary words
    extra = [p for which in extra_data for p in data.extra_pairs(which)]
    extra += data.wrapped_pairs(wrapped, seed)
    d_pos, d_neg = pos, neg
    if extra:
        x_pos, _ = collect_states(model, tok, [chat(p["harmful"]) for p in extra], layers, progress=progress)
        x_neg, _ = collect_states(model, tok, [chat(p["harmless"]) for p in extra], layers, progress=progress)
        d_pos, d_neg = torch.cat([pos, x_pos], dim=1), torch.cat([neg, x_neg], dim=1)
    all_neg = torch.cat([d_neg, scary_states], dim=1)
    d_dirs = lda_directions(d_pos, all_neg, shrinkage)
    # the detector's second view: the mean over each request's own tokens, the same prompts and rules
    prefix = adapter.chat_prefix_ids()

    def prompt_states(texts: list[str]) -> torch.Tensor:
        return collect_states(model, tok, texts, layers, position="prompt", prefix_ids=prefix, progress=progress)[0]

    pp_pos = prompt_states(harmful + [chat(p["harmful"]) for p in extra])
    pp_neg = torch.cat(
        [prompt_states(harmless + [chat(p["harmless"]) for p in extra]), prompt_states([chat(p) for p in scary])],
        dim=1,
    )
    p_dirs = lda_directions(pp_pos, pp_neg, shrinkage)
    # the third candidate view: the requests' sentence embeddings (decoded as the guard decodes them), same rules
    encoded = None
    if encoder:
        from .encoder import SentenceEncoder, chat_request_texts

        sentence = SentenceEncoder()

        def encoded(requests: list[str]) -> torch.Tensor:  # [1, N, 384]
            return sentence.embed(chat_request_texts(adapter, requests))[None]

        e_pos = encoded([p["harmful"] for p in train + extra])
        e_neg = torch.cat([encoded([p["harmless"] for p in train + extra]), encoded(scary)], dim=1)
        e_dirs = lda_directions(e_pos, e_neg, shrinkage)

    # behaviour: the same training prompts answered with a refusal versus with compliance
    refusals, compliances = data.refusal_exemplars()
    rng = random.Random(seed)
    prompts = harmful + harmless
    r_texts = [p + rng.choice(refusals) for p in prompts]
    c_texts = [p + rng.choice(compliances) for p in prompts]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    r_states, _ = collect_states(model, tok, r_texts, layers, position="mean", starts=starts, progress=progress)
    c_states, _ = collect_states(model, tok, c_texts, layers, position="mean", starts=starts, progress=progress)
    b_dirs, b_scales = read_directions(r_states, c_states, method)

    vecs = SteeringVectors(
        directions={"concept": c_dirs, "condition": d_dirs, "condition_prompt": p_dirs, "behaviour": b_dirs},
        scales={
            "concept": c_scales,
            "condition": (d_pos.mean(1) - all_neg.mean(1)).mul(d_dirs).sum(-1),
            "condition_prompt": (pp_pos.mean(1) - pp_neg.mean(1)).mul(p_dirs).sum(-1),
            "behaviour": b_scales,
        },
        norms=norms,
        meta=meta
        | {
            "reading": {
                "concept": "harmful minus harmless requests, last prompt token (chat template)",
                "condition": f"shrunk Fisher discriminant ({shrinkage}) of the same states, scary-word harmless prompts included"
                + (f", plus {len(extra)} extra training pairs" if extra else ""),
                "extra_data": list(extra_data),
                "extra_scary": list(extra_scary),
                **({"wrapped_pairs": wrapped} if wrapped else {}),
                "condition_prompt": f"shrunk Fisher discriminant ({shrinkage}) of the mean over each request's own "
                "tokens (after the chat template's fixed prefix), the same prompts",
                "chat_prefix_tokens": len(prefix) if prefix else 0,
                "behaviour": "refusal minus compliance replies, mean over reply tokens",
                "train_pairs": len(train),
                "val_pairs": len(val),
                "scary_train": len(scary),
            }
            | ({"condition_extra_pairs": len(extra)} if extra else {})
        },
    )
    if encoder:
        vecs.directions[ENCODER_SET] = e_dirs
        vecs.scales[ENCODER_SET] = (e_pos.mean(1) - e_neg.mean(1)).mul(e_dirs).sum(-1)
        vecs.meta["reading"]["condition_encoder"] = (
            f"shrunk Fisher discriminant ({shrinkage}) of the requests' all-MiniLM-L6-v2 sentence embeddings "
            "(the request text decoded from its chat-template tokens), the same prompts"
        )
    # calibration on the validation split (never on the held-out test split)
    v_pos, _ = collect_states(model, tok, [chat(p["harmful"]) for p in val], layers)
    v_neg, _ = collect_states(model, tok, [chat(p["harmless"]) for p in val], layers)
    oof_pos, oof_neg = out_of_fold_scores(d_pos, all_neg, lambda p, n: lda_directions(p, n, shrinkage))
    sv_pos, sv_neg = projections(v_pos, d_dirs), projections(v_neg, d_dirs)
    layer, table = select_condition_layer(sv_pos, sv_neg, oof_pos, oof_neg)
    threshold, tpr, fpr = best_threshold(
        torch.cat([oof_pos[layer], sv_pos[layer]]), torch.cat([oof_neg[layer], sv_neg[layer]]), fp_weight=1.5
    )
    pvs_pos = prompt_states([chat(p["harmful"]) for p in val])
    pvs_neg = prompt_states([chat(p["harmless"]) for p in val])
    pv_pos, pv_neg = projections(pvs_pos, p_dirs), projections(pvs_neg, p_dirs)
    poof_pos, poof_neg = out_of_fold_scores(pp_pos, pp_neg, lambda p, n: lda_directions(p, n, shrinkage))
    p_layer, p_table = select_condition_layer(pv_pos, pv_neg, poof_pos, poof_neg)
    views = {
        "last": dict(set="condition", pool="last", layer=layer, oof=(oof_pos[layer], oof_neg[layer]),
                     val=(sv_pos[layer], sv_neg[layer])),
        "prompt": dict(set="condition_prompt", pool="prompt", layer=p_layer,
                       oof=(poof_pos[p_layer], poof_neg[p_layer]), val=(pv_pos[p_layer], pv_neg[p_layer])),
    }  # fmt: skip
    if encoded is not None:
        eoof_pos, eoof_neg = out_of_fold_scores(e_pos, e_neg, lambda p, n: lda_directions(p, n, shrinkage))
        evs_pos, evs_neg = encoded([p["harmful"] for p in val]), encoded([p["harmless"] for p in val])
        ev_pos, ev_neg = projections(evs_pos, e_dirs), projections(evs_neg, e_dirs)
        views["encoder"] = dict(set=ENCODER_SET, pool="encoder", layer=0, oof=(eoof_pos[0], eoof_neg[0]),
                                val=(ev_pos[0], ev_neg[0]))  # fmt: skip
    head_scores = None
    if encoded is not None and head:
        # the learned head over the same three views (their states side by side, not their cosines)
        h_pos = head_features([d_pos[layer], pp_pos[p_layer], e_pos[0]])
        h_neg = head_features([all_neg[layer], pp_neg[p_layer], e_neg[0]])
        hv_pos = head_features([v_pos[layer], pvs_pos[p_layer], evs_pos[0]])
        hv_neg = head_features([v_neg[layer], pvs_neg[p_layer], evs_neg[0]])
        logger.info("training the detector head on %d + %d rows (5 folds + the final fit)", len(h_pos), len(h_neg))
        hoof_pos, hoof_neg = out_of_fold_head_scores(h_pos, h_neg, dropout=head_dropout)
        mlp = train_mlp_head(h_pos, h_neg, dropout=head_dropout)
        vecs.heads[HEAD_NAME] = mlp.tensors()
        head_scores = {"name": HEAD_NAME, "oof": (hoof_pos, hoof_neg), "val": (mlp(hv_pos), mlp(hv_neg))}
        vecs.meta["reading"][HEAD_NAME] = (
            "three one-hidden-layer networks (256 units, seeds 0-2; safeguard.steering.head) on the unit-normalised "
            "last-token, request-mean and MiniLM states of the condition views' layers, the same prompts"
            + f", input dropout {head_dropout}"
        )
    detector, detectors = calibrate_detectors(views, choose=detector, head=head_scores)
    # stage 1 on the training and validation harmful requests (24 validation prompts alone tie strengths), stage 2
    # on the extra training-only requests, judged by both of the evaluation's judges (the first stage saturates)
    from ..eval.llm import MiniLMRefusalJudge

    refine = [p["harmful"] for p in data.extra_pairs()]
    search_prompts = [chat(p["harmful"]) for p in train + val]
    search_inputs = hashlib.sha1(json.dumps([search_prompts, refine]).encode()).hexdigest()
    reused = _reusable_behaviour(reuse_behaviour, b_dirs, b_scales, search_inputs)
    if reused is not None:
        b_layers, strength, b_table, match = reused
        if not match["identical"]:  # ship the directions the search was run with
            assert reuse_behaviour is not None
            vecs.directions["behaviour"] = reuse_behaviour.directions["behaviour"].clone()
            vecs.scales["behaviour"] = reuse_behaviour.scales["behaviour"].clone()
        logger.info("behaviour search reused: search prompts identical, directions %s", match)
    else:
        b_layers, strength, b_table = select_behaviour(
            adapter,
            vecs,
            concept,
            search_prompts,
            refine_prompts=[chat(p) for p in refine],
            refine_requests=refine,
            judge=MiniLMRefusalJudge(),
            progress=progress,
        )
    vecs.meta["calibration"] = {
        "mode": "conditional",
        "condition_layer": layer,
        "threshold": threshold,
        "threshold_calibration_tpr": tpr,
        "threshold_calibration_fpr": fpr,
        "detector": detector,
        "detectors": detectors,
        "layers": b_layers,
        "strength": strength,
        "condition_table": table,
        "condition_prompt_table": p_table,
        "behaviour_table": b_table,
        "behaviour_search_inputs": search_inputs,
        "behaviour_search_reused": reused is not None,
        **({"behaviour_search_match": reused[3]} if reused is not None else {}),
        "release_layers": RELEASE_LAYERS,
        "release_tokens": RELEASE_TOKENS,
    }
    logger.info(
        "repe calibration: detector %r (val AUROC %.3f, out-of-fold %.3f, threshold %.3f; last-token layer %d, "
        "prompt-mean layer %d); behaviour layers %s strength %.2f",
        detector,
        detectors[detector]["val_auroc"],
        detectors[detector]["oof_auroc"],
        detectors[detector]["threshold"],
        layer,
        p_layer,
        b_layers,
        strength,
    )
    return vecs


def _reusable_behaviour(
    old: SteeringVectors | None, b_dirs: torch.Tensor, b_scales: torch.Tensor, search_inputs: str
) -> tuple[list[int], float, Any, dict[str, Any]] | None:
    """``(layers, strength, table, match)`` of an earlier calibration whose behaviour search had these inputs.

    The search (greedy replies with the behaviour vector added, no detector involved) is a deterministic function
    of the model, the behaviour directions and scales and the prompts, so it is reused only if the prompts hash the
    same (vectors calibrated before the hash was recorded: the prompts are taken to be the current ones when the
    directions match) and the directions and scales match: bit-identical, or within float noise of another
    torch / transformers build (every layer's cosine above 1 - 1e-6 and every scale within 1e-5 relative), in which
    case the caller ships the old directions and scales so that the search result describes exactly what ships.
    ``match`` records which and the largest differences. Anything else runs the search.
    """
    if old is None or "behaviour" not in old.directions:
        return None
    cal = old.calibration
    o_dirs, o_scales = old.directions["behaviour"], old.scales["behaviour"]
    identical = torch.equal(o_dirs, b_dirs) and torch.equal(o_scales, b_scales)
    cos_gap = (
        float((1 - (o_dirs.double() * b_dirs.double()).sum(-1)).abs().max()) if o_dirs.shape == b_dirs.shape else 1.0
    )
    rel = (
        float(((o_scales - b_scales).abs() / o_scales.abs().clamp_min(1e-12)).max())
        if o_scales.shape == b_scales.shape
        else 1.0
    )
    close = cos_gap < 1e-6 and rel < 1e-5
    same_inputs = cal.get("behaviour_search_inputs", search_inputs) == search_inputs
    if not ((identical or close) and same_inputs and "behaviour_table" in cal):
        logger.warning(
            "behaviour search not reused: %s (largest 1 - cosine %.2e, scale difference %.2e relative)",
            "the search prompts differ" if not same_inputs else "the directions differ",
            cos_gap,
            rel,
        )
        return None
    match = {"identical": identical, "max_one_minus_cosine": cos_gap, "max_scale_rel_diff": rel}
    return list(cal["layers"]), float(cal["strength"]), cal["behaviour_table"], match


def _read_topic(adapter, concept, layers, method, meta, progress, seed) -> SteeringVectors:
    model, tok, chat = adapter.model, adapter.tokenizer, adapter.chat_text
    topics = data.topic_phrases(concept.name) or list(concept.phrases)
    pos_texts, neg_texts = data.topic_pairs(topics, "train", seed=seed)
    keep = max(1, len(pos_texts) // 300)  # about 300 pairs are plenty for a mean difference
    pos_texts, neg_texts = pos_texts[::keep], neg_texts[::keep]
    pos, norms = collect_states(model, tok, [chat(t) for t in pos_texts], layers, position="mean", progress=progress)
    neg, _ = collect_states(model, tok, [chat(t) for t in neg_texts], layers, position="mean", progress=progress)
    dirs, scales = read_directions(pos, neg, method)
    vecs = SteeringVectors(
        directions={"concept": dirs},
        scales={"concept": scales},
        norms=norms,
        meta=meta
        | {
            "reading": {
                "concept": "topic minus neutral-topic template prompts, mean over prompt tokens",
                "pairs": len(pos_texts),
                "topics": len(topics),
            },
        },
    )
    neutral_prompts = list(neg_texts[:: max(1, len(neg_texts) // 24)])[:24]
    ab_layers, table = select_ablation_layers(adapter, vecs, concept, neutral_prompts, progress=progress)
    vecs.meta["calibration"] = {"mode": "ablate", "layers": ab_layers, "strength": 1.0, "ablation_table": table}
    return vecs


def cached_vectors(
    adapter: Any,
    concept: Concept,
    *,
    method: str = "mean_diff",
    layer_path: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> SteeringVectors:
    """Shipped vectors if they match the model, else the user cache, else read (and cache) them."""
    from ..models.smollm import cache_dir

    shipped = shipped_vectors(adapter, concept, method)
    if shipped is not None:
        return shipped
    folder = cache_dir() / "repe" / cache_key(adapter, concept, method)
    if use_cache:
        try:
            return SteeringVectors.load(folder)
        except MissingWeightsError:
            pass
    logger.info("reading %s vectors for %r (first use on this model; cached in %s)", method, concept.name, folder)
    vecs = read_vectors(adapter, concept, method=method, layer_path=layer_path, progress=progress)
    if use_cache:
        vecs.save(folder)
    return vecs


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "weights" / "repe"


def shipped_vectors(adapter: Any, concept: Concept, method: str) -> SteeringVectors | None:
    """Vectors shipped in the package for this exact model (by weights digest), concept and method."""
    digest = weights_digest(adapter.model)
    folder = SHIPPED_DIR / f"{concept.name}-{method}"
    try:
        vecs = SteeringVectors.load(folder)
    except MissingWeightsError:
        return None
    same = vecs.meta.get("model", {}).get("weights_digest") == digest and list(vecs.meta.get("phrases", [])) == list(
        concept.phrases
    )
    return vecs if same else None
