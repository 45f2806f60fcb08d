# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Settings as dataclass fields (`setting`) and one training stage's settings (`StageConfig`, its defaults).

A setting's metadata describes it everywhere it appears: `cli_args.add_config_arguments` generates the
`attndb train` flags from it (the way transformers' `HfArgumentParser` reads dataclasses), `config.RESUME_KEYS` /
`RESUME_DEFAULTS` are read off it. The metadata keys:

- `help`: the description (CLI help, docs). The CLI appends the default unless the text says "Default:".
- `group`: the `attndb train --help` section: model, data, stages, memory, output, logging or scoring.
- `flag`: the option string where it is not `--field-name` (`stage3_mode` -> `--stage3`); None for a setting
  without a flag (config files and Python only). A boolean's flag comes with its `--no-` form.
- `choices`, `metavar`: as in argparse; `default_text`: how the help shows a default its value says little about.
- `stages` (`StageConfig` only): the stages one per-stage flag covers (`--ranks 16,64`: stages 2 and 3).
- `resume`: the setting must match between a checkpoint and the run that resumes it (`RESUME_KEYS`).
- `resume_default`: the value a checkpoint written before the setting existed implies (`RESUME_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError, arg

__all__ = [
    "ConfigError",
    "StageConfig",
    "setting",
    "stage1_defaults",
    "stage2_defaults",
    "stage3_defaults",
    "stage_from_dict",
]


class ConfigError(UsageError):
    """A setting is invalid. The message names the setting, the value received and the fix."""


def setting(
    help: str,
    *,
    group: str | None = None,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = "",
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    resume: bool = False,
    resume_default: Any = dataclasses.MISSING,
    stages: tuple[int, ...] | None = None,
    minimum: int | None = None,
) -> Any:
    """A dataclass field for one setting, described by its metadata (the keys are in the module docstring).

    Args:
        help (`str`): what the setting does.
        group (`str`, *optional*): the `attndb train --help` section (`cli_args.TRAIN_GROUPS`).
        default, default_factory: as in `dataclasses.field`; neither makes the setting required.
        flag (`str` or `None`, *optional*): the option string where it is not `--field-name`; None: no flag.
        choices (`tuple[str, ...]`, *optional*): the accepted values, for the CLI.
        metavar (`str`, *optional*): the value's name in the help.
        default_text (`str`, *optional*): how the help shows the default.
        resume (`bool`, defaults to `False`): whether a resumed run must match the checkpoint's value.
        resume_default (*optional*): the value implied when a checkpoint did not record the setting.
        stages (`tuple[int, ...]`, *optional*): for `StageConfig` fields, the stages the flag covers.
        minimum (`int`, *optional*): the smallest accepted value (`AttnDBConfig.__post_init__` checks it).

    Returns:
        `dataclasses.Field`: keys left at their "not given" value are not stored, so `field.metadata` holds only
        what was said about the setting.
    """
    given = {
        "help": help,
        "group": group,
        "choices": choices,
        "metavar": metavar,
        "default_text": default_text,
        "resume": resume or None,
        "stages": stages,
        "minimum": minimum,
    }
    metadata = {k: v for k, v in given.items() if v is not None}
    if flag != "":
        metadata["flag"] = flag  # None: explicitly no command-line flag
    if resume_default is not dataclasses.MISSING:
        metadata["resume_default"] = resume_default  # None is a value here
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class StageConfig:
    """Settings of one training stage. LoRA fields are ignored by stage 1 (it trains one embedding vector).

    On the command line each field with a flag takes one value for every stage it covers (`stages`), or one
    value per stage, comma-separated (`--steps 60,100,500`, `--ranks 16,64`)."""

    steps: int | None = setting(
        "Optimizer steps (0 skips the stage). Stage 3 unset (None): the recipe's (paper 500, fast 200).",
        flag="--steps", stages=(1, 2, 3),
    )
    learning_rate: float | None = setting(
        "Learning rate (Prodigy: normally 1.0). Stage 3 unset (None): the recipe's for stage3_mode (paper: lora 2e-5, "
        "full 2e-6; fast: lora 1e-4, full 1e-5).", flag="--learning-rates", stages=(1, 2, 3),
    )
    lambda_mu: float = setting("Regularizer weight of the attention-map mean.", stages=(1, 2, 3))
    lambda_var: float = setting("Regularizer weight of the attention-map variance.", stages=(1, 2, 3))
    rank: int | None = setting(
        "LoRA rank. Default: the model family's, 32 on SD 1.x/2.x and 16 on SDXL "
        "(`families.ModelFamily.default_lora_rank`; None until the base model is known).",
        default=32,
        flag="--ranks",
        stages=(2, 3),
    )
    alpha: float | None = setting(
        "LoRA alpha; the LoRA's scale is alpha/rank. Default: None, alpha = rank (scale 1).",
        default=None,
        flag="--lora-alphas",
        stages=(2, 3),
    )
    lr_scheduler: str = setting(
        "Learning-rate schedule, a diffusers get_scheduler name: constant, constant_with_warmup, linear, cosine, ...",
        default="constant",
        flag="--lr-schedulers",
        stages=(1, 2, 3),
    )
    lr_warmup_steps: int = setting("Linear warm-up steps of the learning rate.", default=0, stages=(1, 2, 3))
    # No flag: the diffusers scripts' value has not needed tuning; config files and Python can still set it.
    weight_decay: float = setting("AdamW weight decay (diffusers' scripts' default).", default=1e-2, flag=None)

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"{arg('steps')} must be >= 0, got {self.steps}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"{arg('learning_rate')} must be > 0, got {self.learning_rate}.")
        if self.lambda_mu < 0 or self.lambda_var < 0:
            raise ConfigError(
                f"{arg('lambda_mu')} and {arg('lambda_var')} must be >= 0, "
                f"got {self.lambda_mu} and {self.lambda_var}."
            )
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"{arg('rank')} must be >= 1, got {self.rank}.")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"{arg('lr_warmup_steps')} must be >= 0, got {self.lr_warmup_steps}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"{arg('alpha')} must be > 0 or None (alpha = rank), got {self.alpha}.")
        from diffusers.optimization import SchedulerType

        names = [t.value for t in SchedulerType]
        if self.lr_scheduler not in names:
            raise ConfigError(f"{arg('lr_scheduler')} must be one of {', '.join(names)}; got {self.lr_scheduler!r}.")

    @property
    def lora_alpha(self) -> float:
        if self.rank is None:
            raise ConfigError(f"{arg('rank')} is None (the family's default) until the base model is known; call "
                              "AttnDBConfig.for_model(...) first.")
        return float(self.rank if self.alpha is None else self.alpha)


# Stage defaults. Steps and lambdas are the paper's. Stage 1 trains the same single vector as the paper, so it
# keeps the paper's lr. Stages 2-3 train LoRAs instead of full weights; see docs/method.md "LoRA rates":
# a rank-32 LoRA with alpha = rank moves W by roughly 0.1-0.6 x lr per Adam step where a full fine-tune moves
# every entry by ~lr, so the LoRA stages use 10x the paper's full-weight learning rates (2e-5 -> 2e-4,
# 2e-6 -> 2e-5), the same ratio diffusers' DreamBooth examples use between LoRA (1e-4) and full (5e-6).
def stage1_defaults() -> StageConfig:
    return StageConfig(steps=60, learning_rate=1e-3, lambda_mu=0.1, lambda_var=0.0)


def stage2_defaults() -> StageConfig:
    return StageConfig(steps=100, learning_rate=2e-4, lambda_mu=2.0, lambda_var=5.0, rank=None)


def stage3_defaults() -> StageConfig:
    # steps and learning_rate None: the recipe's (`RECIPES`), filled in by AttnDBConfig.__post_init__
    return StageConfig(steps=None, learning_rate=None, lambda_mu=2.0, lambda_var=5.0, rank=None)


def stage_from_dict(name: str, values: dict[str, Any]) -> StageConfig:
    """`name`'s (`stage1`..`stage3`) default settings with `values` (e.g. a config file's mapping) applied."""
    defaults = {"stage1": stage1_defaults, "stage2": stage2_defaults, "stage3": stage3_defaults}[name]()
    known = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    try:
        return dataclasses.replace(defaults, **values)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
