# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Shared bits of the examples: the offline tiny setup used when no `--model` is given, and image saving.

The tiny pipeline (random weights, 32 px, built in code by `attndb_peft.testing`) makes every example run in
seconds on a CPU without network access. Its pictures are noise; the calls are exactly those you make with a
real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attndb_peft import AttnDBConfig, train
from attndb_peft.adapter_format import LORA_NAME
from attndb_peft.testing import TINY_RESOLUTION, make_instance_images, save_tiny_pipeline


def tiny_model(workdir: Path) -> str:
    """Write the tiny random Stable Diffusion pipeline once under `workdir`; returns its folder."""
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    path = workdir / "tiny-sd"
    if not (path / "model_index.json").is_file():
        save_tiny_pipeline(path)
    return str(path)


def tiny_concept(workdir: Path, model: str, name: str, seed: int = 0, token: str | None = None) -> Path:
    """Train a tiny concept from procedurally generated "photos" (a few steps per stage); returns its folder."""
    output = workdir / name
    if (output / LORA_NAME).is_file():
        return output
    images = make_instance_images(workdir / f"{name}-photos", num_images=4, size=48, seed=seed)[0].parent
    config = AttnDBConfig(
        model=model,
        images=str(images),
        category="dog",
        output=str(output),
        token=token,
        resolution=TINY_RESOLUTION,
        batch_size=2,
        seed=seed,
        validation_prompts=(),
        overwrite=True,
    ).with_stage_values(steps=(3, 3, 3), learning_rates=(5e-2, 1e-2, 1e-2))
    return train(config)


def generation_kwargs(tiny: bool, seed: int = 0) -> dict:
    """Arguments for `pipe(...)`: few steps at 32 px for the tiny pipeline, 30 steps otherwise."""
    kwargs = {"generator": torch.Generator().manual_seed(seed), "num_inference_steps": 30}
    if tiny:
        kwargs.update(num_inference_steps=3, height=TINY_RESOLUTION, width=TINY_RESOLUTION)
    return kwargs


def load_pipeline(model: str, tiny: bool):
    from diffusers import StableDiffusionPipeline

    if tiny:
        pipe = StableDiffusionPipeline.from_pretrained(model)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=tiny)
    return pipe
