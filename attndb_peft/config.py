# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Run configuration: one `AttnDBConfig` per training run, with one `StageConfig` per stage.

The dataclasses carry their help text in `field(metadata={"help": ...})` (like peft's configs) so the CLI,
the docs and `attndb_config.json` describe the same settings. Validation that needs no files or models
happens in `__post_init__`; checks against the disk (images, output folder) live in `data.py` and
`trainer.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = [
    "DEFAULT_VALIDATION_PROMPTS",
    "RESUME_DEFAULTS",
    "RESUME_KEYS",
    "TOKEN_INITS",
    "AttnDBConfig",
    "ConfigError",
    "StageConfig",
    "default_token",
    "instance_prompt",
]

#: Prompts for validation grids: background, style and colour changes ("{}" expands to "TOKEN CATEGORY").
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of a {}",
    "a photo of a {} in the jungle",
    "a watercolor painting of a {}",
    "a photo of a purple {} on the beach",
)


#: Settings a checkpoint must share with the run that resumes it (others, e.g. logging, may change).
RESUME_KEYS = (
    "model",
    "model_config",
    "revision",
    "variant",
    "category",
    "token",
    "resolution",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "stage1",
    "stage2",
    "stage3",
    "stage3_mode",
    "token_init",
    "stage3_train_token",
    "regularizer",
    "flip",
    "random_crops",
    "masked_loss",
    "masks",
    "max_grad_norm",
    "mixed_precision",
)
#: Values of resume settings that checkpoints written before the setting existed did not record.
RESUME_DEFAULTS = {"gradient_accumulation_steps": 1, "model_config": None, "masked_loss": False, "masks": None}


class ConfigError(UsageError):
    """A setting is invalid. The message names the setting, the value received and the fix."""


@dataclass
class StageConfig:
    """Settings of one training stage. LoRA fields are ignored by stage 1 (it trains one embedding vector)."""

    steps: int = field(metadata={"help": "Optimizer steps of this stage (0 skips the stage)."})
    learning_rate: float | None = field(
        metadata={"help": "AdamW learning rate (stage 3: None picks the default of stage3_mode)."}
    )
    lambda_mu: float = field(metadata={"help": "Weight of the attention-map mean term of the regularizer."})
    lambda_var: float = field(metadata={"help": "Weight of the attention-map variance term of the regularizer."})
    rank: int | None = field(
        default=32,
        metadata={
            "help": "LoRA rank (stages 2 and 3). None (their default): the model family's, 32 on SD 1.x/2.x and 16 "
            "on SDXL (`families.ModelFamily.default_lora_rank`), filled in when the base model is known."
        },
    )
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None means alpha = rank (scale 1)."})
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": "diffusers.optimization.get_scheduler name: constant, linear, cosine, ..."},
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps of the learning rate."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (diffusers' scripts' default)."})

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.lambda_mu < 0 or self.lambda_var < 0:
            raise ConfigError(f"lambda_mu and lambda_var must be >= 0, got {self.lambda_mu} and {self.lambda_var}.")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}.")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0 or None (alpha = rank), got {self.alpha}.")
        from diffusers.optimization import SchedulerType

        names = [t.value for t in SchedulerType]
        if self.lr_scheduler not in names:
            raise ConfigError(f"lr_scheduler must be one of {', '.join(names)}; got {self.lr_scheduler!r}.")

    @property
    def lora_alpha(self) -> float:
        if self.rank is None:
            raise ConfigError("rank is None (the family's default) until the base model is known; call "
                              "AttnDBConfig.for_model(...) first.")
        return float(self.rank if self.alpha is None else self.alpha)


# Stage defaults. Steps and lambdas are the paper's. Stage 1 trains the same single vector as the paper, so it
# keeps the paper's lr. Stages 2-3 train LoRAs instead of full weights; see README "Choosing the LoRA defaults":
# a rank-32 LoRA with alpha = rank moves W by roughly 0.1-0.6 x lr per Adam step where a full fine-tune moves
# every entry by ~lr, so the LoRA stages use 10x the paper's full-weight learning rates (2e-5 -> 2e-4,
# 2e-6 -> 2e-5), the same ratio diffusers' DreamBooth examples use between LoRA (1e-4) and full (5e-6).
def _stage1() -> StageConfig:
    return StageConfig(steps=60, learning_rate=1e-3, lambda_mu=0.1, lambda_var=0.0)


def _stage2() -> StageConfig:
    return StageConfig(steps=100, learning_rate=2e-4, lambda_mu=2.0, lambda_var=5.0, rank=None)


def _stage3() -> StageConfig:
    return StageConfig(steps=500, learning_rate=None, lambda_mu=2.0, lambda_var=5.0, rank=None)


#: Stage-3 learning rate by stage3_mode: LoRA (10x the paper's) and the full fine-tune (the paper's).
STAGE3_LEARNING_RATES = {"lora": 2e-5, "full": 2e-6}

#: Ways to initialise the new token's embedding (see `AttnDBConfig.token_init`).
TOKEN_INITS = ("category", "random")
_MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
_SAVE_DTYPES = ("fp16", "bf16", "fp32")
_REPORT_TO = ("tensorboard", "wandb")


def default_token(category: str) -> str:
    """The token used when none is given: `<attndb-CATEGORY>` with the category slugified."""
    slug = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "concept"
    return f"<attndb-{slug}>"


def instance_prompt(token: str, category: str) -> str:
    """The training prompt of every image and stage."""
    return f"a photo of a {token} {category}"


@dataclass
class AttnDBConfig:
    """Everything one AttnDreamBooth run needs. Load from YAML/JSON with `AttnDBConfig.from_file`; the CLI's
    flags override file values."""

    model: str = field(
        metadata={
            "help": "Base model: a Hub id, a local diffusers Stable Diffusion folder, or a single .safetensors "
            "checkpoint (with --model-config)."
        }
    )
    images: str = field(metadata={"help": "Folder with the 3-20 instance photos."})
    category: str = field(metadata={"help": "The subject's category word(s), e.g. 'dog' or 'teddy bear'."})
    output: str = field(metadata={"help": "Output folder for the adapter, samples and checkpoints."})
    token: str | None = field(
        default=None, metadata={"help": "The new token; default <attndb-CATEGORY>. Must not exist in the tokenizer."}
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "With a single-file --model (.safetensors): a diffusers folder or Hub id of the same "
            "architecture, for the component configs, tokenizer and scheduler."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant of the base model, e.g. fp16."})
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Training resolution in pixels (square). Default: the base model's own (its U-Net's sample_size "
            "x the VAE's downscaling: 512 for SD 1.5 and SD 2.1-base, 768 for SD 2.1, 1024 for SDXL); the run "
            "records the size it used."
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per forward/backward pass (per process); see gradient_accumulation_steps. Default: the "
            "base model's family: 8 on SD 1.x/2.x (the paper's batch), 2 on SDXL (with 4 accumulated passes: the "
            "same 8 images per optimizer step)."
        },
    )
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={
            "help": "Forward/backward passes per optimizer step: the effective batch is batch_size x this x "
            "processes, at the memory of batch_size (e.g. --batch-size 2 --gradient-accumulation-steps 4 trains "
            "the paper's batch 8). Default: 1 on SD 1.x/2.x, 4 on SDXL."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order, noise, timesteps and initialisation."})
    stage1: StageConfig = field(default_factory=_stage1, metadata={"help": "Stage 1: token embedding."})
    stage2: StageConfig = field(default_factory=_stage2, metadata={"help": "Stage 2: attn2 LoRA."})
    stage3: StageConfig = field(default_factory=_stage3, metadata={"help": "Stage 3: U-Net LoRA or full."})
    stage3_mode: str = field(
        default="lora",
        metadata={
            "help": "Stage 3 trains a LoRA (rank stage3.rank, see --ranks) on every linear layer of the U-Net's "
            "transformer blocks ('lora') or the full U-Net ('full')."
        },
    )
    full_export_rank: int = field(
        default=64, metadata={"help": "With stage3_mode='full': SVD rank of the exported LoRA of the U-Net delta."}
    )
    token_init: str = field(
        default="category",
        metadata={
            "help": "Initial embedding of the new token: 'category' (the mean of the category's sub-token "
            "embeddings; the method's) or 'random' (a seeded random direction at the vocabulary's mean embedding "
            "norm: a token the model has no prior for, DreamBooth's rare token; for baselines)."
        },
    )
    stage3_train_token: bool = field(
        default=False,
        metadata={
            "help": "Also train the token embedding in stage 3, jointly with the U-Net (LoRA or full), at "
            "stage 1's learning rate and weight decay: the TI+DB baseline of the paper's comparison."
        },
    )
    regularizer: str = field(
        default="per_layer", metadata={"help": "Regularizer reduction: 'per_layer' (reference code) or 'pooled'."}
    )
    flip: bool = field(default=True, metadata={"help": "Random horizontal flips (flipped views are cached)."})
    random_crops: int = field(
        default=0,
        metadata={"help": "Extra random-crop views cached per image (0: center crop only)."},
    )
    masked_loss: bool = field(
        default=False,
        metadata={
            "help": "Weight the diffusion loss by a subject mask (an addition to the paper's method): from the "
            "photos' transparency (cut-out PNGs), or from masks. The background then teaches nothing (cut-outs are "
            "otherwise learned on white); the attention regularizer is unchanged."
        },
    )
    masks: str | None = field(
        default=None,
        metadata={
            "help": "Folder with one mask per photo, same file name stem (dog1.jpg -> dog1.png), same size, white = "
            "subject; implies masked_loss. Without it masked_loss uses the photos' alpha channel."
        },
    )
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 on GPUs with native bf16, compute capability >= 8.0; fp16 on older GPUs; no on "
            "CPU), no, fp16, bf16."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Trade compute for memory in the U-Net (low-memory setting). Default: off on SD 1.x/2.x, on on "
            "SDXL (off when compile is on: the two do not combine)."
        },
    )
    offload_frozen: bool = field(
        default=False,
        metadata={
            "help": "Keep the VAE (after the latents are cached) and the text encoder (after stage 1) on the CPU; "
            "stages 2-3 move the text encoder over once to encode the prompt (low-memory setting)."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the U-Net. Each stage compiles once (minutes), which the paper's "
            "660 steps may not pay back; see the README's performance section. Not with gradient_checkpointing."
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    save_dtype: str = field(
        default="fp16", metadata={"help": "dtype of the exported LoRA and embedding: fp16, bf16, fp32."}
    )
    checkpointing_steps: int = field(
        default=0, metadata={"help": "Write a resumable checkpoint every N steps of a stage (0: only at stage ends)."}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most this many checkpoints (oldest pruned first)."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete checkpoint in output."})
    overwrite: bool = field(
        default=False, metadata={"help": "Allow a non-empty output folder (its files are replaced)."}
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the adapter to when done."})
    log_every: int = field(
        default=10, metadata={"help": "Read the loss back from the device every N steps (fewer host syncs)."}
    )
    validation_prompts: tuple[str, ...] = field(
        default=DEFAULT_VALIDATION_PROMPTS,
        metadata={"help": "Prompts for the sample grids ('{}' expands to 'TOKEN CATEGORY'); empty disables."},
    )
    validation_steps: int = field(
        default=0, metadata={"help": "Also write a sample grid every N steps (0: only at stage ends)."}
    )
    validation_inference_steps: int = field(default=25, metadata={"help": "Denoising steps of sample images."})
    validation_images: int = field(
        default=2, metadata={"help": "Images per validation prompt (seeds seed, seed+1, ...): the grid's columns."}
    )
    validation_guidance_scale: float = field(
        default=7.5, metadata={"help": "Classifier-free guidance scale of sample images."}
    )
    report_to: str | None = field(
        default=None,
        metadata={"help": "Log loss, regularizer and learning rate to 'tensorboard' or 'wandb' (accelerate)."},
    )
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})

    def __post_init__(self) -> None:
        for name in ("stage1", "stage2", "stage3"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _stage_from_dict(name, value))
        if isinstance(self.validation_prompts, (list, str)):
            self.validation_prompts = (
                (self.validation_prompts,)
                if isinstance(self.validation_prompts, str)
                else tuple(self.validation_prompts)
            )
        for name in ("model", "images", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} is required (got {getattr(self, name)!r}).")
        if not isinstance(self.category, str):
            raise ConfigError(f"category must be a string such as 'dog', got {self.category!r}.")
        # An empty category is reported by trainer.check_inputs together with every other input problem.
        self.category = " ".join(self.category.split())
        if self.token is None:
            self.token = default_token(self.category)
        elif not self.token.strip() or any(ch.isspace() for ch in self.token):
            raise ConfigError(f"token must be one word without spaces, got {self.token!r}; e.g. --token '<sks-dog>'.")
        if self.masks is not None:
            if not isinstance(self.masks, str) or not self.masks.strip():
                raise ConfigError(f"masks must be a folder path or None, got {self.masks!r}.")
            self.masked_loss = True  # a masks folder is only read for the masked loss
        if not isinstance(self.masked_loss, bool):
            raise ConfigError(f"masked_loss must be true or false, got {self.masked_loss!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")
        if self.stage3_mode not in STAGE3_LEARNING_RATES:
            raise ConfigError(f"stage3_mode must be 'lora' or 'full', got {self.stage3_mode!r}.")
        for name in ("stage1", "stage2"):
            if getattr(self, name).learning_rate is None:
                raise ConfigError(f"{name}.learning_rate is required.")
        if self.stage3.learning_rate is None:
            self.stage3 = dataclasses.replace(self.stage3, learning_rate=STAGE3_LEARNING_RATES[self.stage3_mode])
        if self.token_init not in TOKEN_INITS:
            raise ConfigError(f"token_init must be one of {TOKEN_INITS}, got {self.token_init!r}.")
        if self.regularizer not in ("per_layer", "pooled"):
            raise ConfigError(f"regularizer must be 'per_layer' or 'pooled', got {self.regularizer!r}.")
        if self.mixed_precision not in _MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {_MIXED_PRECISION}, got {self.mixed_precision!r}.")
        if self.save_dtype not in _SAVE_DTYPES:
            raise ConfigError(f"save_dtype must be one of {_SAVE_DTYPES}, got {self.save_dtype!r}.")
        for name in ("full_export_rank", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("random_crops", "checkpointing_steps", "validation_steps", "validation_inference_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.validation_images < 1:
            raise ConfigError(f"validation_images must be >= 1, got {self.validation_images}.")
        if self.report_to is not None and self.report_to not in _REPORT_TO:
            raise ConfigError(f"report_to must be one of {_REPORT_TO} or None, got {self.report_to!r}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit must be >= 1 or None, got {self.checkpoints_total_limit}.")
        if self.compile and self.gradient_checkpointing:
            # Measured (tests/test_device_paths.py, issue 14): the checkpointed blocks recompile per call signature
            # and use up dynamo's recompile limit within the first forward; the rest of the run is eager.
            raise ConfigError(
                "compile and gradient_checkpointing cannot be combined: under gradient checkpointing torch.compile "
                "recompiles the U-Net's blocks until it gives up and the run trains uncompiled. Drop --compile for "
                "the low-memory setting, or drop --gradient-checkpointing to compile."
            )
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite exclude each other: resume continues a run, overwrite restarts it."
            )

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> AttnDBConfig:
        """Build from a plain dict (e.g. a parsed YAML file). Unknown keys are an error naming the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}."
            )
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> AttnDBConfig:
        """Read a YAML (`.yaml`/`.yml`) or JSON file; `overrides` (e.g. from CLI flags) win over file values."""
        return cls.from_dict({**read_config_file(path), **overrides}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `from_dict` reads back."""
        data = dataclasses.asdict(self)
        data["validation_prompts"] = list(self.validation_prompts)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # -- derived values -----------------------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        """The training prompt, `a photo of a [V] [category]`."""
        return instance_prompt(self.token, self.category)

    @property
    def stages(self) -> tuple[StageConfig, StageConfig, StageConfig]:
        return (self.stage1, self.stage2, self.stage3)

    @property
    def model_defaults_missing(self) -> bool:
        """Whether a setting that defaults to the base model's value is still unset (see `for_model`)."""
        unset = (self.resolution, self.batch_size, self.gradient_accumulation_steps, self.gradient_checkpointing)
        return any(v is None for v in unset) or any(s.rank is None for s in (self.stage2, self.stage3))

    def for_model(self, family, resolution: int) -> AttnDBConfig:
        """This config with the defaults that depend on the base model filled in: `resolution` (None: the model's
        own, `resolution` here), the stage-2/3 LoRA ranks (None: `family.default_lora_rank`) and the batch and
        memory setting (None: the family's; gradient checkpointing stays off under `compile`). What the user set
        is kept. The trainer calls it once the U-Net's config is read; attndb_config.json records the result."""
        stages = {
            name: dataclasses.replace(getattr(self, name), rank=family.default_lora_rank)
            for name in ("stage2", "stage3")
            if getattr(self, name).rank is None
        }
        checkpointing = self.gradient_checkpointing
        if checkpointing is None:
            checkpointing = family.default_gradient_checkpointing and not self.compile
        return dataclasses.replace(
            self,
            resolution=self.resolution or resolution,
            batch_size=self.batch_size or family.default_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps or family.default_gradient_accumulation_steps,
            gradient_checkpointing=checkpointing,
            **stages,
        )

    def with_stage_values(self, steps=None, learning_rates=None, **stage_fields) -> AttnDBConfig:
        """Return a copy with per-stage values replaced.

        Args:
            steps, learning_rates: 3-sequences (stages 1, 2, 3) or None.
            stage_fields: any other `StageConfig` field, e.g. `rank=(None, 16, 64)`, as a 3-sequence whose
                `None` entries keep that stage's value.
        """
        stage_fields = {"steps": steps, "learning_rate": learning_rates, **stage_fields}
        updates = {}
        for i, name in enumerate(("stage1", "stage2", "stage3")):
            changes = {k: v[i] for k, v in stage_fields.items() if v is not None and v[i] is not None}
            try:
                updates[name] = dataclasses.replace(getattr(self, name), **changes)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return dataclasses.replace(self, **updates)


def _stage_from_dict(name: str, values: dict[str, Any]) -> StageConfig:
    defaults = {"stage1": _stage1, "stage2": _stage2, "stage3": _stage3}[name]()
    known = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    try:
        return dataclasses.replace(defaults, **values)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a dict, with errors that name the file. An adapter folder's
    `attndb_config.json` gives the settings of the run that wrote it (so it reproduces that run)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(
            f"--config {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of settings at the top level, got {type(data).__name__}."
        )
    if "format_version" in data and isinstance(data.get("settings"), dict):
        # an adapter's attndb_config.json: its "settings" are the run's AttnDBConfig
        return dict(data["settings"])
    return data
