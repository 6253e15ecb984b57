"""The sentence-encoder view of the harmful-request detector: all-MiniLM-L6-v2 embeddings of the request text.

The residual-stream views of a small model (:mod:`safeguard.steering.detector`) miss requests whose harm is
implied rather than named. A sentence encoder trained for semantic similarity carries other information about the
request, so the calibrated ``"both+encoder"`` detector adds one more view: the cosine of the request's MiniLM
embedding with a shrunk Fisher direction read on the same training requests (``condition_encoder``, a
``[1, 384]`` set in the steering vectors).

The guard sees token ids, not text, so the request text is *decoded* from each row's request tokens (the tokens
:func:`~safeguard.steering.reading.prompt_weights` averages: after the chat template's fixed prefix), less the
template's closing text (:func:`chat_suffix`), and calibration embeds exactly the same decoded text
(:func:`chat_request_texts`; for SmolLM2 it equals the raw request on every training prompt). The embedding is the one all-MiniLM-L6-v2 defines: masked mean of the last hidden states, unit norm
(:func:`embed`, also used by the evaluation's refusal judge).

Example:
    >>> enc = SentenceEncoder()  # doctest: +SKIP
    >>> enc.embed(["How do I bake bread?"]).shape  # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ENCODER_SET = "condition_encoder"  # the direction set of the encoder view
MAX_TOKENS = 128  # the encoder's truncation; requests are far shorter


class SentenceEncoder:
    """all-MiniLM-L6-v2 (the embedded text encoder, :func:`safeguard.models.minilm.load_minilm`), loaded on first use."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._model: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from ..models.minilm import load_minilm

            self._model = load_minilm(self.device)
        return self._model

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``[N, 384]`` float32 CPU unit sentence embeddings (masked mean of the last hidden states)."""
        tokenizer, encoder = self._load()
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=MAX_TOKENS).to(self.device)  # fmt: skip
            h = encoder(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


def chat_suffix(adapter: Any) -> str:
    """The text the chat template puts after every user message (end of turn, assistant header), or ``""``."""
    tok = adapter.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        return ""
    marker = "Zq7 request"
    text = adapter.chat_text(marker)
    return text[text.index(marker) + len(marker) :] if marker in text else ""


def request_texts(tokenizer: Any, input_ids: torch.Tensor, weights: torch.Tensor, suffix: str = "") -> list[str]:
    """Each row's request text: its tokens with a nonzero ``prompt_weights`` weight, decoded, less the chat
    template's ``suffix`` (:func:`chat_suffix`) where the row ends with it, whitespace stripped."""
    ids, keep = input_ids.cpu(), weights.cpu() > 0
    out = []
    for b in range(ids.shape[0]):
        text = tokenizer.decode(ids[b][keep[b]].tolist(), skip_special_tokens=False)
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)]
        out.append(text.strip())
    return out


def chat_request_texts(adapter: Any, requests: Sequence[str]) -> list[str]:
    """What the guard decodes for raw ``requests`` sent through the chat template (for calibration)."""
    from .reading import prompt_weights

    tok, prefix, suffix = adapter.tokenizer, adapter.chat_prefix_ids(), chat_suffix(adapter)
    special = not bool(getattr(tok, "chat_template", None))  # as collect_states tokenises
    out = []
    for r in requests:
        ids = torch.tensor([tok(adapter.chat_text(r), add_special_tokens=special)["input_ids"]])
        out += request_texts(tok, ids, prompt_weights(ids, torch.ones_like(ids), prefix), suffix)
    return out
