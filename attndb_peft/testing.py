# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Tiny random Stable Diffusion (SD 2.x-like and SDXL) pipelines built entirely in code, for tests and `attndb demo`.

Nothing is downloaded: the U-Net, VAE and CLIP text encoder get random weights and the CLIP tokenizer gets
a small byte-level BPE vocabulary built here. The architecture keeps everything the method touches
(several cross-attention layers at different resolutions, linear projections like SD 2.x, a real
`CLIPTokenizer`), so saving it with `save_pretrained` and reading it back with `from_pretrained` exercises
the same code paths as a real checkpoint. Its pictures are noise; the flow is real.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch

from .families import SD

__all__ = [
    "TINY_PRETRAIN_SETTINGS",
    "TINY_RESOLUTION",
    "TINY_SDXL_WIDTHS",
    "TINY_WORDS",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "ldm_state_dict",
    "make_instance_images",
    "save_tiny_pipeline",
    "save_tiny_sdxl_pipeline",
    "save_tiny_single_file",
    "tiny_clip_tokenizer",
    "tiny_text_config",
]

#: `world.pretrain.PretrainConfig` overrides for a world pretraining run of seconds on a CPU (tiny models, 4 U-Net
#: steps; the scores mean nothing): the tests' runs and `benchmarks/world_pretrain_sweep.py --tiny`.
TINY_PRETRAIN_SETTINGS = dict(
    steps=4, batch_size=4, num_images=24, vae_steps=2, vae_images=16, vae_batch_size=4, checkpoint_every=2,
    threads=1, unet_width=32, text_width=32, text_layers=1,
)

#: Image size the tiny pipeline is meant to run at (the VAE downsamples by 4, the U-Net sees 8x8 latents).
TINY_RESOLUTION = 32

#: Words that tokenize to a single token in the tiny vocabulary (others fall back to characters).
TINY_WORDS = (
    "a photo of the in on with and by dog cat toy teddy bear robot sculpture jungle beach snow city forest "
    "red blue green yellow purple painting style watercolor sketch oil van gogh wearing hat sunglasses "
    "swimming pool eiffel tower night cyberpunk pixel art"
).split()


def _bytes_to_unicode() -> list[str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_clip_tokenizer(
    words: tuple[str, ...] = TINY_WORDS,
    model_max_length: int = 77,
    vocab_size: int | None = None,
    pad_token: str = "<|endoftext|>",
):
    """A real `CLIPTokenizer` with a byte-level BPE vocabulary: every byte, every byte at a word end, and
    merges that make each of `words` a single token. `vocab_size` pads the vocabulary with placeholder entries
    that no merge produces, so it fits a text encoder with a real-size embedding matrix (CLIP's is 49 408).
    `pad_token`: CLIP's tokenizer pads with end-of-text, SDXL's `tokenizer_2` with `"!"` (id 0)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _bytes_to_unicode():
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1], *symbols[2:]]
    while vocab_size is not None and len(vocab) < vocab_size - 2:  # the two specials stay last, as in CLIP
        vocab[f"<|placeholder{len(vocab)}|>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)


def tiny_text_config(tokenizer) -> dict:
    """The tiny CLIP text tower's settings (`CLIPTextConfig` keywords) for `tokenizer`: the pipeline's text
    encoder, and the text side of tiny CLIP models in tests."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(**config):
    """The tiny pipelines' AutoencoderKL (32 px <-> 8x8x4), drawn from the caller's seeded RNG; `config` adds to it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        **config,
    )


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """Build a tiny random `StableDiffusionPipeline` (about 0.5 M parameters, runs at 32 px on a CPU).

    Args:
        seed (`int`): seeds the random weights, so the same seed gives the same pipeline.
        prediction_type (`str`): `"epsilon"` (SD 1.x / 2.x-base) or `"v_prediction"` (SD 2.x-768).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
            use_linear_projection=True,
            norm_num_groups=16,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(tokenizer), projection_dim=32))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        **SD.no_safety_checker(),
    )


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build the tiny pipeline and write it with `save_pretrained`, so it loads like any checkpoint folder."""
    path = Path(path)
    build_tiny_pipeline(seed=seed, prediction_type=prediction_type).save_pretrained(path)
    return path


#: The tiny SDXL's text-encoder widths (CLIP-L and OpenCLIP-bigG are 768 and 1280): different, so a swapped
#: `clip_l`/`clip_g` embedding cannot load silently.
TINY_SDXL_WIDTHS = (32, 48)


def build_tiny_sdxl_pipeline(seed: int = 0):
    """Build a tiny random `StableDiffusionXLPipeline` (runs at 32 px on a CPU) with SDXL's structure: a first
    down block without attention, `addition_embed_type="text_time"` (pooled text embeds + 6 size numbers), two
    text encoders (`CLIPTextModel` and `CLIPTextModelWithProjection`) whose penultimate hidden states are
    concatenated into the U-Net's context, and two tokenizers with one vocabulary, the second padding with `"!"`
    (id 0) as SDXL's `tokenizer_2` does. `text_encoder_2` keeps the SDXL release's legacy `eos_token_id: 2`, under
    which transformers pools at the highest id (see `families.pool_at_end_of_text`).

    Args:
        seed (`int`): seeds the random weights, so the same seed gives the same pipeline.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    width_1, width_2 = TINY_SDXL_WIDTHS
    projection_dim, time_dim = 32, 8
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=width_1 + width_2,
            use_linear_projection=True,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        )
        vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE
        config_1 = {**tiny_text_config(tokenizer), "hidden_size": width_1}
        text_encoder = CLIPTextModel(CLIPTextConfig(**config_1, projection_dim=projection_dim))
        config_2 = {**tiny_text_config(tokenizer_2), "hidden_size": width_2, "eos_token_id": 2}
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config_2, projection_dim=projection_dim))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_sdxl_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny SDXL pipeline and write it with `save_pretrained`, so it loads like an SDXL checkpoint folder."""
    path = Path(path)
    build_tiny_sdxl_pipeline(seed=seed).save_pretrained(path)
    return path


def make_instance_images(
    folder: str | os.PathLike, num_images: int = 4, size: int = 48, seed: int = 0, fmt: str = "png"
) -> list[Path]:
    """Write `num_images` procedurally generated pictures of one "subject" (a striped ball on a coloured
    background, seen at different positions and scales), standing in for a user's photos."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(num_images):
        hue = rng.randrange(256)
        image = Image.new("RGB", (size, size), (hue, 200 - hue // 2, 120))
        draw = ImageDraw.Draw(image)
        radius = size * rng.uniform(0.25, 0.35)
        cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(230, 60, 40))
        for k in range(-2, 3):  # the subject's "identity": white stripes
            y = cy + k * radius / 3
            half = math.sqrt(max(radius**2 - (y - cy) ** 2, 0.0))
            draw.line([cx - half, y, cx + half, y], fill=(250, 250, 250), width=max(1, size // 32))
        path = folder / f"instance_{i:02d}.{fmt}"
        image.save(path)
        paths.append(path)
    return paths


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original Stable Diffusion (LDM) single-file layout: `model.diffusion_model.*`
    (U-Net), `first_stage_model.*` (VAE) and `cond_stage_model.transformer.text_model.*` (an SD 1.x CLIP text
    encoder; the tiny encoder is CLIP-shaped). For an SDXL pipeline, the layout of Stability's SDXL files: the
    U-Net's size embedding as `label_emb.0.*`, `conditioner.embedders.0.transformer.text_model.*` (CLIP-L) and
    `conditioner.embedders.1.model.*` (the second encoder in OpenCLIP's names: fused `in_proj` attention,
    `resblocks`, a transposed `text_projection`).

    The inverse of diffusers' own single-file conversion (`convert_ldm_unet_checkpoint`,
    `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` in
    `diffusers.loaders.single_file_utils`), written for any layer count so the tiny pipelines can be saved as
    single files. Only U-Nets whose down/up blocks are all of one kind per block (resnets, optional attentions,
    one down/upsampler) are covered, which is every SD 1.x/2.x and SDXL U-Net.
    """
    unet, vae = pipe.unet, pipe.vae
    state: dict[str, torch.Tensor] = {}
    layers = unet.config.layers_per_block

    def resnet(key: str) -> str:  # a resnet's inner names (`key` without its block prefix)
        key = f".{key}."
        for new, old in (
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("time_emb_proj", "emb_layers.1"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
            ("conv_shortcut", "skip_connection"),
        ):
            key = key.replace(f".{new}.", f".{old}.")
        return key[1:-1]

    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text and size embedding
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        module = ".".join(parts[:-1])
        if module in fixed:
            new = f"{fixed[module]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
            else:
                position = block * (layers + 1) + index + 1
                new = (
                    f"input_blocks.{position}.0.{resnet(rest)}"
                    if kind == "resnets"
                    else f"input_blocks.{position}.1.{rest}"
                )
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * index}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":
                has_attention = hasattr(unet.up_blocks[block], "attentions")
                new = f"output_blocks.{block * (layers + 1) + layers}.{2 if has_attention else 1}.{rest}"
            else:
                position = block * (layers + 1) + index
                new = (
                    f"output_blocks.{position}.0.{resnet(rest)}"
                    if kind == "resnets"
                    else f"output_blocks.{position}.1.{rest}"
                )
        else:
            raise ValueError(f"no single-file name for U-Net weight {key}")
        state["model.diffusion_model." + new] = value

    num_up = len(vae.config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in vae.state_dict().items():
        new = key
        if ".down_blocks." in key:
            _, _, block, kind, rest = key.split(".", 4)
            new = (
                f"encoder.down.{block}.downsample.{rest.removeprefix('0.')}"
                if kind == "downsamplers"
                else f"encoder.down.{block}.block.{rest}"
            )
        elif ".up_blocks." in key:
            _, _, block, kind, rest = key.split(".", 4)
            ldm_block = num_up - 1 - int(block)
            new = (
                f"decoder.up.{ldm_block}.upsample.{rest.removeprefix('0.')}"
                if kind == "upsamplers"
                else f"decoder.up.{ldm_block}.block.{rest}"
            )
        elif ".mid_block.resnets." in key:
            side, _, _, index, rest = key.split(".", 4)
            new = f"{side}.mid.block_{int(index) + 1}.{rest}"
        elif ".mid_block.attentions.0." in key:
            side, rest = key.split(".", 1)[0], key.split(".mid_block.attentions.0.", 1)[1]
            module, name = rest.rsplit(".", 1)
            new = f"{side}.mid.attn_1.{attention[module]}.{name}"
            if name == "weight" and value.ndim == 2:  # LDM keeps these as 1x1 convolutions
                value = value[:, :, None, None]
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        state["first_stage_model." + new] = value

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key  # transformers >= 5.6 flattened it
        state[prefix + key] = value
    if sdxl:
        state.update(_open_clip_state_dict(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in state.items()}


def _open_clip_state_dict(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection`'s weights in OpenCLIP's names (SDXL's second encoder in its single files)."""
    weights = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    state = {
        "token_embedding.weight": weights["embeddings.token_embedding.weight"],
        "positional_embedding": weights["embeddings.position_embedding.weight"],
        "ln_final.weight": weights["final_layer_norm.weight"],
        "ln_final.bias": weights["final_layer_norm.bias"],
        "text_projection": weights["text_projection.weight"].T,
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [weights[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            state[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for old, new in names.items():
                state[f"{block}{new}.{kind}"] = weights[f"{layer}{old}.{kind}"]
    return {prefix + k: v for k, v in state.items()}


def save_tiny_single_file(path: str | os.PathLike, seed: int = 0, sdxl: bool = False) -> Path:
    """Build the tiny pipeline (the tiny SDXL one with `sdxl`) and write it as one `.safetensors` file in the
    original layout (what A1111/ComfyUI users hold); it loads with diffusers' `from_single_file` given the tiny
    pipeline's folder as `config` (see `save_tiny_pipeline`/`save_tiny_sdxl_pipeline`, same `seed`, same weights)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_sdxl_pipeline(seed=seed) if sdxl else build_tiny_pipeline(seed=seed)
    save_file(ldm_state_dict(pipe), str(path))
    return path
