"""Select a new held-out LLM set from blind writers' candidates without reading them: the leakage guard as a rule.

Each writer (who opened no project file) writes a JSON file ``{"pairs": [{category, harmful, harmless}],
"prompts": [{category, prompt}]}``. This script embeds every existing project prompt (both sides of every pair file
and every scary-word file in ``safeguard/data/llm``, all splits) with all-MiniLM-L6-v2 and walks the candidates in
the writers' order (the files as given, each in its own order). Per category it keeps the first ``--pairs`` pairs
with neither side above MiniLM cosine ``--max`` to any existing prompt or to an item kept before, and likewise the
first ``--prompts`` scary-word prompts. It prints counts and similarities only, never a candidate's text, so the
new set stays unread until its one evaluation.

    python scripts/select_heldout.py --split fresh8 --letter m scripts/heldout_candidates/fresh8/writer_{a,b,c}.json \
        --note "written after ... for ..."

The writers' files of ``fresh8`` are kept in ``scripts/heldout_candidates/fresh8/``; with ``--out`` another folder
a rerun reproduces the shipped files (the split's own files are never references). Writes
``harmful_harmless_pairs_<split>.json`` and ``harmless_scary_words_<split>.json`` (ids ``<category>-<letter>01``
... and ``scary-<letter>01`` ...); exit status 1 if a category cannot be filled. About 20 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from safeguard.steering import data
from safeguard.steering.encoder import SentenceEncoder

PAIR_CATEGORIES = ("weapons", "cybercrime", "fraud", "drugs", "violence", "self_harm", "hate", "privacy")
SCARY_CATEGORIES = ("computing", "cooking", "sports", "fiction", "science", "everyday", "history", "health")


def project_prompts(folder: Path = data.DATA_DIR, leave_out: str | None = None) -> list[str]:
    """Every request of every pair and scary-word file in ``folder`` (both sides of each pair), less the files of
    split ``leave_out`` (so that a rerun of a selection reproduces it)."""
    out: list[str] = []
    mine = {f"harmful_harmless_pairs_{leave_out}.json", f"harmless_scary_words_{leave_out}.json"}
    for path in sorted(folder.glob("harmful_harmless_pairs*.json")):
        if path.name not in mine:
            out += [t for p in json.loads(path.read_text())["pairs"] for t in (p["harmful"], p["harmless"])]
    for path in sorted(folder.glob("harmless_scary_words*.json")):
        if path.name not in mine:
            out += [p["prompt"] for p in json.loads(path.read_text())["prompts"]]
    return out


class Selector:
    """Keeps candidates whose texts are all within ``threshold`` of every reference and every earlier kept text."""

    def __init__(self, embed, references: list[str], threshold: float) -> None:
        self.embed, self.threshold = embed, threshold
        self.ref = embed(references)
        self.highest_kept = 0.0
        self.skipped = 0

    def offer(self, texts: list[str]) -> bool:
        e = self.embed(texts)
        top = float((e @ self.ref.T).max())  # a pair's two sides are not compared: they are meant to be close
        if top > self.threshold:
            self.skipped += 1
            return False
        self.ref = torch.cat([self.ref, e])
        self.highest_kept = max(self.highest_kept, top)
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", type=Path, nargs="+", help="the writers' JSON files, in the order to walk them")
    ap.add_argument("--split", required=True, help="the new split's name (e.g. fresh8)")
    ap.add_argument("--letter", required=True, help="the id letter of the new set (e.g. m: weapons-m01, scary-m01)")
    ap.add_argument("--pairs", type=int, default=10, help="pairs kept per category (default 10)")
    ap.add_argument("--prompts", type=int, default=5, help="scary-word prompts kept per category (default 5)")
    ap.add_argument("--max", type=float, default=0.75, help="highest MiniLM cosine to any earlier prompt (0.75)")
    ap.add_argument("--note", default="", help="how and when the set was written, for the files' descriptions")
    ap.add_argument("--out", type=Path, default=data.DATA_DIR)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pair_file = args.out / f"harmful_harmless_pairs_{args.split}.json"
    scary_file = args.out / f"harmless_scary_words_{args.split}.json"
    if pair_file.exists() or scary_file.exists():
        sys.exit(f"{pair_file.name} or {scary_file.name} exists already; pick a new --split")
    refs = project_prompts(leave_out=args.split)
    blobs = [json.loads(p.read_text()) for p in args.candidates]
    sel = Selector(SentenceEncoder().embed, refs, args.max)
    pairs: dict[str, list[dict]] = {c: [] for c in PAIR_CATEGORIES}
    offered = 0
    for blob in blobs:
        for p in blob["pairs"]:
            if p["category"] in pairs and len(pairs[p["category"]]) < args.pairs:
                offered += 1
                if sel.offer([p["harmful"], p["harmless"]]):
                    pairs[p["category"]].append(p)
    pair_skips = sel.skipped
    prompts: dict[str, list[dict]] = {c: [] for c in SCARY_CATEGORIES}
    for blob in blobs:
        for p in blob["prompts"]:
            if p["category"] in prompts and len(prompts[p["category"]]) < args.prompts:
                if sel.offer([p["prompt"]]):
                    prompts[p["category"]].append(p)
    short = {c: len(v) for c, v in (pairs | prompts).items() if len(v) < (args.pairs if c in pairs else args.prompts)}
    print(f"references {len(refs)}; pairs skipped {pair_skips}; prompts skipped {sel.skipped - pair_skips}; "
          f"highest kept cosine {sel.highest_kept:.3f}")  # fmt: skip
    if short:
        sys.exit(f"categories not filled: {short}; ask a writer for more of them")
    n_pairs, n_prompts = args.pairs * len(PAIR_CATEGORIES), args.prompts * len(SCARY_CATEGORIES)
    rule = (
        f"Selected without reading: per category, in the writers' order, the first {args.pairs} pairs with no side "
        f"above MiniLM cosine {args.max} to any existing project prompt ({len(refs)}, every split of every file) or "
        f"to an earlier kept item ({pair_skips} pairs skipped; maximum kept {sel.highest_kept:.3f}; "
        "scripts/select_heldout.py)."
    )
    pair_blob = {
        "version": 1,
        "description": f"Held-out set of matched harmful/harmless request pairs (split {args.split!r}), for "
        f"evaluation only: {n_pairs} pairs, {args.pairs} in each of eight categories ({', '.join(PAIR_CATEGORIES)}). "
        f"{args.note} {rule} Requests only, no harmful details; hate items name groups generically.",
        "pairs": [
            {"id": f"{c}-{args.letter}{i + 1:02d}", "category": c, "harmful": p["harmful"], "harmless": p["harmless"]}
            for c in PAIR_CATEGORIES
            for i, p in enumerate(pairs[c])
        ],
    }
    ordered = [(c, p) for c in SCARY_CATEGORIES for p in prompts[c]]
    scary_blob = {
        "version": 1,
        "description": f"{n_prompts} clearly benign requests with dangerous-sounding words, {args.prompts} per "
        f"category ({', '.join(SCARY_CATEGORIES)}; split {args.split!r}, evaluation only), written and selected "
        f"with {pair_file.name} the same way ({sel.skipped - pair_skips} prompts skipped above MiniLM cosine {args.max}).",
        "prompts": [
            {"id": f"scary-{args.letter}{i + 1:02d}", "category": c, "prompt": p["prompt"]}
            for i, (c, p) in enumerate(ordered)
        ],
    }
    pair_file.write_text(json.dumps(pair_blob, indent=2, ensure_ascii=False) + "\n")
    scary_file.write_text(json.dumps(scary_blob, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {pair_file} ({offered} pairs offered) and {scary_file}")


if __name__ == "__main__":
    main()
