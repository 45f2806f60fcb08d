# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints of a run and resuming from them: what a checkpoint folder holds (see checkpoints.py for the
atomic writes), where a resumed run picks up (`ResumePoint`) and the output folder's preparation."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoints as ckpt
from ..adapter_format import ADAPTER_FILES
from ..config import RESUME_DEFAULTS, RESUME_KEYS, AttnDBConfig
from ..errors import arg
from .inputs import InputError

__all__ = [
    "ResumePoint",
    "load_weights",
    "prepare_output_dir",
    "read_resume_point",
    "restore_optimizer_and_rng",
    "save_checkpoint",
    "warn_full_checkpoint_disk_use",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues.

    Attributes:
        path (`Path`): the checkpoint folder.
        stage (`int`): the stage to continue (the one after the checkpoint's when that one was finished).
        step (`int`): the step of `stage` to continue from (0: the stage starts afresh).
        lr_scheduler (`dict`): the checkpoint's LR scheduler state (used when `step` > 0).
    """

    path: Path
    stage: int
    step: int
    lr_scheduler: dict


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create the output folder; with `overwrite`, first remove what an earlier run wrote there."""
    if overwrite and out.is_dir():
        for name in ADAPTER_FILES:
            (out / name).unlink(missing_ok=True)
        for sub in (ckpt.CHECKPOINT_DIR, "samples", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def warn_full_checkpoint_disk_use(config: AttnDBConfig, unet) -> None:
    """A full stage-3 checkpoint holds the U-Net and its AdamW moments (~10 GB for SD): say what periodic ones
    will take when nothing prunes them, instead of filling the disk silently."""
    if config.stage3_mode != "full" or not config.checkpointing_steps or config.checkpoints_total_limit is not None:
        return
    count = config.stage3.steps // config.checkpointing_steps
    if count < 2:
        return
    per_checkpoint = sum(p.numel() for p in unet.parameters()) * 4 * 3 / 1e9  # fp32 weights + 2 moments
    fix = (
        f"{arg('select')} auto keeps them all, to export the one it picks."
        if config.select == "auto"
        else f"Add {arg('checkpoints_total_limit')} 2 to keep only the newest two."
    )
    logger.warning(
        f"{arg('stage3_mode')} full with {arg('checkpointing_steps')} {config.checkpointing_steps}: {count} stage-3 "
        f"checkpoints of ~{per_checkpoint:.1f} GB each (~{count * per_checkpoint:.0f} GB), all kept. {fix}"
    )


def save_checkpoint(
    accelerator,
    output_dir: Path,
    config: AttnDBConfig,
    stage: int,
    step: int,
    trainable_state: Callable[[], dict[str, torch.Tensor]],
    optimizer,
    lr_scheduler,
    generator: torch.Generator,
) -> None:
    """Write the checkpoint of `stage` at `step`: every process its noise generator's state, the main process
    the weights (`trainable_state()`), the optimizer, the LR schedule and the settings; then prune old ones."""
    acc = accelerator
    tmp = ckpt.temporary_dir(output_dir, stage, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng_tensors, rng_plain = ckpt.rng_state_to_files(generator)
    ckpt.save_tensors(tmp / f"rng-{acc.process_index}.safetensors", rng_tensors)
    ckpt.write_json_atomic(tmp / f"rng-{acc.process_index}.json", rng_plain)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.save_tensors(tmp / "weights.safetensors", trainable_state())
        opt_tensors, opt_plain = ckpt.optimizer_state_to_files(optimizer.optimizer)
        ckpt.save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        ckpt.write_json_atomic(tmp / "optimizer.json", opt_plain)
        settings = config.to_dict()
        ckpt.commit(
            tmp,
            {
                "stage": stage,
                "step": step,
                "num_processes": acc.num_processes,
                "lr_scheduler": lr_scheduler.state_dict(),
                "settings": {k: settings[k] for k in RESUME_KEYS},
                "config": settings,  # everything, for `attndb export --checkpoint`
            },
        )
        ckpt.prune(output_dir, config.checkpoints_total_limit)
    acc.wait_for_everyone()


def read_resume_point(output_dir: Path, config: AttnDBConfig, num_processes: int) -> ResumePoint:
    """Where to continue the run in `output_dir` (its newest complete checkpoint) with `config`.

    Raises:
        InputError: the checkpoint was written with other settings or another number of processes, or lies
            beyond the stage-3 steps asked for.
    """
    path = ckpt.find_latest(output_dir)
    state = ckpt.read_json(path / "state.json")
    settings = config.to_dict()
    # settings added after a checkpoint was written count as their defaults there
    written = {**RESUME_DEFAULTS, **state["settings"]}
    # More (or fewer) stage-3 steps extend a run: the rest of stage 3 must match, and the checkpoint must not
    # lie beyond the new end of stage 3 (pick an earlier step with `attndb export --checkpoint` instead).
    written["stage3"] = {**written["stage3"], "steps": settings["stage3"]["steps"]}
    changed = [k for k in RESUME_KEYS if written.get(k) != settings[k]]
    if changed:
        raise InputError(
            f"{arg('resume')}: {path} was written with different settings ({', '.join(changed)}); use the same "
            f"settings, or start over with {arg('overwrite')}."
        )
    if state["num_processes"] != num_processes:
        raise InputError(
            f"{arg('resume')}: {path} was written by {state['num_processes']} process(es), this run has "
            f"{num_processes}; resume with the same number of processes."
        )
    logger.info("Resuming from %s", path)
    stage, step = state["stage"], state["step"]
    steps3, planned3 = config.stage3.steps, state["settings"]["stage3"]["steps"]
    if stage == 3 and step > steps3:
        raise InputError(
            f"{arg('resume')}: {path} is at stage-3 step {step}, beyond the {steps3} stage-3 steps asked for; ask for "
            f"at least {step}, or export that checkpoint (or an earlier one) with `attndb export --checkpoint`."
        )
    if steps3 != planned3:
        logger.info("Stage 3: %d steps instead of the %d the checkpoint's run planned.", steps3, planned3)
        if config.stage3.lr_scheduler not in ("constant", "constant_with_warmup"):
            logger.warning(
                "The stage-3 learning-rate schedule (%s) is laid out over the new %d steps, so from step %d it "
                "differs from the schedule the run had.",
                config.stage3.lr_scheduler,
                steps3,
                step if stage == 3 else 0,
            )
    if step >= config.stages[stage - 1].steps and stage < 3:
        # The stage was finished: its weights are restored and the next stage starts from step 0.
        return ResumePoint(path, stage + 1, 0, state["lr_scheduler"])
    return ResumePoint(path, stage, step, state["lr_scheduler"])


def load_weights(path: Path, device) -> dict[str, torch.Tensor]:
    """A checkpoint's learned tensors (`Stage.load_state` picks its own)."""
    return ckpt.load_tensors(path / "weights.safetensors", device)


def restore_optimizer_and_rng(
    point: ResumePoint, optimizer, lr_scheduler, generator: torch.Generator, process_index: int, device
) -> None:
    """Restore the optimizer, its LR schedule and this process's noise generator from `point`'s checkpoint."""
    path = point.path
    ckpt.load_optimizer_state(
        optimizer.optimizer,
        ckpt.load_tensors(path / "optimizer.safetensors", device),
        ckpt.read_json(path / "optimizer.json"),
    )
    lr_scheduler.load_state_dict(point.lr_scheduler)
    ckpt.load_rng_state(
        generator,
        ckpt.load_tensors(path / f"rng-{process_index}.safetensors"),
        ckpt.read_json(path / f"rng-{process_index}.json"),
    )
