# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Will a run fit, and how long will it take: `estimate_run` counts each phase of a run on the `meta` device and
says, per stage, the predicted peak GPU memory (broken down), whether it fits a card, which settings would make it
fit, and the predicted time of the recipe on the common cards.

Memory is counted (see `accounting`), checked against peaks measured on an H100: within 0.7 % on the eight
fused-attention steps, 5-7 % low on three naive-attention ones (docs/performance.md). Those were U-Net steps; the
SD3/3.5 and Flux.1 steps are counted the same way (the trainer's step, their joint-attention capture included) but
none has been measured on a GPU yet (`CALIBRATED_FAMILIES`; the printed estimate says so). Time is an estimate:
the run's FLOPs, counted exactly, over the throughput the measured H100 steps achieved, scaled to other cards by
their published tensor throughput and memory bandwidth, given as the range between the two scalings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base_model import check_quantize_base
from ..config import AttnDBConfig
from ..errors import UsageError, arg
from .architectures import architecture_for
from .gpus import ALLOCATOR_HEADROOM, GPUS, Gpu
from .run_model import ModelConfigs, Phase, build_models, count_phase, image_count, read_model_configs

__all__ = [
    "Estimate",
    "CALIBRATED_FAMILIES",
    "EstimateError",
    "PhaseEstimate",
    "estimate_run",
    "format_estimate",
    "model_configs_for",
    "write_estimate",
]

#: The throughput (TFLOP/s, FLOPs counted as here) the H100 steps of benchmarks/results/estimator achieved:
#: the optimised stage steps of the SD2.1-base comparison (`benchmarks/estimator_h100.py`).
H100_ACHIEVED_TFLOPS = {1: 93.4, 2: 87.9, "lora": 58.2, "full": 114.2}
#: The families whose counted steps were checked against steps measured on a GPU (the U-Net families). SD3/3.5 and
#: Flux.1 steps are counted the same way (the same step, their capture included) but no GPU measurement of them
#: exists yet, and their time uses the U-Net steps' achieved throughput.
CALIBRATED_FAMILIES = ("sd", "sdxl")
_GIB = 2**30


class EstimateError(UsageError):
    """The estimate cannot be made for these settings (CLI exit code 2)."""


@dataclass
class PhaseEstimate:
    """One phase of a run: `"latents"` (encoding the views) or a stage.

    Attributes:
        name (`str`): `"latents"`, `"stage 1"`, ...
        steps (`int`): optimizer steps of the stage (0 for the latents).
        peak (`dict[str, int]`): predicted peak bytes by category (weights, gradients, optimizer, activations,
            attention capture, workspace) and `"total"`.
        flops (`int`): FLOPs of one optimizer step (all its accumulated passes).
    """

    name: str
    steps: int
    peak: dict[str, int]
    flops: int

    @property
    def total_gib(self) -> float:
        return self.peak["total"] / _GIB


@dataclass
class Estimate:
    """What `estimate_run` predicts for one run.

    Attributes:
        config (`AttnDBConfig`): the settings, the model's defaults filled in.
        model (`str`): what the configs were read from.
        precision (`str`): the autocast precision assumed.
        phases (`list[PhaseEstimate]`): the latent cache and each stage with steps.
        gpu_memory_gib (`float`, *optional*): the card's memory the fit is checked against.
        suggestions (`list[tuple[str, float]]`): settings that would make the run fit, with their predicted peak
            (GiB); empty when it fits or no card was given.
        family (`str`, *optional*): the model's family (`families.ModelFamily.name`); the H100 checks were of
            SD steps (`CALIBRATED_FAMILIES`), what the text says of the others.
    """

    config: AttnDBConfig
    model: str
    precision: str
    phases: list[PhaseEstimate]
    gpu_memory_gib: float | None = None
    suggestions: list[tuple[str, float]] = field(default_factory=list)
    family: str | None = None

    @property
    def peak_gib(self) -> float:
        return max(p.total_gib for p in self.phases)

    def fits(self, memory_gib: float) -> bool:
        """Whether the run's peak, with `gpus.ALLOCATOR_HEADROOM` for the allocator, fits `memory_gib` of usable
        memory (the card's less the CUDA context)."""
        return self.peak_gib * (1 + ALLOCATOR_HEADROOM) <= memory_gib

    def seconds(self, gpu: Gpu) -> tuple[float, float]:
        """The predicted training time on `gpu`, `(low, high)` seconds: the stages' steps x FLOPs over the H100's
        achieved throughput scaled by the card's tensor throughput (high) and by its memory bandwidth (low);
        validation samples and the export are not included."""
        h100 = GPUS["h100"]
        low = high = 0.0
        for phase in self.phases:
            if not phase.steps:
                continue
            stage = int(phase.name.split()[-1])
            key = stage if stage < 3 else self.config.stage3_mode
            achieved = H100_ACHIEVED_TFLOPS[key] * 1e12
            by_compute = achieved * gpu.tflops / h100.tflops
            by_bandwidth = min(achieved * gpu.bandwidth_gbs / h100.bandwidth_gbs, 0.7 * gpu.tflops * 1e12)
            work = phase.steps * phase.flops
            low += work / max(by_compute, by_bandwidth)
            high += work / min(by_compute, by_bandwidth)
        return low, high

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "precision": self.precision,
            "phases": [
                {
                    "name": p.name,
                    "steps": p.steps,
                    "peak_gib": {k: round(v / _GIB, 3) for k, v in p.peak.items()},
                    "tflop_per_step": round(p.flops / 1e12, 3),
                }
                for p in self.phases
            ],
            "peak_gib": round(self.peak_gib, 2),
            "gpu_memory_gib": self.gpu_memory_gib,
            "suggestions": [{"settings": s, "peak_gib": round(g, 2)} for s, g in self.suggestions],
            "minutes": {k: [round(t / 60, 1) for t in self.seconds(g)] for k, g in GPUS.items()},
        }


def model_configs_for(config: AttnDBConfig) -> ModelConfigs:
    """The base model's component configs: a known architecture's without a download (`architectures`), else
    read from the model (folder, Hub id, or `model_config` for a single file)."""
    known = architecture_for(config.model) if not Path(config.model).expanduser().exists() else None
    if known is not None:
        return known.configs()
    return read_model_configs(config.model, config.revision, config.model_config)


def _precision(config: AttnDBConfig, gpu: Gpu | None) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return gpu.mixed_precision if gpu is not None else "bf16"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def count_run(
    config: AttnDBConfig,
    configs: ModelConfigs,
    precision: str,
    images: int | None,
    gpu: Gpu | None = None,
    category_tokens: int = 1,
    flops: bool = True,
) -> list[PhaseEstimate]:
    """Count the latent cache and every stage with steps of `config` (defaults filled in) on `meta`; the cuBLAS
    workspaces are `gpu`'s (an H100's when None); `flops=False` leaves the FLOPs at 0 (memory only)."""
    amp = _DTYPES[precision]
    models = build_models(configs, amp or torch.float32, quantize=config.quantize_base)
    workspace = (gpu or GPUS["h100"]).workspace_bytes
    phases = []
    for phase in [Phase("latents")] + [Phase("stage", s) for s in (1, 2, 3)]:
        steps = 0 if phase.name == "latents" else config.stages[phase.stage - 1].steps
        if phase.name != "latents" and not steps and phase.stage != 2:
            continue  # stage 3 builds on stage 2's LoRA, which is always added
        count = count_phase(
            models, config, phase, images=images, autocast_dtype=amp, category_tokens=category_tokens, flops=flops
        )
        if phase.name != "latents" and not steps:
            continue
        peak = dict(count.peak)
        peak["workspace"] = workspace
        peak["total"] = count.total + workspace
        phases.append(
            PhaseEstimate(phase.name if phase.name == "latents" else f"stage {phase.stage}", steps, peak, count.flops)
        )
    if config.validation_prompts and len(phases) > 1:  # the stage ends' sample grids, after the last stage
        count = count_phase(models, config, Phase("samples"), images=images, autocast_dtype=amp, flops=False)
        phases.append(
            PhaseEstimate("samples", 0, dict(count.peak, workspace=workspace, total=count.total + workspace), 0)
        )
    return phases


def estimate_run(
    config: AttnDBConfig, gpu: Gpu | None = None, gpu_memory_gib: float | None = None, suggest: bool = True
) -> Estimate:
    """Predict the memory and time of `config`'s run.

    Args:
        config (`AttnDBConfig`): the run's settings (unset model defaults are filled in from the model's configs).
        gpu (`Gpu`, *optional*): the card (its memory, and its precision for `mixed_precision="auto"`).
        gpu_memory_gib (`float`, *optional*): the card's memory in GiB, overriding `gpu`'s.
        suggest (`bool`): when it does not fit, also count the settings that would (`suggestions`).

    Raises:
        EstimateError: the model's configs cannot be read, or the settings cannot be counted.
    """
    try:
        configs = model_configs_for(config)
    except UsageError as exc:
        raise EstimateError(str(exc)) from None
    config = config.for_model(configs.family, configs.resolution) if config.model_defaults_missing else config
    precision = _precision(config, gpu)
    images = image_count(config.images)
    memory = gpu_memory_gib if gpu_memory_gib is not None else (gpu.usable_gib() if gpu is not None else None)
    phases = count_run(config, configs, precision, images, gpu)
    result = Estimate(config, configs.source, precision, phases, memory, family=configs.family.name)
    if memory is not None and suggest and not result.fits(memory):
        result.suggestions = _suggestions(config, configs, precision, images, memory, gpu)
    return result


def _candidates(config: AttnDBConfig):
    """Settings that lower the peak, cheapest first, each keeping the effective batch (batch x accumulation)."""
    cfg = config
    if not cfg.gradient_checkpointing and not cfg.compile:
        yield f"{arg('gradient_checkpointing')}", dataclasses.replace(cfg, gradient_checkpointing=True)
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    if not cfg.offload_frozen:
        yield f"{arg('gradient_checkpointing')} {arg('offload_frozen')}", dataclasses.replace(cfg, offload_frozen=True)
        cfg = dataclasses.replace(cfg, offload_frozen=True)
    batch, passes = cfg.batch_size, cfg.gradient_accumulation_steps
    while batch > 1 and batch % 2 == 0:
        batch, passes = batch // 2, passes * 2
        cfg = dataclasses.replace(cfg, batch_size=batch, gradient_accumulation_steps=passes)
        yield (
            (
                f"{arg('gradient_checkpointing')} {arg('offload_frozen')} {arg('batch_size')} {batch} "
                f"{arg('gradient_accumulation_steps')} {passes}"
            ),
            cfg,
        )
    if cfg.stage3_mode == "lora" and not cfg.quantize_base and check_quantize_base("int8") is None:
        cfg = dataclasses.replace(cfg, quantize_base="int8")
        yield "the above with " + f"{arg('quantize_base')} int8", cfg
    if cfg.stage3_mode == "full":
        yield "the above with " + f"{arg('stage3_mode')} lora", dataclasses.replace(cfg, stage3_mode="lora")


def _suggestions(config, configs, precision, images, memory, gpu) -> list[tuple[str, float]]:
    found = []
    for text, candidate in _candidates(config):
        phases = count_run(candidate, configs, precision, images, gpu, flops=False)
        peak = max(p.total_gib for p in phases)
        found.append((text, peak))
        if peak * (1 + ALLOCATOR_HEADROOM) <= memory:
            break
    return found


def format_estimate(estimate: Estimate, gpus: list[Gpu] | None = None) -> str:
    """The estimate as `attndb estimate` prints it."""
    cfg = estimate.config
    lines = [
        f"Predicted GPU memory for {estimate.model}: {cfg.resolution} px, batch {cfg.batch_size} x "
        f"{cfg.gradient_accumulation_steps} accumulated, {estimate.precision}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, offload {'on' if cfg.offload_frozen else 'off'}, "
        f"stage 3 {cfg.stage3_mode} (ranks {cfg.stage2.rank}, {cfg.stage3.rank})"
        + (f", base {cfg.quantize_base} (not measured on a GPU)." if cfg.quantize_base else "."),
        "Counted on the meta device (peak tensor memory, as torch.cuda.max_memory_allocated reads it; within 0.7 % of "
        "the 8 fused-attention steps measured on an H100, 5-7 % low on a naive-attention one)."
        + (
            ""
            if estimate.family in (None, *CALIBRATED_FAMILIES)
            else f" No {estimate.family.upper()} step has been measured on a GPU yet: a prediction only."
        ),
        "",
        f"{'phase':<9}{'steps':>6}{'peak GiB':>9} = {'weights':>7} +{'grads':>6} +{'optim':>6} +{'activations':>12}"
        f" +{'workspace':>10}   {'(capture)':>9}",
    ]
    for p in estimate.phases:
        g = {k: v / _GIB for k, v in p.peak.items()}
        lines.append(
            f"{p.name:<9}{p.steps:>6}{g['total']:>9.2f} = {g['weights']:>7.2f} +{g['gradients']:>6.2f} +"
            f"{g['optimizer']:>6.2f} +{g['activations']:>12.2f} +{g['workspace']:>10.2f}   "
            f"{g.get('attention_capture', 0):>9.2f}"
        )
    lines.append(
        "(capture): the part of the activations the attention capture (attn2, or the joint attention of SD3 and "
        "Flux) keeps for the regularizer (float32 scores and probabilities)."
    )
    lines.append(
        f"Peak: {estimate.peak_gib:.2f} GiB; a card needs about {estimate.peak_gib * (1 + ALLOCATOR_HEADROOM):.1f} "
        f"GiB free for it (+{ALLOCATOR_HEADROOM:.0%} for the allocator's cache) plus the CUDA context."
    )
    if estimate.gpu_memory_gib is not None:
        if estimate.fits(estimate.gpu_memory_gib):
            lines.append(f"Fits {estimate.gpu_memory_gib:g} GiB.")
        else:
            lines.append(
                f"Does not fit {estimate.gpu_memory_gib:g} GiB. Settings that lower the peak (same images "
                "per optimizer step):"
            )
            for text, peak in estimate.suggestions:
                verdict = "fits" if peak * (1 + ALLOCATOR_HEADROOM) <= estimate.gpu_memory_gib else "does not fit"
                lines.append(f"  {text}: {peak:.2f} GiB ({verdict})")
    lines += [
        "",
        "Predicted training time (an estimate, not a measurement: FLOPs counted here over the throughput "
        "measured on an H100, scaled by each card's published throughput and bandwidth; samples and export "
        "not included):",
    ]
    for gpu in gpus or list(GPUS.values()):
        if not gpu.tflops:
            lines.append(f"  {gpu.name}: not in the table of cards (attndb_peft/estimator/gpus.py); no time predicted")
            continue
        low, high = estimate.seconds(gpu)
        fits = "fits" if estimate.fits(gpu.usable_gib()) else "does not fit"
        span = _minutes(low) if _minutes(low) == _minutes(high) else f"{_minutes(low)} - {_minutes(high)}"
        lines.append(f"  {gpu.name:<16} {span:<18} ({fits} its {gpu.memory_gib:g} GiB)")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


def write_estimate(estimate: Estimate, path: str | Path) -> None:
    """The estimate as JSON (for scripts and the docs' table)."""
    Path(path).write_text(json.dumps(estimate.to_dict(), indent=1) + "\n", encoding="utf-8")
