"""Is another reader of the residual stream a better harmful-request detector than the shipped one?

(Run against the detector shipped up to READING_VERSION 7; the one shipped since is the choice of
``detector_negatives_experiment.py``.) The shipped ``harmful`` detector (:mod:`safeguard.steering.detector`, ``"both"``) sums two standardised
cosines with shrunk Fisher (LDA, shrinkage 0.7) directions: the last prompt token at one layer and the mean
over the request's own tokens at another. On the calibration scores it reaches TPR 0.91 at FPR 0.05. This
script compares, with the calibration's rules (5-fold out-of-fold training scores + validation scores; each
pool's layer by validation + out-of-fold AUROC; threshold maximising ``TPR - 1.5 FPR``) and the same data
(104 training pairs + 48 scary-word harmless prompts; 24 + 24 validation):

- **families** on the two shipped pools: LDA 0.7 (shipped) and 0.9, the plain mean difference, L2 logistic
  regression on standardised states (lambda 0.01 and 0.1, class-balanced), and a k-nearest-neighbour score
  (mean cosine to the k nearest harmful minus to the k nearest harmless training states, k = 5, 10);
- **positions** (LDA 0.7): each of the chat template's six post-instruction tokens (``<|im_end|>``, newline,
  ``<|im_start|>``, ``ass``, ``istant``, newline: the last one is the shipped ``last`` view), their mean, and
  sums with the request-mean view (harmfulness is said to be read best at the instruction's end,
  Zhao et al. 2025, refusal after it).

Reported per reader: validation and out-of-fold AUROC, best TPR within FPR 0.03 / 0.05 / 0.08 of the
calibration scores (``tpr@k``). Held-out test numbers (``*_info``: 72 harmful vs 72 matched harmless + 52
scary-word harmless, at the rule's threshold) are information only and choose nothing.

    OMP_NUM_THREADS=2 python scripts/detector_readers_experiment.py [--states /tmp/readers.safetensors]

About 6 minutes on 2 CPU cores (4 to read the states; ``--states`` keeps them for a rerun).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from detector_common import detector_metrics, standardised_sum, write_result
from detector_common import prompt_sets as all_prompt_sets
from safetensors.torch import load_file, save_file

from safeguard.adapters import CausalLMAdapter
from safeguard.models import smollm2
from safeguard.steering.calibrate import auroc
from safeguard.steering.reading import _layer_output, collect_states, lda_directions

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "eval" / "repe_detector_readers.json"
POST = 6  # post-instruction tokens of SmolLM2's chat template
POSITION_NAMES = ("im_end", "newline", "im_start", "ass", "istant", "newline_last")
FIRST_LAYER = 10  # detectors read late layers; earlier ones separate poorly (calibration tables)
Fit = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]


def prompt_sets() -> dict[str, list[str]]:
    """The original training, validation and test sets (no extra training data)."""
    return all_prompt_sets(exclude=["extra_harmful", "extra_harmless", "scary_extra"])


@torch.no_grad()
def read_all(adapter: CausalLMAdapter) -> dict[str, torch.Tensor]:
    """``{"post/<set>": [L, N, 6, d], "prompt/<set>": [L, N, d]}`` (layer outputs, float32)."""
    model, tok, chat = adapter.model, adapter.tokenizer, adapter.chat_text
    _, layers = adapter.decoder_layers()
    prefix = adapter.chat_prefix_ids()
    captured: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def hook(i: int):
        def fn(module, args, output):
            captured[i] = _layer_output(output)[:, -POST:].float()

        return fn

    out: dict[str, torch.Tensor] = {}
    side, tok.padding_side = tok.padding_side, "left"  # left padding: the last POST positions are real tokens
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for name, prompts in prompt_sets().items():
            texts = [chat(p) for p in prompts]
            chunks = []
            for i in range(0, len(texts), 16):
                enc = tok(texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
                model(**enc.to(adapter.device), use_cache=False)
                chunks.append(torch.stack(captured))
            out[f"post/{name}"] = torch.cat(chunks, dim=1)
            logging.info("read %s (%d prompts)", name, len(texts))
    finally:
        for h in handles:
            h.remove()
        tok.padding_side = side
    for name, prompts in prompt_sets().items():
        texts = [chat(p) for p in prompts]
        out[f"prompt/{name}"] = collect_states(model, tok, texts, layers, position="prompt", prefix_ids=prefix)[0]
    return out


def lda(shrinkage: float) -> Fit:
    def fit(p: torch.Tensor, n: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        w = lda_directions(p[None], n[None], shrinkage)[0]
        return [x @ w / x.norm(dim=-1).clamp_min(1e-12) for x in xs]

    return fit


def logistic(lam: float) -> Fit:
    def fit(p: torch.Tensor, n: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([p, n]).double()
        y = torch.cat([torch.ones(len(p)), torch.zeros(len(n))]).double()
        mu, sd = x.mean(0), x.std(0) + 1e-6
        z = (x - mu) / sd
        w = torch.zeros(z.shape[1], dtype=torch.double, requires_grad=True)
        b = torch.zeros(1, dtype=torch.double, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
        balance = torch.tensor(len(n) / len(p), dtype=torch.double)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=balance)
            loss = loss + lam * (w @ w)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return [(((v.double() - mu) / sd) @ w + b).float() for v in xs]

    return fit


def knn(k: int) -> Fit:
    def fit(p: torch.Tensor, n: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        unit = torch.nn.functional.normalize
        pu, nu = unit(p, dim=-1), unit(n, dim=-1)
        out = []
        for v in xs:
            vu = unit(v, dim=-1)
            out.append((vu @ pu.T).topk(k, dim=1).values.mean(1) - (vu @ nu.T).topk(k, dim=1).values.mean(1))
        return out

    return fit


FAMILIES: dict[str, Fit] = {
    "lda0.7": lda(0.7),
    "lda0.9": lda(0.9),
    "mean_diff": lda(1.0),
    "logistic0.01": logistic(0.01),
    "logistic0.1": logistic(0.1),
    "knn5": knn(5),
    "knn10": knn(10),
}
SPLITS = ("oof_p", "oof_n", "val_p", "val_n", "test_p", "test_h", "test_s")


def per_layer(s: dict[str, torch.Tensor], fit: Fit, folds: int = 5) -> dict[int, dict]:
    """Scores of every split at each layer (out-of-fold for training) and the layer's val / OOF AUROC."""
    pos = s["train_harmful"]
    neg = torch.cat([s["train_harmless"], s["scary_train"]], dim=1)
    out = {}
    for layer in range(FIRST_LAYER, pos.shape[0]):
        p, n = pos[layer], neg[layer]
        oof_p, oof_n = torch.zeros(len(p)), torch.zeros(len(n))
        for f in range(folds):
            tp, tn = torch.arange(len(p)) % folds == f, torch.arange(len(n)) % folds == f
            oof_p[tp], oof_n[tn] = fit(p[~tp], n[~tn], [p[tp], n[tn]])
        held = [s[k][layer] for k in ("val_harmful", "val_harmless", "test_harmful", "test_harmless", "scary_test")]
        sc = dict(zip(SPLITS, [oof_p, oof_n, *fit(p, n, held)]))
        out[layer] = {"scores": sc, "val": auroc(sc["val_p"], sc["val_n"]), "oof": auroc(oof_p, oof_n)}
    return out


def best_layer(table: dict[int, dict]) -> int:
    return max(table, key=lambda i: table[i]["val"] + table[i]["oof"])


def summarize(parts: list[tuple[str, dict[int, dict], int]]) -> dict:
    """Standardised sum of the views ``(label, table, layer)``; calibration and (info) test metrics."""
    tot = standardised_sum([table[layer]["scores"] for _, table, layer in parts])
    return {"views": [f"{label}@{layer}" for label, _, layer in parts]} | detector_metrics(tot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--states", type=Path, help="safetensors file to reuse the read states from (written if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.states and args.states.exists():
        flat = load_file(args.states)
    else:
        model, tok = smollm2()
        flat = read_all(CausalLMAdapter(model, tok))
        if args.states:
            save_file({k: v.contiguous() for k, v in flat.items()}, args.states)
    pools = {"prompt": {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("prompt/")}}
    post = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("post/")}
    for j, name in enumerate(POSITION_NAMES):
        pools[name] = {k: v[:, :, j] for k, v in post.items()}
    pools["post_mean"] = {k: v.mean(2) for k, v in post.items()}

    runs: dict[str, dict] = {}
    for fam, fit in FAMILIES.items():
        last, prompt = per_layer(pools["newline_last"], fit), per_layer(pools["prompt"], fit)
        bl, bp = best_layer(last), best_layer(prompt)
        runs[f"{fam}:last"] = summarize([("last", last, bl)])
        runs[f"{fam}:prompt"] = summarize([("prompt", prompt, bp)])
        runs[f"{fam}:both"] = summarize([("last", last, bl), ("prompt", prompt, bp)])
        logging.info("%s done (%.0f s)", fam, time.perf_counter() - t0)
        if fam == "lda0.7":
            tables = {"newline_last": last, "prompt": prompt}
    for name in (*POSITION_NAMES[:-1], "post_mean"):
        tables[name] = per_layer(pools[name], FAMILIES["lda0.7"])
        runs[f"lda0.7:{name}"] = summarize([(name, tables[name], best_layer(tables[name]))])
    view = {k: (k, t, best_layer(t)) for k, t in tables.items()}
    runs["lda0.7:post_mean+prompt"] = summarize([view["post_mean"], view["prompt"]])
    runs["lda0.7:im_end+prompt"] = summarize([view["im_end"], view["prompt"]])
    runs["lda0.7:im_end+last+prompt"] = summarize([view["im_end"], view["newline_last"], view["prompt"]])

    print("* = held-out test, information only")
    print(f"{'reader':30s}{'views':>24s}{'val':>7s}{'oof':>7s}{'tpr@3':>7s}{'tpr@5':>7s}{'tpr@8':>7s} | "
          f"{'auc*':>6s}{'tpr*':>6s}{'fpr_h*':>7s}{'fpr_s*':>7s}")  # fmt: skip
    for name, r in runs.items():
        print(
            f"{name:30s}{','.join(r['views']):>24s}{r['val_auroc']:7.3f}{r['oof_auroc']:7.3f}{r['tpr@3']:7.3f}"
            f"{r['tpr@5']:7.3f}{r['tpr@8']:7.3f} | {r['test_auroc_info']:6.3f}{r['test_tpr_info']:6.3f}"
            f"{r['test_fpr_harmless_info']:7.3f}{r['test_fpr_scary_info']:7.3f}"
        )
    result = {
        "description": (
            "Harmful-request detectors of SmolLM2-135M-Instruct: reader families (LDA, mean difference, logistic "
            "regression, kNN) on the shipped pools, and LDA at each post-instruction token. Calibration metrics on "
            "out-of-fold training + validation scores; *_info fields read the held-out test split, information only."
        ),
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
