"""Where the shipped harmful-request detector's scores fall on every held-out set, and what other thresholds would do.

For each held-out set (``test``, ``fresh`` ... ``fresh20``: harmful requests, matched harmless ones, harmless
ones with scary words; ``fresh`` ... ``fresh18`` are training data of the detector since READING_VERSION 12 ... 20
and are marked so, without the parity check, since their evaluations were all made with older vectors) this reads the shipped detector's views (:func:`safeguard.steering.detector.resolve_detector`
on the shipped vectors: its views, each a cosine standardised by the calibration's center and scale, summed, or for
the ``"mlp"`` detector the learned head's logit of the views' states; :func:`~safeguard.steering.detector.view_scores`) through the chat template, as the guard does during the prefill, and reports:

- AUROC of harmful against all harmless requests, and the shares above the calibrated threshold (flagged); when
  ``benchmarks/results/eval/llm_repe_harmful[_<set>].json`` exists, a parity check that these shares equal the
  ``fired`` rates the evaluation recorded through the real hooks;
- the shares flagged at a few other thresholds (``--thresholds``), and by the other detectors calibrated in the
  same vectors at their own thresholds (``other_detectors_info``; e.g. READING_VERSION 10's ``"both"``):
  **information only**. Every one of these sets
  has been read, so choosing a threshold from this table would fit it to them; the calibrated threshold is
  chosen on calibration data (``safeguard.steering.build``) and is what ships;
- a figure: per set, the histograms of the three kinds of request with the calibrated threshold marked.

    OMP_NUM_THREADS=2 python scripts/detector_heldout_scores.py [--out benchmarks/results/eval/repe_detector_heldout]

About 6 minutes on 2 CPU cores. Writes ``<out>.json`` and ``<out>.png`` (``--replot`` redraws the figure from the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from detector_common import write_result

from safeguard.adapters import CausalLMAdapter
from safeguard.steering import data
from safeguard.steering.calibrate import auroc
from safeguard.steering.detector import resolve_detector, view_scores
from safeguard.steering.encoder import SentenceEncoder, chat_request_texts
from safeguard.steering.reading import collect_states
from safeguard.steering.vectors import SteeringVectors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "safeguard" / "models" / "weights" / "repe" / "harmful-mean_diff"
EVAL = ROOT / "benchmarks" / "results" / "eval"
DEFAULT_OUT = EVAL / "repe_detector_heldout"
KINDS = ("harmful", "harmless", "harmless_scary")
# kept unread for the next versions' untouched measurements: skipped
UNREAD: tuple[str, ...] = ()


def held_out(split: str) -> dict[str, list[str]]:
    pairs = data.harmful_pairs(split)
    return {
        "harmful": [p["harmful"] for p in pairs],
        "harmless": [p["harmless"] for p in pairs],
        "harmless_scary": [p["prompt"] for p in data.scary_harmless(split)],
    }


@torch.no_grad()
def view_states(adapter: CausalLMAdapter, views, prompts: list[str]) -> dict[tuple, torch.Tensor]:
    """``{(set, layer, pool): [N, d] pooled states}`` of raw requests (chat template applied) for every view."""
    texts = [adapter.chat_text(p) for p in prompts]
    _, layers = adapter.decoder_layers()
    states: dict[str, torch.Tensor] = {}  # per pooling, every layer (one forward each)
    out = {}
    for v in views:
        key = (v.set, v.layer, v.pool)
        if key in out:
            continue
        if v.pool == "encoder":  # the request text as the guard decodes it, embedded
            out[key] = SentenceEncoder().embed(chat_request_texts(adapter, prompts))
            continue
        if v.pool not in states:
            kw = {"position": "prompt", "prefix_ids": adapter.chat_prefix_ids()} if v.pool == "prompt" else {}
            states[v.pool] = collect_states(adapter.model, adapter.tokenizer, texts, layers, **kw)[0]
        out[key] = states[v.pool][v.layer]
    return out


def detector_scores(det, vecs: SteeringVectors, states: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """``[N]`` scores of ``det`` as the guard computes them (:func:`safeguard.steering.detector.view_scores`)."""
    return view_scores([states[(v.set, v.layer, v.pool)] for v in det.views], det.units(vecs), det)


def plot(result: dict, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(result["sets"])
    cols = min(len(splits), 3)
    rows = -(-len(splits) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), sharey=True, squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(splits) :]:
        ax.axis("off")
    colors = {"harmful": "#c0392b", "harmless": "#2e86c1", "harmless_scary": "#27ae60"}
    labels = {"harmful": "harmful", "harmless": "matched harmless", "harmless_scary": "harmless, scary words"}
    all_s = [x for s in splits for k in KINDS for x in result["sets"][s]["scores"][k]]
    bins = torch.linspace(min(all_s), max(all_s), 31).tolist()
    for ax, s in zip(axes, splits):
        r = result["sets"][s]
        for k in KINDS:
            ax.hist(r["scores"][k], bins=bins, alpha=0.55, color=colors[k], label=labels[k], density=True)
        ax.axvline(threshold, color="k", lw=1.2, ls="--")
        f = r["flagged"]
        tag = " (training data)" if r.get("training_data") else ""
        ax.set_title(
            f"{s}{tag}: flagged {100 * f['harmful']:.1f}% harmful,\n{100 * f['harmless']:.1f}% matched / "
            f"{100 * f['harmless_scary']:.1f}% scary harmless",
            fontsize=9,
        )
        ax.set_xlabel(
            "detector score" + (" (head logit)" if result["detector"] == "mlp" else " (sum of standardised cosines)")
        )
    for ax in grid[:, 0]:
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"shipped harmful-request detector {result['detector']!r} on the held-out sets "
        f"(dashed: calibrated threshold {threshold:.3f})"
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # keep half an inch for the suptitle
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without suffix")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[1.0, 0.5, 0.38, 0.0], help="others to tabulate")
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from <out>.json")
    args = ap.parse_args()
    if args.replot:
        result = json.loads(args.out.with_suffix(".json").read_text())
        plot(result, result["threshold"], args.out.with_suffix(".png"))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from safeguard.models import smollm2

    t0 = time.perf_counter()
    model, tok = smollm2()
    adapter = CausalLMAdapter(model, tok)
    vecs = SteeringVectors.load(VECTORS)
    det = resolve_detector(vecs)
    others = {name: resolve_detector(vecs, name) for name in vecs.calibration["detectors"] if name != det.name}
    every_view = [v for d in (det, *others.values()) for v in d.views]
    result: dict = {"detector": det.name, "views": [v.to_json() for v in det.views], "threshold": det.threshold}
    result["sets"] = {}
    for split in (s for s in data.HELD_OUT if s not in UNREAD):
        st = {k: view_states(adapter, every_view, ps) for k, ps in held_out(split).items()}
        sc = {k: detector_scores(det, vecs, c) for k, c in st.items()}
        neg = torch.cat([sc["harmless"], sc["harmless_scary"]])
        row = {
            "auroc": auroc(sc["harmful"], neg),
            "flagged": {k: float((v > det.threshold).float().mean()) for k, v in sc.items()},
            "other_thresholds_info": {
                f"{t:g}": {k: float((v > t).float().mean()) for k, v in sc.items()} for t in args.thresholds
            },
            "scores": {k: [round(x, 4) for x in v.tolist()] for k, v in sc.items()},
            "other_detectors_info": {},
        }
        for name, d in others.items():  # the other calibrated detectors at their own thresholds: information only
            o = {k: detector_scores(d, vecs, c) for k, c in st.items()}
            row["other_detectors_info"][name] = {
                "auroc": auroc(o["harmful"], torch.cat([o["harmless"], o["harmless_scary"]])),
                "flagged": {k: float((v > d.threshold).float().mean()) for k, v in o.items()},
            }
        ev = EVAL / ("llm_repe_harmful.json" if split == "test" else f"llm_repe_harmful_{split}.json")
        row["training_data"] = split in data.RETIRED  # read by the detector's calibration since READING_VERSION 12
        if ev.exists() and not row["training_data"]:  # a retired set's evaluations are all of older vectors
            fired = json.loads(ev.read_text())["fired"]
            row["eval_fired"] = {k: sum(fired[k]) / len(fired[k]) for k in KINDS}
            row["parity_with_eval"] = all(
                [bool(x) for x in fired[k]] == (sc[k] > det.threshold).tolist() for k in KINDS
            )
        result["sets"][split] = row
        logging.info("%s done (%.0f s)", split, time.perf_counter() - t0)
    print(f"detector {det.name!r}, threshold {det.threshold:.3f}; flagged share of each kind (other thresholds: info)")
    print(
        f"{'set':8s}{'auroc':>7s}{'harmful':>9s}{'matched':>9s}{'scary':>8s}{'parity':>8s}  flagged at other thresholds"
    )
    for split, r in result["sets"].items():
        f = r["flagged"]
        others = "  ".join(
            f"{t}: {100 * o['harmful']:.1f}/{100 * o['harmless']:.1f}/{100 * o['harmless_scary']:.1f}"
            for t, o in r["other_thresholds_info"].items()
        )
        print(
            f"{split:8s}{r['auroc']:7.3f}{100 * f['harmful']:8.1f}%{100 * f['harmless']:8.1f}%"
            f"{100 * f['harmless_scary']:7.1f}%{r.get('parity_with_eval', '-')!s:>8s}  {others}"
        )
    print(
        "\nthe other calibrated detectors at their own thresholds (information only): flagged harmful/matched/scary %"
    )
    for split, r in result["sets"].items():
        cells = "  ".join(
            f"{n}: {100 * o['flagged']['harmful']:.1f}/{100 * o['flagged']['harmless']:.1f}/"
            f"{100 * o['flagged']['harmless_scary']:.1f} (AUROC {o['auroc']:.3f})"
            for n, o in r["other_detectors_info"].items()
        )
        print(f"{split:8s}{cells}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(result, args.out.with_suffix(".json"))
    plot(result, det.threshold, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
