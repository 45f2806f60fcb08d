# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The optimizers `optimizer` picks: torch's AdamW (the paper's), Prodigy (`prodigyopt`) and 8-bit AdamW
(`bitsandbytes`). The last two are optional packages, imported only when chosen; `check_optimizer` reports a
missing one with the input checks, before anything is loaded or written.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import arg

__all__ = ["OPTIMIZER_PACKAGES", "build_optimizer", "check_optimizer", "for_stage"]

#: The optional package each optimizer needs: `(module, pip name, attndb_peft extra)`.
OPTIMIZER_PACKAGES = {
    "prodigy": ("prodigyopt", "prodigyopt", "prodigy"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes", "bitsandbytes"),
}


def check_optimizer(name: str) -> str | None:
    """The problem with `optimizer` (its package not installed), or None."""
    if name not in OPTIMIZER_PACKAGES:
        return None
    module, pip_name, extra = OPTIMIZER_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        return (
            f"{arg('optimizer')} {name}: the {pip_name} package is not installed; run pip install {pip_name} (or pip "
            f"install 'attndb_peft[{extra}]'), or leave out {arg('optimizer')} (AdamW)."
        )
    return None


def build_optimizer(
    name: str, param_groups: list[dict], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """The stage's optimizer over `param_groups` (a group's own `lr` / `weight_decay` win over the stage's).

    Args:
        name (`str`): `adamw`, `prodigy` or `adamw8bit` (`AttnDBConfig.optimizer`).
        param_groups (`list[dict]`): the stage's groups (`Stage.param_groups`).
        lr (`float`): the stage's learning rate. Prodigy estimates the step size itself and scales it by `lr`, so
            1.0 is its usual value; the rate is used as given (never changed behind the user's back).
        weight_decay (`float`): decoupled weight decay (all three decouple it from the gradient).
        device (`torch.device`): AdamW uses its fused CUDA kernel on a GPU.
    """
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    if name == "prodigy":
        from prodigyopt import Prodigy

        # bias correction and the warm-up safeguard: the settings diffusers' DreamBooth LoRA scripts default to
        # (without the safeguard, Prodigy's step-size estimate can run away while a learning-rate warm-up is on)
        return Prodigy(
            param_groups, lr=lr, weight_decay=weight_decay, use_bias_correction=True, safeguard_warmup=True
        )
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adamw, prodigy or adamw8bit.")


def for_stage(config, stage: int, param_groups: list[dict], device: torch.device, accelerator) -> tuple:
    """The optimizer (`build_optimizer`, wrapped by accelerate), the LR schedule and the noise generator of stage
    `stage` over the built stage's `param_groups`; returns `(optimizer, lr_scheduler, generator)`."""
    from diffusers.optimization import get_scheduler

    stage_cfg = config.stages[stage - 1]
    optimizer = build_optimizer(config.optimizer, param_groups, stage_cfg.learning_rate, stage_cfg.weight_decay,
                                device)
    lr_scheduler = get_scheduler(
        stage_cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=stage_cfg.lr_warmup_steps,
        num_training_steps=max(stage_cfg.steps, 1),
    )
    # accelerate wraps the optimizer for fp16 loss scaling; the LR scheduler is stepped by hand (accelerate's
    # wrapper would step it once per process).
    optimizer = accelerator.prepare_optimizer(optimizer)
    seed = config.seed * 1000 + stage * 100 + accelerator.process_index
    return optimizer, lr_scheduler, torch.Generator(device=device).manual_seed(seed)
