# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The world's base model: a small Stable Diffusion pipeline built from the real diffusers/transformers classes
and shipped with the package (`SHIPPED_DIR`, pretrained by `pretrain.pretrain`).

This module defines the model and how it is stored and loaded: `build_world_pipeline` (the architecture, fresh
weights), `save_pipeline` (the shipped storage: fp16 U-Net and VAE), `load_world_pipeline`, `write_base` (the
shipped model as a folder any `--model` flag takes), plus the attndb settings that suit it (`BASE_SETTINGS`,
`world_config`, `textual_inversion_config`) and its tokenizer (`world_tokenizer`). Training it from scratch lives
in `pretrain`, which imports this module (never the other way round).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .. import AttnDBConfig
from ..testing import tiny_clip_tokenizer
from . import scenes as W

__all__ = [
    "BASE_SETTINGS",
    "MAX_TEXT_LENGTH",
    "SHIPPED_DIR",
    "TEXTUAL_INVERSION_LEARNING_RATE",
    "WorldArchitecture",
    "build_world_pipeline",
    "load_world_pipeline",
    "save_pipeline",
    "textual_inversion_config",
    "world_config",
    "world_tokenizer",
    "write_base",
]

#: Where the shipped, pretrained base model lives (a diffusers folder inside the package).
SHIPPED_DIR = Path(__file__).parent / "base_model"

#: Training settings that suit the world's base model (the demo's; `attndb world base` writes them as
#: `attndb.yaml` next to the model for `attndb train --config`). Stage lambdas are the paper's (the defaults).
BASE_SETTINGS: dict = {
    "resolution": W.SIZE,
    "batch_size": 4,
    "stage1": {"steps": 60, "learning_rate": 5e-3},
    # stage 2/3 rates from a first look on tuning concept 900 (1 seed, 6 prompts): 1e-3/5e-4 gave identity 0.23
    # but text alignment 0.64 (the concept took over the background); 2e-4/1e-4 gave 0.10 and 0.81. Unsettled:
    # benchmarks/world_quality.py --sweep is the tool.
    "stage2": {"steps": 100, "learning_rate": 2e-4, "rank": 8},
    "stage3": {"steps": 200, "learning_rate": 1e-4, "rank": 8},
    "save_dtype": "fp32",
    "validation_prompts": [
        "a photo of a {}",
        "a photo of a {} on the beach",
        "a painting of a {} in the snow",
        "a photo of a purple {} by a brick wall",
    ],
    "validation_guidance_scale": 5.0,
    "validation_inference_steps": 25,
    "validation_images": 2,
    "log_every": 20,
}
#: Textual Inversion in the world: the one-vector embedding alone, no regularizer, at this learning rate.
TEXTUAL_INVERSION_LEARNING_RATE = 5e-3

#: The text encoder's context length: the longest world caption with a concept token is 13 tokens with start and
#: end, so 16 leaves room without padding every prompt to CLIP's 77.
MAX_TEXT_LENGTH = 16


@dataclass(frozen=True)
class WorldArchitecture:
    """The sizes `build_world_pipeline` builds; the defaults are the shipped model's. `pretrain.PretrainConfig`
    carries the same four fields (its defaults are these), so either can be passed where an architecture is asked.

    Args:
        unet_width (`int`): the U-Net's first block width (the second is twice it).
        unet_layers_per_block (`int`): ResNet + transformer layers in each U-Net down block (up blocks get one
            more, as in diffusers).
        text_width (`int`): the CLIP text encoder's hidden size, which is also the U-Net's cross-attention width.
        text_layers (`int`): the CLIP text encoder's transformer layers.
    """

    unet_width: int = 64
    unet_layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 3



def world_config(**overrides):
    """An `AttnDBConfig` with the world recipe (`BASE_SETTINGS`); `overrides` (model, images, category, output,
    ...) win."""
    return AttnDBConfig.from_dict({**BASE_SETTINGS, **overrides}, source="world recipe")


def textual_inversion_config(steps: int, **overrides):
    """Textual Inversion as attndb's stage 1 alone: `steps` steps on the embedding, no regularizer, no LoRA."""
    settings = {
        **BASE_SETTINGS,
        "stage1": {
            "steps": steps,
            "learning_rate": TEXTUAL_INVERSION_LEARNING_RATE,
            "lambda_mu": 0.0,
            "lambda_var": 0.0,
        },
        "stage2": {"steps": 0},
        "stage3": {"steps": 0},
    }
    return world_config(**{**settings, **overrides})


def world_tokenizer():
    """A real `CLIPTokenizer` in which every world word is one token (max length 16)."""
    return tiny_clip_tokenizer(W.WORLD_WORDS, model_max_length=MAX_TEXT_LENGTH)


def _pipeline_class():
    """`diffusers.StableDiffusionPipeline`, looked up when a pipeline is built: importing it makes transformers
    load its image processors (and warn where torchvision is missing), which every `attndb` command would pay
    for, since the CLI imports this module."""
    return diffusers.StableDiffusionPipeline


def build_world_pipeline(config: WorldArchitecture | None = None, seed: int = 0):
    """The base model's architecture with fresh random weights (a `StableDiffusionPipeline`).

    U-Net: 16x16x4 latents, block widths (w, 2w), cross-attention at 16x16 and 8x8 (7 `attn2` layers), context
    width = the text encoder's. VAE: 32 px <-> 16x16x4. Text: CLIP, causal, `text_layers` x `text_width`.
    Scheduler: DDIM, v-prediction, zero terminal SNR, trailing timesteps.

    Args:
        config (`WorldArchitecture`, *optional*): the sizes; a `pretrain.PretrainConfig` works too (it has the same
            four fields). Default: the shipped model's.
        seed (`int`): seeds the weights; torch's global random state is restored afterwards.

    Returns:
        `StableDiffusionPipeline`: on the CPU, in fp32, without a safety checker.
    """
    config = config or WorldArchitecture()
    tokenizer = world_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        w = config.unet_width
        unet = UNet2DConditionModel(
            sample_size=W.SIZE // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(w, 2 * w),
            layers_per_block=config.unet_layers_per_block,
            attention_head_dim=(4, 8),
            cross_attention_dim=config.text_width,
            use_linear_projection=True,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=W.SIZE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.text_width,
                intermediate_size=2 * config.text_width,
                num_attention_heads=4,
                num_hidden_layers=config.text_layers,
                max_position_embeddings=MAX_TEXT_LENGTH,
                projection_dim=config.text_width,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    finally:
        torch.random.set_rng_state(state)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # unused with trailing spacing; diffusers warns without it
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    return _pipeline_class()(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        # a world picture has nothing for SD's safety checker to look at (and no checker weights ship)
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe, path: str | os.PathLike) -> Path:
    """Write `pipe` as the package ships it: U-Net and VAE stored in fp16 (half the size; diffusers loads them
    back in fp32), the small text encoder in fp32. Atomic: assembled under a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.unet.half()
    pipe.vae.half()
    try:
        pipe.save_pretrained(str(tmp))
    finally:
        pipe.unet.float()
        pipe.vae.float()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def load_world_pipeline(path: str | os.PathLike | None = None, device: str = "cpu"):
    """The pretrained world base model (the shipped one unless `path` names another pipeline folder)."""
    path = Path(path) if path is not None else SHIPPED_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path}: no world base model here (model_index.json missing); run `attndb world pretrain --output DIR` "
            "and pass DIR/pipeline, or reinstall attndb_peft to get the shipped one."
        )
    pipe = _pipeline_class().from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def write_base(output: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write the shipped base model as a diffusers folder any `--model` flag takes, with `attndb.yaml` (training
    settings that suit it) next to it. Refuses a non-empty folder."""
    output = Path(output)
    source = Path(source) if source is not None else SHIPPED_DIR
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output}: exists and is not an empty folder; choose a new path.")
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{source}: the world base model is missing (model_index.json); reinstall attndb_peft."
        )
    tmp = output.with_name(f".tmp-{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__"))
    settings = {"model": str(output.resolve()), **BASE_SETTINGS}
    (tmp / "attndb.yaml").write_text(
        "# attndb train settings that suit the toy world's base model (`attndb train --config` this file)\n"
        + yaml.safe_dump(settings, sort_keys=False),
        encoding="utf-8",
    )
    if output.exists():
        output.rmdir()
    os.replace(tmp, output)
    return output
