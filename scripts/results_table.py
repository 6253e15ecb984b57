"""Markdown table of ``safeguard eval`` results, written into README.md between markers.

    python scripts/results_table.py [--results benchmarks/results/eval] [--readme README.md]

Reads every ``<concept>_<method>.json`` the eval harness wrote and replaces the text between
``<!-- eval-results:start -->`` and ``<!-- eval-results:end -->`` in the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- eval-results:start -->", "<!-- eval-results:end -->"


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def table(results_dir: Path) -> str:
    rows = [
        "| concept | method | erasure: direct | seen syn. | unseen syn. | indirect | mean | ASR | preservation (acc. ratio) | pixel diff | latency ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        if "metrics" not in r or "erasure" not in r["metrics"]:  # e.g. the language-model evals (llm_*.json)
            continue
        m = r["metrics"]
        e, p = m["erasure"], m["preservation"]
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        method = r["method"] + (f" ({opts})" if opts else "")
        rows.append(
            f"| {r['concept']} | {method} | {fmt(e['direct'])} | {fmt(e['seen_synonyms'])} | {fmt(e['unseen_synonyms'])} "
            f"| {fmt(e['indirect'])} | {fmt(e['mean'])} | {fmt(m['asr']['all'])} | {fmt(p['accuracy_ratio'])} "
            f"| {p['pixel_diff']:.3f} | {fmt(m['latency']['ratio'])} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/eval")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args()
    text = table(Path(args.results))
    print(text)
    readme = Path(args.readme)
    content = readme.read_text()
    if START in content and END in content:
        head, rest = content.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
