# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Using a trained concept: load base model + adapter, generate images, and per-token cross-attention maps.

Behind `attndb generate`, `attndb inspect`, the validation samples of `train` and the demo. Adapters are loaded
with `load_attndb` (the same call users make). In prompts, `{}` stands for `TOKEN CATEGORY` (both read from
the adapter's `attndb_config.json`).

Per-token attention maps are the softmax cross-attention probabilities of every prompt token, captured on all
`attn2` layers with `capture_cross_attention`, taken from the text-conditioned half of the classifier-free
guidance batch, averaged over heads, resized to the largest layer's size (the latent grid), averaged over
layers and over all denoising steps -- the aggregation of the AttnDreamBooth / Prompt-to-Prompt figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter_format import AdapterInfo, package_versions, read_adapter_config
from .attention import AttentionStore
from .base_model import BaseModelError, build_pipeline, check_base_model, is_single_file, load_base_models
from .errors import UsageError, arg, first_line
from .families import family_of_pipeline, native_resolution
from .loading import AdapterError, load_attndb
from .visualize import attention_figure

# AdapterInfo and read_adapter_config are the adapter contract's (adapter_format.py), UsageError the error family's
# (errors.py): re-exported here, next to the commands that use them.
__all__ = [
    "AdapterInfo",
    "TokenAttention",
    "UsageError",
    "aggregate_layer_maps",
    "expand_prompt",
    "generate_images",
    "inspect_prompt",
    "load_pipeline",
    "prompt_offset",
    "prompt_tokens",
    "read_adapter_config",
    "resolve_device",
    "sample_guidance",
    "token_attention_maps",
    "write_generation",
]

logger = logging.getLogger(__name__)

#: The placeholder in CLI prompts: `{}` expands to `TOKEN CATEGORY`.
PLACEHOLDER = "{}"


# The name load_pipeline's messages use for `first_line`.


def expand_prompt(prompt: str, token: str | None, category: str | None) -> str:
    """Replace every `{}` in `prompt` by `TOKEN CATEGORY`; `token=None` gives just the category (the prompt
    "without the token" that text alignment is measured against).

    Raises:
        UsageError: the prompt has `{}` but no category is known (no adapter).
    """
    if PLACEHOLDER not in prompt:
        return prompt
    if not category:
        raise UsageError(
            f"{arg('prompt')} {prompt!r} uses '{{}}' but no {arg('adapter')} was given to fill it in; pass "
            f"{arg('adapter')}."
        )
    return prompt.replace(PLACEHOLDER, f"{token} {category}" if token else category)


def resolve_device(device: str | None = None) -> torch.device:
    """`device`, or the best available: CUDA, then Apple MPS, then CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_pipeline(
    model: str | None,
    adapter: str | None = None,
    lora_scale: float = 1.0,
    device: str | None = None,
    dtype: str = "auto",
    revision: str | None = None,
    hub_token: str | None = None,
    model_config: str | None = None,
    safety_checker: bool = True,
):
    """Load a Stable Diffusion pipeline and (optionally) an attndb adapter into it with `load_attndb`.

    Args:
        model (`str`, *optional*): base model (Hub id or local folder); default the adapter's base model.
        adapter (`str`, *optional*): adapter folder or Hub repo id.
        lora_scale (`float`): weight of the adapter's LoRA (`load_attndb(..., weight=lora_scale)`).
        device (`str`, *optional*): e.g. `"cuda"`; default the best available.
        dtype (`str`): `"auto"` (fp16 on CUDA, else fp32), `"fp32"`, `"fp16"` or `"bf16"`.
        revision (`str`, *optional*): Hub revision of the base model.
        hub_token (`str`, *optional*): Hub access token.
        model_config (`str`, *optional*): with a single-file `model` (.safetensors), a diffusers folder or Hub id
            of the same architecture (configs, tokenizer, scheduler).
        safety_checker (`bool`): keep the model's own safety checker, if it has one (SD 1.x ships one).
            `attndb evaluate` turns it off: a false positive returns a black picture, which would enter the
            metrics silently.

    Returns:
        `(StableDiffusionPipeline or StableDiffusionXLPipeline, AdapterInfo | None)`.

    Raises:
        UsageError: the model or adapter cannot be found or loaded.
    """
    info = read_adapter_config(adapter, token=hub_token) if adapter else None
    model = model or (info.base_model if info else None)
    if not model:
        raise UsageError(
            f"{arg('model')} is required (or give {arg('adapter')}, whose attndb_config.json names its base model)."
        )
    target = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.float16 if target.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise UsageError(f"{arg('dtype')} {dtype!r}: choose auto, fp32, fp16 or bf16.")
    try:
        check_base_model(model, revision, model_config=model_config)
    except BaseModelError as exc:
        raise UsageError(str(exc)) from None
    try:
        models = load_base_models(model, revision, model_config, torch_dtype=torch_dtype, token=hub_token)
        # a single file brings no safety checker (as `from_single_file` loads it here)
        checker = safety_checker and not is_single_file(model)
        pipe = build_pipeline(models, safety_checker=checker, token=hub_token)
    except Exception as exc:  # missing folder, bad id, no network: one line that names the argument
        raise UsageError(
            f"{arg('model')} {model}: cannot load a Stable Diffusion pipeline ({first_line(exc)}); give a "
            "diffusers model folder or a Hub id (online, or cached for offline use)."
        ) from None
    pipe = pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    if info is not None:
        try:
            info.token = load_attndb(
                pipe, adapter, weight=lora_scale, **({"hf_token": hub_token} if hub_token else {})
            )
        except AdapterError as exc:
            raise UsageError(f"{arg('adapter')} {adapter}: {exc}") from None
    return pipe, info


def _generators(seed: int, count: int) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on every device.
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def sample_guidance(pipe, guidance: float | None) -> float:
    """`guidance`, or when None the guidance scale of the pipeline's family (`ModelFamily.sample_guidance_scale`:
    SD/SDXL 7.5, SD3 7.0, Flux 3.5)."""
    return family_of_pipeline(pipe).sample_guidance_scale if guidance is None else guidance


def generate_images(
    pipe,
    prompt: str,
    num_images: int = 1,
    seed: int = 0,
    steps: int = 30,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
) -> list:
    """Generate `num_images` images of `prompt`; image `i` starts from the noise of seed `seed + i`. The same
    settings give the same pixels; a run with more images extends the first ones (equal up to the float rounding
    of a different batch size).

    Args:
        pipe: a `StableDiffusionPipeline`.
        prompt (`str`): the prompt, already expanded (see `expand_prompt`).
        num_images (`int`): how many images.
        seed (`int`): seed of the first image.
        steps (`int`): denoising steps.
        guidance (`float`, *optional*): the guidance scale; None: the family's (`sample_guidance`).
        height, width (`int`, *optional*): image size; default the model's.
        negative_prompt (`str`, *optional*): the negative prompt.
        batch_size (`int`): images per pipeline call (memory bound).

    Returns:
        `list[PIL.Image.Image]`.
    """
    guidance = sample_guidance(pipe, guidance)
    images = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        with torch.no_grad():
            out = pipe(
                prompt,
                negative_prompt=negative_prompt,
                num_images_per_prompt=count,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=_generators(seed + start, count),
            )
        images += out.images
    return images


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def write_generation(
    pipe,
    prompts: list[str],
    output_dir: str | os.PathLike,
    num_images: int = 1,
    seed: int = 0,
    steps: int = 30,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    settings: dict[str, Any] | None = None,
) -> list[Path]:
    """Generate every prompt's images into `output_dir` as PNGs and write `generate.json` with the settings and
    each file's prompt and seed. Returns the PNG paths."""
    guidance = sample_guidance(pipe, guidance)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records, paths = [], []
    for p, prompt in enumerate(prompts):
        logger.info("Generating %d image(s) of %r", num_images, prompt)
        images = generate_images(pipe, prompt, num_images, seed, steps, guidance, height, width, negative_prompt)
        for i, image in enumerate(images):
            path = output_dir / f"{p:02d}-{_slug(prompt)}-seed{seed + i}.png"
            image.save(path)
            paths.append(path)
            records.append({"file": path.name, "prompt": prompt, "seed": seed + i})
    info = {
        **(settings or {}),
        "num_images": num_images,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
        "negative_prompt": negative_prompt,
        "scheduler": type(pipe.scheduler).__name__,
        "images": records,
        "versions": package_versions(),
    }
    (output_dir / "generate.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------------ attention maps
def prompt_tokens(tokenizer, prompt: str) -> tuple[list[int], list[str]]:
    """The prompt's token ids between BOS and EOS (truncated like the pipeline does) and each one's text as the
    tokenizer decodes it. Text position `i + 1` holds token `i` (CLIP); a tokenizer without a begin token (T5)
    starts at position 0, see `prompt_offset`."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    body = ids[prompt_offset(tokenizer, ids) : -1]
    return body, [tokenizer.decode([i]).strip() for i in body]


def prompt_offset(tokenizer, ids: list[int]) -> int:
    """The text position of a prompt's first token: 1 after CLIP's begin token, 0 for T5 (which has none)."""
    return int(tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id)


def _layer_grid(pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a U-Net layer's feature map with `pixels` positions: the latent grid halved k times."""
    h, w = latent_hw
    for k in range(8):
        hk, wk = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if hk * wk == pixels:
            return hk, wk
    raise ValueError(f"cannot place an attention map of {pixels} positions on the latent grid {latent_hw}.")


def aggregate_layer_maps(maps: list[torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Average captured maps over heads and layers.

    Args:
        maps (`list[torch.Tensor]`): one `[batch, heads, pixels, tokens]` tensor per layer.
        latent_hw (`tuple[int, int]`): the latent grid; every layer is resized (bilinear) to it.

    Returns:
        `torch.Tensor`: `[batch, tokens, h, w]` in float32.
    """
    resized = []
    for m in maps:
        b, _, pixels, n = m.shape
        h, w = _layer_grid(pixels, latent_hw)
        grid = m.float().mean(1).transpose(1, 2).reshape(b, n, h, w)
        if (h, w) != tuple(latent_hw):
            grid = torch.nn.functional.interpolate(grid, size=latent_hw, mode="bilinear", align_corners=False)
        resized.append(grid)
    return torch.stack(resized).mean(0)


@dataclass
class TokenAttention:
    """A generated image and the aggregated cross-attention map of every prompt token.

    Attributes:
        image: the generated `PIL.Image.Image`.
        prompt: the (expanded) prompt.
        token_ids: the prompt's token ids between BOS and EOS.
        labels: each token's text, as the tokenizer decodes it.
        maps: `[len(labels), h, w]` float32 maps on the latent grid, averaged over heads, layers and steps.
        seed: the seed used.
    """

    image: Any
    prompt: str
    token_ids: list[int]
    labels: list[str]
    maps: np.ndarray
    seed: int


def token_attention_maps(
    pipe,
    prompt: str,
    seed: int = 0,
    steps: int = 30,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> TokenAttention:
    """Generate one image of `prompt` and aggregate the cross-attention map of every prompt token over heads,
    layers (resized to the latent grid) and denoising steps. The original attention processors are restored
    afterwards.
    """
    guidance = sample_guidance(pipe, guidance)
    family = family_of_pipeline(pipe)
    tokenizer = family.components(pipe)[family.attended][0]  # whose positions the attention's text keys are
    token_ids, labels = prompt_tokens(tokenizer, prompt)
    if not token_ids:
        raise UsageError(f"{arg('prompt')} {prompt!r} has no tokens; give a prompt with words.")
    denoiser = getattr(pipe, family.denoiser)
    size = native_resolution(denoiser.config, pipe.vae.config)
    height, width = height or size, width or size
    latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    first = prompt_offset(tokenizer, tokenizer(prompt).input_ids)
    positions = list(range(first, first + len(token_ids)))
    padded = [torch.zeros(1, family.prompt_length(i, t)) for i, (t, _) in enumerate(family.components(pipe))]
    total = torch.zeros(len(token_ids), *latent_hw)
    counted = [0]

    def accumulate(pipeline, step, timestep, callback_kwargs):
        conditional = [m[-1:] for m in store.maps.values()]  # the CFG batch is [unconditional, conditional]
        total.add_(aggregate_layer_maps(conditional, latent_hw)[0].cpu())
        counted[0] += 1
        store.clear()
        return {}

    store = AttentionStore()
    with family.capture(denoiser, positions, store, family.text_length(padded)), torch.no_grad():
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=_generators(seed, 1),
            callback_on_step_end=accumulate,
        ).images[0]
    maps = (total / max(counted[0], 1)).numpy()
    return TokenAttention(image, prompt, token_ids, labels, maps, seed)


def inspect_prompt(
    pipe,
    prompt: str,
    output: str | os.PathLike,
    seed: int = 0,
    steps: int = 30,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: dict[str, Any] | None = None,
) -> TokenAttention:
    """Write the per-token attention figure of `prompt` to `output` (PNG: the image, then one labelled map per
    token) and, next to it, a JSON file with the tokens, the per-token attention mass and the settings.

    Returns:
        `TokenAttention`: the image, labels and maps.
    """
    guidance = sample_guidance(pipe, guidance)
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise UsageError(f"{arg('output')} {output}: the figure is a PNG; give a path ending in .png.")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = token_attention_maps(pipe, prompt, seed, steps, guidance, height, width)
    attention_figure(result.image, result.maps, result.labels, title=prompt).save(output)
    record = {
        **(settings or {}),
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "tokens": [
            {"position": i + 1, "id": int(t), "text": label, "mean_attention": float(result.maps[i].mean())}
            for i, (t, label) in enumerate(zip(result.token_ids, result.labels))
        ],
        "figure": output.name,
    }
    output.with_suffix(".json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return result
