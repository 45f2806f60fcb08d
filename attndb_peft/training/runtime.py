# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Where a run computes: accelerate's process state and `Accelerator`, the autocast precision and the dtype the
frozen weights are kept in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ..errors import arg
from ..reporting import trackers_for

__all__ = ["PROCESS_GROUP_TIMEOUT", "Runtime", "out_of_memory_message", "resolve_mixed_precision", "start_runtime"]

#: How long a process waits in a collective (e.g. a barrier) before the run is aborted. NCCL's default, 10
#: minutes, is shorter than what the main process may spend alone: writing a stage-3 full checkpoint (~10 GiB)
#: or the full fine-tune's export while the other processes wait in `wait_for_everyone`.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass
class Runtime:
    """The process's compute settings.

    Attributes:
        accelerator (`accelerate.Accelerator`): this process's accelerator (devices, processes, trackers).
        mixed_precision (`str`): `"no"`, `"fp16"` or `"bf16"` (`"auto"` resolved).
        device (`torch.device`): this process's device.
        weight_dtype (`torch.dtype`): the dtype of frozen weights (the autocast dtype; trainable ones are fp32).
    """

    accelerator: object
    mixed_precision: str
    device: torch.device
    weight_dtype: torch.dtype


def resolve_mixed_precision(requested: str, device: torch.device | str | None = None) -> str:
    """The precision `mixed_precision="auto"` stands for on `device` (the process's own device; default: the
    current CUDA device): bf16 on GPUs with native bf16 (compute capability 8.0 or newer: A100, H100, RTX 30xx
    and later), fp16 on older GPUs (T4, V100: `torch.cuda.is_bf16_supported()` also counts their emulated bf16,
    which is far slower than fp16), no autocast on the CPU. Other values are returned unchanged."""
    if requested != "auto":
        return requested
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    return "no"


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def start_runtime(mixed_precision: str, output: str | Path | None = None, report_to: str | None = None) -> Runtime:
    """Start accelerate for a run (`output` given: trackers log under `output/logs`) or for an export of a
    checkpoint (`output` None: one process, no trackers).

    Args:
        mixed_precision (`str`): the requested precision (`"auto"` is resolved on this process's device).
        output (`str` or `Path`, *optional*): the run's output folder.
        report_to (`str`, *optional*): the tracker (`"tensorboard"`, `"wandb"`).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    # cpu=True without CUDA makes torchrun / `accelerate launch --multi_gpu` processes on a CPU-only machine
    # join one gloo process group (accelerate's MULTI_CPU) instead of each training alone.
    cpu = not torch.cuda.is_available()
    if output is None:
        precision = resolve_mixed_precision(mixed_precision)
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
    else:
        # accelerate's process state first: it picks this process's device, which "auto" precision then probes
        # (every rank asking GPU 0 would be wrong on mixed machines and creates a context there).
        state = PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)
        precision = resolve_mixed_precision(mixed_precision, state.device)
        accelerator = Accelerator(
            mixed_precision=precision,
            cpu=cpu,
            log_with=trackers_for(report_to),
            project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(Path(output) / "logs")),
        )
    return Runtime(accelerator, precision, accelerator.device, _weight_dtype(precision))


def out_of_memory_message(config) -> str:
    """What a run that ran out of GPU memory says: its memory-relevant settings and what reduces memory."""
    cfg = config
    return (
        f"CUDA ran out of memory (batch size {cfg.batch_size}, {cfg.resolution} px, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, stage 3 {cfg.stage3_mode}). Reduce memory with "
        f"{arg('gradient_checkpointing')} {arg('offload_frozen')} (the low-memory setting), a smaller "
        f"{arg('batch_size')} (e.g. {max(cfg.batch_size // 2, 1)}), a lower {arg('resolution')}, or "
        f"{arg('stage3_mode')} lora instead of full. Checkpoints written so far are kept: add "
        f"{arg('gradient_checkpointing')} and {arg('resume')} to continue (batch size and resolution must stay "
        f"the same to resume; changing them needs {arg('overwrite')})."
    )
