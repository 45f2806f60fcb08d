# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What a training run shows while and after it runs: validation sample grids and attention figures under
`OUT/samples/`, experiment trackers (TensorBoard / Weights & Biases through accelerate) and the run summary.

The trainer calls these in a few lines; everything else lives here so the training loop stays readable.

Files under `OUT/samples/`:

| file | when, what |
|---|---|
| `stage{S}-step{K}.png` | every `validation_steps` steps and at each stage end: a row per prompt, a column per seed |
| `stage{S}-attention.png` | each stage end: the first validation prompt's image and per-token attention maps |
| `final-{i}.png` | end of stage 3: prompt `i`'s row of the last grid (what the model card shows) |
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import arg
from .inference import expand_prompt, generate_images, token_attention_maps
from .stages import STAGE_NAMES
from .visualize import attention_figure, image_grid

__all__ = [
    "SAMPLES_DIR",
    "SampleSource",
    "check_report_to",
    "format_run_summary",
    "global_step",
    "memory_check",
    "peak_memory",
    "sample_settings",
    "sampling_pipeline",
    "tracker_config",
    "trackers_for",
    "write_validation_samples",
]

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


def check_report_to(report_to: str | None) -> str | None:
    """The problem with `--report-to` (an unknown tracker, or its package not installed), or None."""
    if not report_to:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to not in available:
        return f"{arg('report_to')} {report_to!r}: choose one of {', '.join(available)}."
    if not available[report_to]():
        return (
            f"{arg('report_to')} {report_to}: the {report_to} package is not installed; run pip install "
            f"{report_to} (or pip install 'attndb_peft[{report_to}]'), or leave out {arg('report_to')}."
        )
    return None


def trackers_for(report_to: str | None) -> list | None:
    """What `Accelerator(log_with=...)` gets for `--report-to` (None: no tracker)."""
    return [report_to] if report_to else None


def tracker_config(config) -> dict[str, Any]:
    """The run's settings flattened to scalars (`stage2.learning_rate`, ...): TensorBoard's hparams accept only
    int, float, str and bool values."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = " | ".join(map(str, value))
        elif value is None:
            flat[prefix] = "none"
        else:
            flat[prefix] = value

    add("", config.to_dict())
    return flat


def global_step(config, stage: int, step: int) -> int:
    """The trackers' step axis, which runs on across stages: `step` of `stage` after the earlier stages' steps."""
    return sum(s.steps for s in config.stages[: stage - 1]) + step


def peak_memory(device: torch.device) -> str:
    """Peak memory of the run: GPU memory allocated by torch on CUDA, else the process's peak resident size."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (torch.cuda.max_memory_allocated)"
    try:
        import resource
    except ImportError:  # Windows
        return "n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return f"{peak_bytes / 2**30:.2f} GiB (peak resident memory of the process)"


def memory_check(stage: int, measured_gib: float, predicted_gib: float | None) -> str:
    """The line a run logs at a stage's end on a GPU: the measured peak next to the predicted one."""
    line = f"stage {stage}: peak GPU memory {measured_gib:.2f} GiB (torch.cuda.max_memory_allocated)"
    if predicted_gib:
        error = 100 * (predicted_gib - measured_gib) / measured_gib
        line += f", predicted {predicted_gib:.2f} GiB ({error:+.1f} %)"
    return line


def format_run_summary(result, stage_names: dict[int, str], device: torch.device) -> str:
    """A few lines for the end of `train`: time per stage, time spent on samples, peak memory, files written."""
    out = Path(result.output_dir)
    lines = [f"Run summary ({out}):"]
    if result.batch:
        lines.append(f"  batch: {result.batch}")
    for stage, seconds in sorted(result.stage_seconds.items()):
        lines.append(f"  stage {stage} {stage_names.get(stage, '')}: {seconds:.1f} s")
    if result.sample_files:
        lines.append(f"  validation samples: {result.validation_seconds:.1f} s, {len(result.sample_files)} picture(s)")
    scores = getattr(result, "scores", None)
    if scores is not None:
        chosen = f", adapter from {result.selected} (select auto)" if getattr(result, "selected", None) else ""
        lines.append(f"  checkpoint scores: {scores.seconds:.1f} s (within the stage times), {len(scores.records)} "
                     f"checkpoint(s){chosen}")
    memory = getattr(result, "memory", None)
    if memory is not None and memory.measured:  # a GPU run: each stage's peak, next to the prediction
        for stage, measured in sorted(memory.measured.items()):
            lines.append(f"  {memory_check(stage, measured, memory.predicted.get(stage))}")
    else:
        lines.append(f"  peak memory: {peak_memory(device)}")
    lines.append("  files written:")
    for path in [*result.files, *result.sample_files]:
        lines.append(f"    {_relative(Path(path), out)}")
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        lines.append(f"    checkpoints/ ({len([p for p in checkpoints.iterdir() if p.is_dir()])} checkpoint(s))")
    return "\n".join(lines)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _eager(compiled: bool):
    """Run compiled modules eagerly inside the block (torch >= 2.6; a no-op for an uncompiled run)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if compiled and set_stance is not None else nullcontext()


@dataclass
class SampleSource:
    """What sampling during training reads: the run's settings and the models being trained.

    Attributes:
        config (`AttnDBConfig`): the run's settings (prompts, seeds, resolution, `compile`).
        output_dir (`Path`): the run's output folder (pictures go to its `samples/`).
        unet: the U-Net being trained.
        frozen (`list`): the frozen models sampling runs (VAE and text encoders); they may sit on the CPU.
        device (`torch.device`): where sampling runs.
        autocast (`Callable`): the run's autocast context (`Accelerator.autocast`).
        pipeline (`Callable`): builds the family's pipeline over the models being trained.
        card_samples (`list`): filled after stage 3 with `(prompt, path in OUT)` for the model card.
    """

    config: Any
    output_dir: Path
    unet: Any
    frozen: list
    device: torch.device
    autocast: Callable
    pipeline: Callable
    card_samples: list = field(default_factory=list)


def write_validation_samples(source: SampleSource, stage: int, step: int, stage_end: bool) -> list[Path]:
    """Write the sample grid of the validation prompts (fixed seeds) for `stage`/`step` under `OUT/samples/`;
    at a stage end also the first prompt's attention figure, and after stage 3 one picture per prompt for the
    model card (`source.card_samples`, replaced).

    Runs on the main process over the models being trained (`source.pipeline()`): the U-Net is put in eval
    mode and its attention processors (the training capture, mid-stage), train mode and the frozen models'
    devices are restored afterwards; the global RNG is forked so sampling does not change training randomness.
    With `compile`, sampling runs eagerly (`torch.compiler.set_stance("force_eager")`): its eval-mode, no-grad
    forwards at another batch size would otherwise each add a compiled graph and use up dynamo's recompile limit,
    after which the training steps would run uncompiled.

    Returns:
        `list[Path]`: the pictures written.
    """
    cfg = source.config
    prompts = [expand_prompt(p, cfg.token, cfg.category) for p in cfg.validation_prompts]
    folder = source.output_dir / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    settings = sample_settings(cfg)
    written: list[Path] = []
    with sampling_pipeline(source) as pipe:
        rows = [generate_images(pipe, prompt, cfg.validation_images, **settings) for prompt in prompts]
        title = f"stage {stage}/3 ({STAGE_NAMES[stage]}), step {step}"
        seeds = [f"seed {cfg.seed + j}" for j in range(cfg.validation_images)]
        path = folder / f"stage{stage}-step{step}.png"
        image_grid(rows, row_labels=prompts, column_labels=seeds, title=title).save(path)
        written.append(path)
        if stage_end:
            maps = token_attention_maps(pipe, prompts[0], **settings)
            path = folder / f"stage{stage}-attention.png"
            attention_figure(maps.image, maps.maps, maps.labels, title=f"{title}: {prompts[0]}").save(path)
            written.append(path)
        if stage_end and stage == 3:
            source.card_samples.clear()
            for i, (prompt, row) in enumerate(zip(prompts, rows)):
                path = folder / f"final-{i:02d}.png"
                image_grid([row], row_labels=[prompt]).save(path)
                written.append(path)
                source.card_samples.append((prompt, f"{SAMPLES_DIR}/{path.name}"))
    logger.debug("Samples of stage %d step %d written to %s", stage, step, folder)
    return written


def sample_settings(config) -> dict[str, Any]:
    """`generate_images`' settings for pictures drawn during training: the validation sampler at the run's
    resolution, seeds from the run's seed."""
    size = config.resolution
    return dict(
        seed=config.seed,
        steps=config.validation_inference_steps,
        guidance=config.validation_guidance_scale,
        height=size,
        width=size,
    )


@contextmanager
def sampling_pipeline(source: SampleSource) -> Iterator[Any]:
    """The family's pipeline over the models being trained, for drawing pictures mid-run (validation samples,
    checkpoint scores), with training's state put back afterwards.

    The U-Net is put in eval mode and its attention processors (the training capture, mid-stage), train mode and
    the frozen models' devices are restored on exit; the global RNG is forked so sampling does not change
    training randomness; under `compile` it runs eagerly (see `write_validation_samples`).
    """
    unet = source.unet
    processors, was_training = unet.attn_processors, unet.training
    # Frozen models may sit on the CPU during a stage (memory offloading); sampling needs them on the device.
    frozen = {model: next(model.parameters()).device for model in source.frozen}
    devices = [source.device] if source.device.type == "cuda" else []
    unet.eval()
    for model in frozen:
        model.to(source.device)
    try:
        with torch.random.fork_rng(devices=devices), source.autocast(), _eager(source.config.compile):
            pipe = source.pipeline()
            pipe.set_progress_bar_config(disable=True)
            yield pipe
    finally:
        unet.set_attn_processor(processors)
        unet.train(was_training)
        for model, device in frozen.items():
            model.to(device)
