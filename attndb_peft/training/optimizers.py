# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The optimizers `optimizer` picks: torch's AdamW (the paper's), Prodigy (`prodigyopt`) and 8-bit AdamW
(`bitsandbytes`). The last two are optional packages, imported only when chosen; `check_optimizer` reports a
missing one with the input checks, before anything is loaded or written.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import arg

__all__ = ["OPTIMIZER_PACKAGES", "build_optimizer", "check_optimizer"]

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
