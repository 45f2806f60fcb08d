# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb demo`: the whole job on the built-in offline default, in about a minute on 2 CPU cores.

1. builds the tiny random Stable Diffusion pipeline of `attndb_peft.testing` and saves it like any checkpoint;
2. writes a few procedurally generated instance images (a striped ball);
3. trains the three stages on them (with validation grids and attention figures after every stage);
4. exports the adapter, loads it back into a fresh pipeline with `pipe.load_attndb`;
5. writes a sample grid and the per-token attention figure with the reloaded adapter, and prints where
   everything is.

Nothing is downloaded. The pictures are noise (the weights are random); the flow is the real one, so the demo
checks an installation and shows what a run writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEMO_STEPS", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

#: Steps of stages 1, 2, 3 in the demo (the paper's are 60, 100, 500 at batch 8 on real photos).
DEMO_STEPS = (30, 30, 30)
#: Learning rates that visibly move the tiny random model in a few dozen steps (not for real models).
DEMO_LEARNING_RATES = (5e-2, 1e-2, 1e-2)
_MARKER = ".attndb-demo"
_PARTS = ("base-model", "instance-images", "adapter", "reloaded")


@dataclass
class DemoResult:
    """Where the demo put things."""

    output_dir: Path
    base_model: Path
    instance_images: Path
    adapter: Path
    token: str
    samples: Path
    attention: Path
    seconds: float = 0.0
    training_samples: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """The lines `attndb demo` prints."""
        return "\n".join(
            [
                f"attndb demo finished in {self.seconds:.0f} s; everything is under {self.output_dir}:",
                f"  base model (tiny random SD, built in code)   {self.base_model}",
                f"  instance images (procedural)                 {self.instance_images}",
                f"  adapter (load with pipe.load_attndb)         {self.adapter}",
                f"  model card                                   {self.adapter / 'README.md'}",
                f"  samples + attention maps after each stage    {self.adapter / 'samples'}",
                f"  reloaded adapter: sample grid                {self.samples}",
                f"  reloaded adapter: per-token attention maps   {self.attention}",
                "The pictures are noise (random weights); the flow is the real one. Try next:",
                f'  attndb generate --model {self.base_model} --adapter {self.adapter} --prompt "a photo of a {{}} '
                f'on the beach" --num-images 2 --output {self.output_dir / "generated"}',
                f'  attndb inspect --model {self.base_model} --adapter {self.adapter} --prompt "a photo of a {{}} '
                f'in the jungle" --output {self.output_dir / "attn.png"}',
            ]
        )


def _prepare(output: Path) -> None:
    """Use an empty or new folder, or replace an earlier demo's output; refuse anything else."""
    from .inference import UsageError

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: exists and is not a folder; choose another path.")
    if output.is_dir() and any(output.iterdir()):
        if not (output / _MARKER).is_file():
            raise UsageError(
                f"--output {output}: folder is not empty and holds no earlier demo; choose a new or empty folder."
            )
        for part in _PARTS:
            shutil.rmtree(output / part, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / _MARKER).write_text("written by attndb demo; a new demo run replaces this folder's content\n")


def run_demo(
    output: str | os.PathLike = "attndb-demo",
    steps: tuple[int, int, int] = DEMO_STEPS,
    seed: int = 0,
    inference_steps: int = 10,
) -> DemoResult:
    """Run the offline demo (see the module docstring).

    Args:
        output: the demo's folder; must be new, empty, or an earlier demo's (which is replaced).
        steps (`tuple[int, int, int]`): training steps of stages 1, 2, 3.
        seed (`int`): seed of the tiny model, the images, training and sampling.
        inference_steps (`int`): denoising steps of the sample and attention pictures.

    Returns:
        `DemoResult`: the paths written.
    """
    import torch

    started = time.perf_counter()
    output = Path(output)
    _prepare(output)
    # The tiny model's operations are far too small to split across threads: on a busy 2-core machine, torch's
    # default intra-op threads spin against each other and the demo ran ~10x slower than on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(output, steps, seed, inference_steps, started)
    finally:
        torch.set_num_threads(threads)


def _run(output: Path, steps, seed: int, inference_steps: int, started: float) -> DemoResult:
    from diffusers import StableDiffusionPipeline

    from .config import DEFAULT_VALIDATION_PROMPTS, AttnDBConfig
    from .inference import expand_prompt, generate_images, inspect_prompt
    from .testing import TINY_RESOLUTION, make_instance_images, save_tiny_pipeline
    from .trainer import Trainer
    from .visualize import image_grid

    base_model = output / "base-model"
    images = output / "instance-images"
    adapter = output / "adapter"
    reloaded = output / "reloaded"

    logger.info("Building the tiny random pipeline in %s", base_model)
    save_tiny_pipeline(base_model, seed=seed)
    make_instance_images(images, num_images=4, size=48, seed=seed)
    config = AttnDBConfig(
        model=str(base_model),
        images=str(images),
        category="toy",
        output=str(adapter),
        resolution=TINY_RESOLUTION,
        batch_size=2,
        seed=seed,
        save_dtype="fp32",
        log_every=5,
        validation_inference_steps=inference_steps,
    ).with_stage_values(steps=steps, learning_rates=DEMO_LEARNING_RATES)
    result = Trainer(config).run()

    logger.info("Loading the adapter back into a fresh pipeline with pipe.load_attndb")
    pipe = StableDiffusionPipeline.from_pretrained(str(base_model))
    pipe.set_progress_bar_config(disable=True)
    token = pipe.load_attndb(str(adapter))  # registered on StableDiffusionPipeline by `import attndb_peft`
    reloaded.mkdir(parents=True, exist_ok=True)
    prompts = [expand_prompt(p, token, config.category) for p in DEFAULT_VALIDATION_PROMPTS]
    rows = [generate_images(pipe, p, num_images=2, seed=seed, steps=inference_steps) for p in prompts]
    samples = reloaded / "samples.png"
    image_grid(rows, row_labels=prompts, column_labels=[f"seed {seed + j}" for j in range(2)]).save(samples)
    attention = reloaded / "attention.png"
    jungle = expand_prompt("a photo of a {} in the jungle", token, config.category)
    inspect_prompt(pipe, jungle, attention, seed=seed, steps=inference_steps)
    return DemoResult(
        output_dir=output,
        base_model=base_model,
        instance_images=images,
        adapter=adapter,
        token=token,
        samples=samples,
        attention=attention,
        seconds=time.perf_counter() - started,
        training_samples=result.sample_files,
    )
