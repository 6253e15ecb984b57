"""The project's LLM contrast data (``safeguard/data/llm``) and its fixed splits.

Splits are made by code, deterministically, within each category (items sorted by id):

- harmful/harmless pairs, index ``i`` in its category: ``i % 8`` in 0-3 -> ``"train"`` (reading
  vectors and calibrating the threshold), 4 -> ``"val"`` (choosing layers and strength),
  5-7 -> ``"test"`` (held out: only the evaluation reads it). 25 pairs a category give
  13 / 3 / 9, so 104 / 24 / 72 in all.
- ``"fresh"``: a second held-out set written after the detector experiments had read ``"test"`` for
  information (``harmful_harmless_pairs_fresh.json``, 80 pairs, and ``harmless_scary_words_fresh.json``,
  40 prompts); only the evaluation reads it (``python -m safeguard eval ... --split fresh``).
- ``"fresh2"``: a third held-out set, written after the READING_VERSION 8 detector by a writer who saw no other
  project file (``harmful_harmless_pairs_fresh2.json``, 80 pairs, and ``harmless_scary_words_fresh2.json``, 40 prompts;
  items within MiniLM cosine 0.75 of a training or validation prompt rewritten); only the evaluation reads it.
- ``"fresh3"``: a fourth held-out set, written after READING_VERSION 10 by a writer who saw no project file
  (``harmful_harmless_pairs_fresh3.json``, 80 pairs, ids ``-h01``..., and ``harmless_scary_words_fresh3.json``,
  40 prompts); only the evaluation reads it.
- ``"fresh4"``: a fifth, written the same way after fresh3 had measured READING_VERSION 10 and before version 11 was
  calibrated (ids ``-i01``...); only the evaluation reads it.
- ``"fresh5"``: a sixth, written the same way after fresh4 had measured READING_VERSION 11, its leakage check against
  every existing project prompt (ids ``-j01``...); only the evaluation reads it.
- ``"fresh6"``: a seventh, written the same way after fresh5 had measured READING_VERSION 12, for the next version
  (ids ``-k01``...); read by READING_VERSION 13's one untouched measurement (then v12's, as information).
- ``"fresh7"``: an eighth, written while READING_VERSION 13 was calibrated, for the version after it (ids ``-l01``...,
  selected without reading: the first items per category far from every existing prompt); read by READING_VERSION
  13 (a second untouched measurement of it, since no later version was built). fresh6 and fresh7 are detector
  training data since READING_VERSION 14.
- ``"fresh8"``: a ninth, written after that read for a later version (ids ``-m01``..., selected without reading by
  ``scripts/select_heldout.py``); read by READING_VERSION 14's one untouched measurement.
- ``"fresh9"``: a tenth, written after that read by three more blind writers for READING_VERSION 14's second untouched
  measurement (ids ``-n01``..., selected the same way); read by it. fresh8 and fresh9 are detector training data
  since READING_VERSION 15.
- ``"fresh10"``: an eleventh, written after fresh9's read for READING_VERSION 15's one untouched measurement (ids
  ``-o01``..., selected the same way before version 15 was calibrated); read by that measurement; detector training
  data since READING_VERSION 16.
- ``"fresh11"``: a twelfth, written after that read by three more blind writers (task formats, people in specific
  roles, euphemistic wording) for the next version's one untouched measurement (ids ``-p01``..., selected the same
  way); read by READING_VERSION 16's untouched measurement; detector training data since READING_VERSION 17.
- ``"fresh12"``: a thirteenth, written by three more blind writers (real-user style, near misses and less common
  harms, context-first messages) before READING_VERSION 16 was calibrated (ids ``-q01``..., selected the same way);
  declared after v16's fresh11 read, before any reading of it, as v16's second untouched measurement; read by it;
  detector training data since READING_VERSION 17.
- ``"fresh13"``: a fourteenth, written after v16's fresh11 read by three more blind writers (task formats and roles,
  euphemistic wording, real-user chat) for the next version's one untouched measurement (ids ``-r01``..., selected
  the same way); read by READING_VERSION 17's first untouched measurement; detector training data since
  READING_VERSION 18.
- ``"fresh14"``: a fifteenth, written before READING_VERSION 17 was calibrated by three more blind writers (task
  formats and roles, near misses with look-alike harmless sides, real-user chat with the intent in a backstory) for
  READING_VERSION 17's second untouched measurement, declared before fresh13 or fresh14 was read (ids ``-s01``...,
  selected the same way); read by it; detector training data since READING_VERSION 18.
- ``"fresh15"``: a sixteenth, written after v17's fresh13 and fresh14 reads by three more blind writers (requests
  wrapped in deliverables and roles, euphemistic wording, context-first messages) for the next version's one
  untouched measurement (ids ``-t01``..., selected the same way); read by READING_VERSION 18's first untouched
  measurement; detector training data since READING_VERSION 19.
- ``"fresh16"``: a seventeenth, written after the same reads by three more blind writers (plain real-user messages,
  requests inside deliverables and roles, requests with a stated reason or setting) and a fourth for more weapons
  pairs (ids ``-u01``..., selected the same way); declared with fresh15, before either was read, as READING_VERSION
  18's two untouched measurements; read by them; detector training data since READING_VERSION 19.
- ``"fresh17"``: an eighteenth, written after v18's fresh15 and fresh16 reads by three more blind writers (the same
  three styles as fresh16) and a fourth for more weapons pairs (ids ``-v01``..., selected the same way).
- ``"fresh18"``: a nineteenth, written at the same time by three more blind writers (terse search-box messages,
  requests inside less common deliverables and roles, two-part messages) and a fourth for more weapons pairs (ids
  ``-w01``..., selected the same way); declared with fresh17, before either was read, as READING_VERSION 19's two
  untouched measurements; both read by them; detector training data since READING_VERSION 20.
- ``"fresh19"``: a twentieth, written after v19's fresh17 and fresh18 reads by three more blind writers in fresh18's
  styles and a fourth for more weapons pairs (ids ``-x01``..., selected the same way).
- ``"fresh20"``: a twenty-first, written at the same time by three more blind writers in fresh17's styles, a fourth
  for more weapons pairs and a fifth for fraud, drugs and history (ids ``-y01``..., selected the same way); declared
  with fresh19, before either was read, as READING_VERSION 20's two untouched measurements; both read by them.
- retired held-out sets (:data:`RETIRED`: fresh ... fresh18, each read by evaluations of earlier versions) are also
  training data of the detector since READING_VERSION 12 (fresh5 since 13, fresh6 and fresh7 since 14, fresh8 and
  fresh9 since 15, fresh10 since 16, fresh11 and fresh12 since 17, fresh13 and fresh14 since 18, fresh15 and fresh16
  since 19, fresh17 and fresh18 since 20):
  ``extra_pairs("fresh")``... return them less the items above MiniLM cosine 0.75 to a validation or still-held-out prompt (``retired_exclusions.json``). Their files are
  unchanged and ``harmful_pairs("fresh")``... still return them whole, for re-reading earlier results.
- harmless prompts with scary words: ``i % 5`` in 0-1 -> ``"train"``, else ``"test"`` (48 / 52).
- extra harmless prompts with scary words (``harmless_scary_words_extra.json``, 200, 25 a category): training
  only, never split; ``scary_harmless("train", extra=True)`` appends them to the training split.
- extra harmful/harmless pairs (``harmful_harmless_pairs_extra.json``, 240, 30 a category): training
  only, never split; ``harmful_pairs("train", extra=True)`` appends them to the training split. No
  extra prompt has MiniLM cosine above 0.75 to a validation or test prompt.
- ``extra_pairs("extra2")`` / ``extra_scary_harmless("extra2")``: a second training-only pair of files written for
  topic breadth (280 pairs, 132 scary-word prompts); none within MiniLM cosine 0.75 of a validation or held-out prompt
  (test, fresh, fresh2).
- ``extra_pairs("extra3")`` / ``extra_scary_harmless("extra3")``: a third training-only pair of files (READING_VERSION 13)
  from six writers who opened no project file, each told a different style (casual chat, fiction and role-play
  framings, workplace framings, implied harm, near-miss harmless with risky words, backstories and non-native
  phrasing); every item within MiniLM cosine 0.75 of any other project prompt was dropped.

Example:
    >>> from safeguard.steering.data import harmful_pairs
    >>> len(harmful_pairs("test"))
    72
"""

from __future__ import annotations

import functools
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core.errors import InvalidOptionError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "llm"
SPLITS = ("train", "val", "test")
# the held-out sets written after the first, each a whole file (those already read are retired into training data: RETIRED)
LATER = tuple(f"fresh{i}" if i > 1 else "fresh" for i in range(1, 21))  # fresh, fresh2 ... fresh20
HELD_OUT = ("test", *LATER)
EXTRA = ("extra", "extra2", "extra3")  # the training-only files, by the suffix of their names
# read held-out sets retired into detector training data (READING_VERSION 12; fresh5 since 13, fresh6 and fresh7 since
# 14, fresh8 and fresh9 since 15, fresh10 since 16, fresh11 and fresh12 since 17, fresh13 and fresh14 since 18,
# fresh15 and fresh16 since 19, fresh17 and fresh18 since 20), less their items near a held-out prompt
RETIRED = LATER[:18]  # fresh ... fresh18
STILL_HELD_OUT = tuple(s for s in HELD_OUT if s not in RETIRED)  # test, fresh19, fresh20
EXCLUSIONS = "retired_exclusions.json"  # written by scripts/data_leakage_check.py --write-exclusions


@functools.cache
def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA_DIR / name).read_text())


def _by_category(items: list[dict]) -> list[tuple[int, dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[it["category"]].append(it)
    out = []
    for cat in sorted(groups):
        out += list(enumerate(sorted(groups[cat], key=lambda it: it["id"])))
    return out


def _whole(name: str, key: str) -> list[dict]:
    """Every item of an unsplit file (extra training data, the fresh held-out set), in category then id order."""
    return [it for _, it in _by_category(_load(name)[key])]


def _check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise InvalidOptionError(f"split={split!r} is not one of {list(allowed)}.")


def harmful_pairs(split: str, extra: bool = False) -> list[dict[str, str]]:
    """Matched ``{"id", "category", "harmful", "harmless"}`` pairs of one split.

    ``extra=True`` (``"train"`` only) appends :func:`extra_pairs` after the split's own pairs.
    """
    _check_split(split, (*SPLITS, *LATER))
    if extra and split != "train":
        raise InvalidOptionError(f"extra pairs are training data only; got split={split!r} with extra=True.")
    if split in LATER:
        return _whole(f"harmful_harmless_pairs_{split}.json", "pairs")
    want = {"train": (0, 1, 2, 3), "val": (4,), "test": (5, 6, 7)}[split]
    pairs = [it for i, it in _by_category(_load("harmful_harmless_pairs.json")["pairs"]) if i % 8 in want]
    return pairs + extra_pairs() if extra else pairs


def extra_pairs(which: str = "extra") -> list[dict[str, str]]:
    """Training-only pairs, in category then id order: ``"extra"``, the 240 of ``harmful_harmless_pairs_extra.json``
    (ids ``<category>-x001``...), ``"extra2"``, the 280 of ``harmful_harmless_pairs_extra2.json`` (``-y001``...),
    ``"extra3"``, those of ``harmful_harmless_pairs_extra3.json`` (``-z001``...), or
    a retired held-out set (:data:`RETIRED`: ``"fresh"``... ``"fresh18"``) less its pairs with a side above MiniLM
    cosine 0.75 to a prompt of a set still held out (:func:`retired_exclusions`)."""
    _check_extra(which)
    return _less_exclusions(which, _whole(f"harmful_harmless_pairs_{which}.json", "pairs"))


def _check_extra(which: str) -> None:
    if which not in (*EXTRA, *RETIRED):
        raise InvalidOptionError(
            f"extra training set {which!r} is not one of {list(EXTRA)} or the retired held-out sets {list(RETIRED)}."
        )


def _less_exclusions(which: str, items: list[dict[str, str]]) -> list[dict[str, str]]:
    """``items`` of training file ``which`` less those a retired set leaves out (no change for the extra files)."""
    drop = set(retired_exclusions().get(which, ())) if which in RETIRED else set()
    return [it for it in items if it["id"] not in drop]


def retired_exclusions() -> dict[str, list[str]]:
    """``{retired set: ids}`` of the items left out when the set serves as training data: those with a side above
    MiniLM cosine 0.75 to a validation or still-held-out prompt (``test``, ``fresh19``, ``fresh20``)."""
    return {k: list(v) for k, v in _load(EXCLUSIONS)["excluded"].items()}


def scary_harmless(split: str, extra: bool = False) -> list[dict[str, str]]:
    """Harmless requests with dangerous-sounding words (``"kill a Python process"``), for over-refusal.

    ``extra=True`` (``"train"`` only) appends :func:`extra_scary_harmless` after the split's own prompts.
    """
    _check_split(split, ("train", *HELD_OUT))
    if extra and split != "train":
        raise InvalidOptionError(
            f"extra scary-word prompts are training data only; got split={split!r} with extra=True."
        )
    if split in LATER:
        return _whole(f"harmless_scary_words_{split}.json", "prompts")
    want = (0, 1) if split == "train" else (2, 3, 4)
    items = [it for i, it in _by_category(_load("harmless_scary_words.json")["prompts"]) if i % 5 in want]
    return items + extra_scary_harmless() if extra else items


def extra_scary_harmless(which: str = "extra") -> list[dict[str, str]]:
    """Training-only scary-word harmless prompts, in category then id order: ``"extra"``, the 200 of
    ``harmless_scary_words_extra.json`` (ids ``scary-x001``...), ``"extra2"``, the 132 of
    ``harmless_scary_words_extra2.json`` (``scary-y001``...), ``"extra3"`` (``scary-z001``...), or a retired held-out
    set less its excluded prompts."""
    _check_extra(which)
    return _less_exclusions(which, _whole(f"harmless_scary_words_{which}.json", "prompts"))


WRAP_SOURCES = ("train", "extra", "extra2")  # the training pairs a wrapped copy may be made of


def wrapped_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` training pairs put inside task-format wrappers (``task_wrappers.json``), for detector training.

    Drawn without replacement (seeded) from the training split and the ``extra`` and ``extra2`` files; each pair
    gets one template, the same on both sides, so that a wrapper ("Write a Python script that does this for me:
    ...") says nothing about harm and the request inside still does. Ids are the source's with ``-w`` and the
    template's index appended. Nothing of a held-out set is used.

    Example:
        >>> pair = wrapped_pairs(1)[0]
        >>> sorted(pair) == ["category", "harmful", "harmless", "id"]
        True
    """
    pool = harmful_pairs("train") + [p for which in WRAP_SOURCES[1:] for p in extra_pairs(which)]
    if not 0 <= n <= len(pool):
        raise InvalidOptionError(f"wrapped pairs n={n} must be between 0 and {len(pool)} (the training pairs).")
    templates = _load("task_wrappers.json")["templates"]
    rng = random.Random(seed)
    out = []
    for pair in rng.sample(pool, n):
        k = rng.randrange(len(templates))
        out.append(
            {
                "id": f"{pair['id']}-w{k:02d}",
                "category": pair["category"],
                **{side: templates[k].format(request=pair[side]) for side in ("harmful", "harmless")},
            }
        )
    return out


def refusal_exemplars() -> tuple[list[str], list[str]]:
    """``(refusals, compliances)``: example reply openings for reading the refusal behaviour."""
    d = _load("refusal_exemplars.json")
    return list(d["refusals"]), list(d["compliances"])


def topic_pairs(topics: list[str], split: str = "train", seed: int = 0) -> tuple[list[str], list[str]]:
    """Template contrast pairs for a free-text topic: ``(about the topic, about a neutral topic)``.

    Templates are split as well (every 4th template is held out for ``"test"``), so evaluation
    prompts use phrasings that reading never saw.
    """
    _check_split(split, ("train", "test"))
    d = _load("topic_templates.json")
    templates = [t for i, t in enumerate(d["templates"]) if (i % 4 == 3) == (split == "test")]
    neutral = list(d["neutral_topics"])
    rng = random.Random(seed)
    pos, neg = [], []
    for t in templates:
        for topic in topics:
            pos.append(t.format(topic=topic))
            neg.append(t.format(topic=rng.choice(neutral)))
    return pos, neg


def topic_phrases(name: str) -> list[str] | None:
    """The project's topic phrases for a concept name (``"violence"``, ``"weapons"``...), or ``None``."""
    return _load("topic_templates.json")["topics"].get(name.lower())
