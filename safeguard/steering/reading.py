"""Reading directions from contrast pairs (Zou et al. 2023; Arditi et al. 2024).

States are taken at the output of every decoder layer with temporary forward hooks (the
residual stream as the next layer sees it, before any final norm). Positions:

- ``"last"``: the last real token of each text (the end of the chat template's assistant header
  for an instruction, where the model has read the request and not yet answered), found from the
  attention mask, so left and right padding give the same states;
- ``"mean"``: the mean over real tokens after the first one (the first position carries a huge
  norm in most LMs and says nothing about content), optionally from ``start`` tokens on;
- ``"prompt"``: the mean over the request's own tokens (:func:`prompt_weights`): as ``"mean"``, but
  rows that begin with the chat template's fixed prefix (system prompt and user header, given as
  ``prefix_ids``) skip it too. In a causal LM those prefix states are the same for every request,
  so averaging them in would only mix in a length-dependent constant.

Directions: ``"mean_diff"``, mean(positive) - mean(negative); ``"pca"``, the first principal axis
of the paired differences (uncentred, as RepE does), sign fixed so the positive side projects
higher. Both return unit directions plus the mean-difference length along them.

Example:
    >>> states_pos = collect_states(model, tok, harmful_texts)  # doctest: +SKIP
    >>> states_neg = collect_states(model, tok, harmless_texts)  # doctest: +SKIP
    >>> dirs, scales = read_directions(states_pos, states_neg, method="mean_diff")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import InvalidOptionError

POSITIONS = ("last", "mean", "prompt")
METHODS = ("mean_diff", "pca")


def prefix_matches(input_ids: torch.Tensor, real: torch.Tensor, prefix_ids: Sequence[int] | None) -> torch.Tensor:
    """``[B]`` bool: the row's real tokens begin with ``prefix_ids`` and at least one real token follows them."""
    B, T = int(input_ids.shape[0]), int(input_ids.shape[1])
    P = len(prefix_ids) if prefix_ids else 0
    if P == 0 or P >= T:
        return torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    first = real.to(torch.int8).argmax(dim=1)[:, None]
    idx = (first + torch.arange(P, device=input_ids.device)[None, :]).clamp(max=T - 1)
    prefix = torch.as_tensor(list(prefix_ids), device=input_ids.device, dtype=input_ids.dtype)
    same = (input_ids.gather(1, idx) == prefix[None, :]).all(dim=1)
    return same & (real.sum(dim=1) > P)


def prompt_weights(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    prefix_ids: Sequence[int] | None,
    shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``[B, T]`` float32 weights that average each row's request tokens (rows sum to 1, or 0 when empty).

    A row's request tokens are its real tokens (``attention_mask``; left or right padding) after its first one
    and, when the row's real tokens begin with ``prefix_ids`` (the chat template's fixed prefix) and go on past
    it (:func:`prefix_matches`), after that prefix. Without ``input_ids`` (``inputs_embeds`` calls) no prefix can
    be matched; ``shape`` then gives ``(B, T)`` when there is no mask either.
    """
    ref = input_ids if input_ids is not None else attention_mask
    if ref is not None:
        B, T = int(ref.shape[0]), int(ref.shape[1])
        device = ref.device
    elif shape is not None:
        (B, T), device = shape, torch.device("cpu")
    else:
        raise ValueError("prompt_weights needs input_ids, attention_mask or shape=(batch, length).")
    real = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    pos = torch.arange(T, device=device)[None, :]
    first = real.to(torch.int8).argmax(dim=1)[:, None]
    sel = real & (pos > first)
    if input_ids is not None and prefix_ids:
        match = prefix_matches(input_ids, real, prefix_ids)[:, None]
        sel &= ~match | (pos >= first + len(prefix_ids))
    w = sel.float()
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_states(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: nn.ModuleList,
    *,
    position: str = "last",
    starts: Sequence[int] | None = None,
    prefix_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states [num_layers, N, hidden], norms [num_layers])`` of ``texts`` (already chat-formatted).

    Args:
        model: the causal LM (any padding side works).
        tokenizer: its tokenizer (needs a pad token).
        texts: the full texts to read; they are tokenised without extra special tokens when the
            tokenizer has a chat template (the template already holds them).
        layers: the decoder-layer stack.
        position: ``"last"``, ``"mean"`` or ``"prompt"`` (see the module docstring).
        starts: with ``"mean"``, per text, the token index from which to average (e.g. where an
            assistant reply starts); default: from the second real token.
        prefix_ids: with ``"prompt"``, the chat template's fixed prefix
            (:meth:`~safeguard.adapters.CausalLMAdapter.chat_prefix_ids`).
        batch_size: texts per forward.
        progress: show a progress bar.

    Returns:
        float32 CPU states and the mean token norm per layer (position 0 excluded).
    """
    if position not in POSITIONS:
        raise InvalidOptionError(f"position={position!r} is not one of {list(POSITIONS)}.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_special = not bool(getattr(tokenizer, "chat_template", None))
    captured: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            captured[i] = _layer_output(output)

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    out: torch.Tensor | None = None
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    norm_count = 0
    device = next(model.parameters()).device
    try:
        batches = range(0, len(texts), batch_size)
        for b0 in tqdm(batches, desc="reading states", disable=not progress, leave=False):
            chunk = list(texts[b0 : b0 + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special)
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            first = real.to(torch.int8).argmax(dim=1)
            T = ids.shape[1]
            pos = torch.arange(T, device=device)[None, :]
            body = real & (pos != first[:, None])  # real tokens except each row's first
            last = T - 1 - real.flip(1).to(torch.int8).argmax(dim=1)
            if position == "mean":
                sel = body.clone()
                if starts is not None:
                    offs = torch.tensor([starts[b0 + j] for j in range(len(chunk))], device=device)
                    sel &= pos >= (first + offs)[:, None]
                weights = sel.float() / sel.float().sum(dim=1, keepdim=True).clamp_min(1.0)
            elif position == "prompt":
                weights = prompt_weights(ids, mask, prefix_ids)
            for i, h in enumerate(captured):
                h = h.float()
                norm_sum[i] += h.norm(dim=-1)[body].double().sum().item()
                if position == "last":
                    picked = h[torch.arange(h.shape[0], device=device), last]
                else:
                    picked = torch.einsum("bt,btd->bd", weights, h)
                if out is None:
                    out = torch.zeros(len(layers), len(texts), h.shape[-1])
                out[i, b0 : b0 + len(chunk)] = picked.cpu()
            norm_count += int(body.sum())
    finally:
        for h in handles:
            h.remove()
    assert out is not None
    return out, (norm_sum / max(norm_count, 1)).float()


def read_directions(
    pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions ``[L, d]`` and mean-difference lengths ``[L]`` from states ``[L, N, d]``.

    ``pca`` needs paired states (the same N on both sides: row i of ``pos`` pairs row i of ``neg``).
    """
    if method not in METHODS:
        raise InvalidOptionError(f"method={method!r} is not one of {list(METHODS)}.")
    diff_mean = pos.mean(dim=1) - neg.mean(dim=1)  # [L, d]
    if method == "mean_diff":
        dirs = diff_mean / diff_mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        if pos.shape[1] != neg.shape[1]:
            raise InvalidOptionError(
                f"pca needs paired states; got {pos.shape[1]} positive and {neg.shape[1]} negative."
            )
        diffs = pos - neg  # [L, N, d]
        _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
        dirs = vh[:, 0, :].float()
        sign = torch.sign((dirs * diff_mean).sum(dim=-1, keepdim=True))
        dirs = dirs * torch.where(sign == 0, torch.ones_like(sign), sign)
    scales = (diff_mean * dirs).sum(dim=-1)
    return dirs.contiguous(), scales.contiguous()


def lda_directions(pos: torch.Tensor, neg: torch.Tensor, shrinkage: float = 0.3) -> torch.Tensor:
    """Unit Fisher discriminant directions ``[L, d]`` from states ``[L, N, d]`` (for detection).

    ``w = (S + shrinkage * tr(S)/d * I)^-1 (mean_pos - mean_neg)`` with the pooled within-class
    covariance ``S`` shrunk toward a scaled identity; the sign makes the positive side score higher.
    A mean difference is the best direction to *move* along; this one is the better *detector*
    (it discounts directions in which both sides vary a lot).
    """
    out = []
    for p, n in zip(pos, neg):
        x = torch.cat([p - p.mean(0), n - n.mean(0)]).double()
        cov = x.T @ x / x.shape[0]
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / d * torch.eye(d, dtype=cov.dtype)
        w = torch.linalg.solve(cov, (p.mean(0) - n.mean(0)).double())
        out.append((w / w.norm().clamp_min(1e-12)).float())
    return torch.stack(out)


def projections(states: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Cosine of each state with its layer's direction: ``[L, N]`` (the conditional score)."""
    return (states * dirs[:, None, :]).sum(-1) / states.norm(dim=-1).clamp_min(1e-12)
