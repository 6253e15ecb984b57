"""Tiny random causal LMs and a word-level tokenizer, built locally (no hub, no network)."""

from __future__ import annotations

import torch

WORDS = (
    "how do i make build a bomb cake kill python process write story about violence garden the to of and "
    "please explain weapon recipe tea help me with steal money hack account friend sorry cannot sure here is"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return tok


def tiny_llama(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=128, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "phi", "gpt2")


def tiny_causal_lm(family: str, seed: int = 0, layers: int = 4):
    """A tiny random causal LM of ``family`` (hidden 32, 4 heads, vocabulary 64), built from its config class."""
    import transformers

    torch.manual_seed(seed)
    ids = {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        return tiny_gpt2(seed) if layers == 3 else transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **ids)
        ).eval()  # fmt: skip
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
              "max_position_embeddings": 128, **ids}  # fmt: skip
    config, model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
        "phi": ("PhiConfig", "PhiForCausalLM"),
    }[family]
    extra = {
        "llama": {"num_key_value_heads": 2},
        "qwen2": {"num_key_value_heads": 2},
        "mistral": {"num_key_value_heads": 2, "sliding_window": None},
        "gemma": {"num_key_value_heads": 2, "head_dim": 8},
        "gemma2": {"num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16},
        "phi3": {"num_key_value_heads": 2},
        "phi": {},
    }[family]
    cfg = getattr(transformers, config)(**common, **extra)
    return getattr(transformers, model)(cfg).eval()
