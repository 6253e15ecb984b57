"""Run by tests/test_kernels.py in a child process with ``TRITON_INTERPRET=1`` set before anything imports triton.

Triton's interpreter must be on when triton is first imported (its standard library, e.g. ``tl.sum``, is
compiled at import), and inside a pytest process other modules may import triton first. This script computes
each kernel through the interpreted Triton path and through its eager reference, counts the launches, and prints
one JSON object; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
os.environ.pop("SAFEGUARD_DISABLE_KERNELS", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from safeguard.kernels import (  # noqa: E402
    _triton,
    ablate_rows,
    ablate_rows_eager,
    sld_guidance,
    sld_guidance_eager,
)

LAUNCHES = {"sld_kernel": 0, "ablate_kernel": 0}


class Spy:
    def __init__(self, name):
        self.name, self.kernel = name, getattr(_triton, name)

    def __getitem__(self, grid):
        LAUNCHES[self.name] += 1
        return self.kernel[grid]


for _name in LAUNCHES:
    setattr(_triton, _name, Spy(_name))


def counted(fn):
    before = dict(LAUNCHES)
    out = fn()
    return out, {k: LAUNCHES[k] - before[k] for k in LAUNCHES}


def diff(a, b):
    return float((a - b).abs().max())


def main() -> None:
    out = {}
    sld = dict(sld_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    g = torch.Generator().manual_seed(0)
    u, c, k, m = (torch.randn(3, 4, 11, 13, generator=g) * 0.02 for _ in range(4))  # 1716: two blocks, one partial
    for name, mom in (("sld_no_momentum", None), ("sld_momentum", m)):
        (fused, fm), launches = counted(lambda mom=mom: sld_guidance(u, c, k, mom, **sld))
        ref, rm = sld_guidance_eager(u, c, k, mom, **sld)
        out[name] = dict(diff=diff(fused, ref), diff_momentum=diff(fm, rm), launches=launches["sld_kernel"],
                         scale=float(ref.abs().max()))  # fmt: skip

    h = torch.randn(2, 7, 40, generator=g) * 3  # hidden 40: not a power of two
    unit = torch.nn.functional.normalize(torch.randn(40, generator=g), dim=0)
    gate = (torch.rand(2, 7, 1, generator=g) > 0.5).float()
    row_gate = torch.tensor([[[1.0]], [[0.0]]])
    for name, strength, gt in (
        ("ablate_gated", 1.0, gate),
        ("ablate_ungated", 2.5, None),
        ("ablate_row_gate", 1.0, row_gate),
    ):
        fused, launches = counted(lambda s=strength, gt=gt: ablate_rows(h, unit, s, gt))
        ref = ablate_rows_eager(h, unit, strength, gt)
        on = torch.ones(2, 7, dtype=torch.bool) if gt is None else gt.expand(2, 7, 1)[..., 0].bool()
        out[name] = dict(
            diff=diff(fused, ref), launches=launches["ablate_kernel"], scale=float(h.abs().max()),
            residual_along_u=float((fused @ unit)[on].abs().max()) if strength == 1.0 else None,
            untouched_equal=bool(torch.equal(fused[~on], h[~on])),
        )  # fmt: skip

    os.environ["SAFEGUARD_DISABLE_KERNELS"] = "1"
    _, launches = counted(lambda: sld_guidance(u, c, k, m, **sld))
    out["disabled"] = dict(launches=launches["sld_kernel"])
    del os.environ["SAFEGUARD_DISABLE_KERNELS"]

    # the repe defense's ablation end to end: interpreted kernel vs eager, same greedy tokens
    from test_repe import batch, random_vectors
    from tiny_llms import tiny_llama, tiny_tokenizer

    import safeguard

    model, tok = tiny_llama(), tiny_tokenizer()
    folder = str(random_vectors(4, 32).save(Path(sys.argv[1]) / "vecs"))
    enc = batch(tok, ["how do i make a bomb", "please explain python"])
    safeguard.wrap(model, tokenizer=tok, concepts=["violence"], method="repe", mode="ablate", strength=2.0,
                   vectors=folder)  # fmt: skip
    with torch.no_grad():
        (logits, ids), launches = counted(
            lambda: (model(**enc).logits, model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0))
        )
        os.environ["SAFEGUARD_DISABLE_KERNELS"] = "1"
        e_logits = model(**enc).logits
        e_ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    safeguard.unwrap(model)
    out["repe_ablate"] = dict(
        launches=launches["ablate_kernel"],
        logits_diff=diff(logits, e_logits),
        same_tokens=bool(torch.equal(ids, e_ids)),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
