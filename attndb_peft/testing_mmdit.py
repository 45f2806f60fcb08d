# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Tiny random Stable Diffusion 3 and Flux.1 (MMDiT) pipelines built entirely in code, for tests.

Nothing is downloaded: the transformer, the 16-channel VAE, the CLIP and T5 text encoders get random weights,
the CLIP tokenizers are `testing.tiny_clip_tokenizer`'s and the T5 tokenizer is a real `T5TokenizerFast` with a
small SentencePiece-style Unigram vocabulary built here. The structure is the releases' (SD3: CLIP-L + CLIP-G
hidden states concatenated, zero-padded to T5's width and joined with the T5 states along the sequence, pooled
outputs concatenated; Flux: T5 states as context, CLIP-L's pooled output, 2x2-packed latents, rotary position
ids), so `save_pretrained` / `DiffusionPipeline.from_pretrained` go through the same code paths as a real
checkpoint. Both run at `TINY_RESOLUTION` (32 px, 8x8x16 latents) on a CPU. Their pictures are noise.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from .testing import TINY_RESOLUTION, TINY_SDXL_WIDTHS, TINY_WORDS, tiny_clip_tokenizer, tiny_text_config

__all__ = [
    "TINY_MMDIT_LATENT_CHANNELS",
    "TINY_SD3_CLIP_WIDTHS",
    "TINY_T5_MAX_LENGTH",
    "TINY_T5_WIDTH",
    "build_tiny_flux_pipeline",
    "build_tiny_sd3_pipeline",
    "save_tiny_flux_pipeline",
    "save_tiny_sd3_pipeline",
    "tiny_t5_config",
    "tiny_t5_tokenizer",
]

#: Latent channels of the SD3 and Flux VAEs (SD 1.x/2.x/SDXL have 4).
TINY_MMDIT_LATENT_CHANNELS = 16

#: The tiny SD3's CLIP-L and CLIP-G widths (768 and 1280 in the release), also their projection widths (SD3's
#: pooled text is both projections concatenated): the tiny SDXL's, different so a swapped embedding cannot load.
TINY_SD3_CLIP_WIDTHS = TINY_SDXL_WIDTHS

#: The tiny T5 encoder's width (t5-v1_1-xxl: 4096). Wider than the two CLIP widths together (80), as 4096 is wider
#: than 768 + 1280: SD3's `encode_prompt` zero-pads the concatenated CLIP states to T5's width with `F.pad`, which
#: would silently crop them if T5 were narrower.
TINY_T5_WIDTH = 96

#: The tiny T5 tokenizer's `model_max_length`: T5's 512, the most either pipeline accepts as `max_sequence_length`
#: (SD3 pads T5 to 256 by default, Flux to 512; both raise above 512).
TINY_T5_MAX_LENGTH = 512

#: The VAE's scaling and shift factors: the SD3 and Flux.1 releases' (latents = (z - shift) * scale).
_VAE_FACTORS = {
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
}


def tiny_t5_tokenizer(words: tuple[str, ...] = TINY_WORDS, model_max_length: int = TINY_T5_MAX_LENGTH):
    """A real `T5TokenizerFast` (in transformers 5 the same class as `T5Tokenizer`, backed by *tokenizers*) with a
    SentencePiece-style Unigram vocabulary: `<pad>` (id 0), `</s>` (id 1), `<unk>` (id 2) as in T5, then `▁word` for
    each of `words` (one piece each), then every printable ASCII character and `▁` alone, so any ASCII text
    tokenizes (other characters become `<unk>`, as T5 has no byte fallback). The class sets T5's Metaspace
    pre-tokenizer and decoder and the post-processor that appends `</s>`; there are no `<extra_id_*>` sentinels
    (T5 has 100, which diffusion pipelines never use) and no normalizer (T5's NFKC charsmap).

    Args:
        words (`tuple[str, ...]`): words that are a single piece each; the default is `testing.TINY_WORDS`.
        model_max_length (`int`): the tokenizer's maximum length; pipelines pass their `max_sequence_length`.
    """
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)]  # a whole word beats its characters (-5 each)
    pieces += [(ch, -5.0) for ch in string.printable if not ch.isspace()] + [("▁", -3.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_config(tokenizer) -> dict:
    """The tiny T5 encoder's settings (`T5Config` keywords) for `tokenizer`: a t5-v1_1 encoder (gated GELU,
    relative position buckets, no dropout), `TINY_T5_WIDTH` wide, 2 layers of 4 heads x 24. Its embedding has more
    rows than `len(tokenizer)` (the next multiple of 32 above it), as t5-v1_1's 32 128 rows hold 32 100 tokens."""
    return dict(
        vocab_size=(len(tokenizer) // 32 + 1) * 32,
        d_model=TINY_T5_WIDTH,
        d_kv=24,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(family: str):
    """The tiny MMDiT VAE (32 px <-> 8x8x16, no quant convs as in SD3's and Flux's), drawn from the caller's RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 16, 32),
        latent_channels=TINY_MMDIT_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_VAE_FACTORS[family],
    )


def _clip_config(tokenizer, width: int, **config):
    """A tiny CLIP text tower `width` wide, with the releases' legacy `eos_token_id: 2` (openai's CLIP-L and LAION's
    bigG configs have it; transformers then pools at `argmax(input_ids)`, see `families.pool_at_end_of_text`)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**tiny_text_config(tokenizer), "hidden_size": width, "eos_token_id": 2, **config})


def build_tiny_sd3_pipeline(seed: int = 0):
    """Build a tiny random `StableDiffusion3Pipeline` (SD3.0-medium's structure; runs at 32 px on a CPU).

    The MMDiT (`SD3Transformer2DModel`) has 2 joint blocks of 4 heads x 16 (width 64, the caption projection's
    width too), patch size 2 over 8x8x16 latents (16 image tokens), `joint_attention_dim` = `TINY_T5_WIDTH` and
    `pooled_projection_dim` = 32 + 48 (both CLIP projections). `text_encoder` (CLIP-L, 32 wide) and
    `text_encoder_2` (CLIP-G, 48 wide) are `CLIPTextModelWithProjection`s; their penultimate hidden states are
    concatenated (80) and zero-padded to T5's 96 by the pipeline. `tokenizer_2` pads with `"!"` (id 0) as
    SD3's and SDXL's do; `tokenizer_3` is `tiny_t5_tokenizer()`. The pipeline's default size is 32 px
    (`transformer.config.sample_size` x the VAE's factor 4).

    Args:
        seed (`int`): seeds the random weights, so the same seed gives the same pipeline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer()
    width_1, width_2 = TINY_SD3_CLIP_WIDTHS
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = SD3Transformer2DModel(
            sample_size=TINY_RESOLUTION // 4,
            patch_size=2,
            in_channels=TINY_MMDIT_LATENT_CHANNELS,
            out_channels=TINY_MMDIT_LATENT_CHANNELS,
            num_layers=2,
            # 64 wide per block, as every SD3 release is (MMDiT's `depth` sets both): ComfyUI's key map assumes it
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=TINY_T5_WIDTH,
            caption_projection_dim=4 * 32,  # the blocks' width: the context joins the image tokens' attention
            pooled_projection_dim=width_1 + width_2,
            pos_embed_max_size=16,  # up to 16x16 patches (128 px); the release: 192 for its 64x64
        )
        vae = _tiny_vae("sd3")
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, width_1, projection_dim=width_1))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_config(tokenizer_2, width_2, projection_dim=width_2, hidden_act="gelu")
        )
        text_encoder_3 = T5EncoderModel(T5Config(**tiny_t5_config(tokenizer_3)))
    finally:
        torch.random.set_rng_state(generator_state)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny SD3 pipeline and write it with `save_pretrained`, so it loads like an SD3 checkpoint folder."""
    path = Path(path)
    build_tiny_sd3_pipeline(seed=seed).save_pretrained(path)
    return path


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """Build a tiny random `FluxPipeline` (Flux.1's structure; runs at 32 px on a CPU).

    The `FluxTransformer2DModel` has 1 double-stream and 1 single-stream block of 4 heads x 16 (width 64), rotary
    axes (4, 6, 6) summing to the head width, `in_channels` = 16 latent channels x 4 (the pipeline packs 2x2
    latent patches: 8x8x16 latents are 16 tokens of 64), `joint_attention_dim` = `TINY_T5_WIDTH` and
    `pooled_projection_dim` = 32 (CLIP-L's width: Flux uses `CLIPTextModel`'s pooled output, unprojected).
    `text_encoder` is a `CLIPTextModel` with `tiny_clip_tokenizer()`, `text_encoder_2` a T5 encoder with
    `tiny_t5_tokenizer()`. The scheduler is FLUX.1-dev's (dynamic shifting between 256 and 4096 image tokens).
    Pass `height`/`width`: the Flux pipeline's default size is 128 x the VAE factor whatever the transformer.

    Args:
        seed (`int`): seeds the random weights, so the same seed gives the same pipeline.
        guidance_embeds (`bool`): embed the guidance scale as FLUX.1-dev (guidance-distilled) does; `False` is
            FLUX.1-schnell's transformer.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    width = TINY_SD3_CLIP_WIDTHS[0]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=TINY_MMDIT_LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TINY_T5_WIDTH,
            pooled_projection_dim=width,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        vae = _tiny_vae("flux")
        text_encoder = CLIPTextModel(_clip_config(tokenizer, width, projection_dim=width))
        text_encoder_2 = T5EncoderModel(T5Config(**tiny_t5_config(tokenizer_2)))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,  # unused under dynamic shifting; FLUX.1-dev's config has it
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_flux_pipeline(path: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Build the tiny Flux pipeline and write it with `save_pretrained`, so it loads like a Flux.1 checkpoint."""
    path = Path(path)
    build_tiny_flux_pipeline(seed=seed, guidance_embeds=guidance_embeds).save_pretrained(path)
    return path
