# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Run configuration: one `AttnDBConfig` per training run, with one `StageConfig` per stage (`stage_config`).

Each setting is typed once, as a dataclass field made by `stage_config.setting`, whose metadata describes it
everywhere it appears (the keys are in `stage_config`'s docstring): the `attndb train` flags are generated from
it, `RESUME_KEYS` / `RESUME_DEFAULTS` are read off it, and `attndb_config.json` records the fields.

Validation that needs no files or models happens in `__post_init__`; checks against the disk (images, output
folder) live in `data.py` and `trainer.py`. Messages name settings with `errors.arg` (`` `resolution` ``); the
CLI shows the flag instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import arg
from .stage_config import (
    ConfigError,
    StageConfig,
    setting,
    stage1_defaults,
    stage2_defaults,
    stage3_defaults,
    stage_from_dict,
)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_VALIDATION_PROMPTS",
    "QUANTIZE_BASE",
    "RECIPES",
    "RESUME_DEFAULTS",
    "RESUME_KEYS",
    "SELECT_MARGIN",
    "SELECT_RULES",
    "STAGE3_TARGET_SETS",
    "TOKEN_INITS",
    "AttnDBConfig",
    "ConfigError",
    "StageConfig",
    "default_token",
    "instance_prompt",
    "recipe_batch",
]

#: Prompts for validation grids: background, style and colour changes ("{}" expands to "TOKEN CATEGORY").
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of a {}",
    "a photo of a {} in the jungle",
    "a watercolor painting of a {}",
    "a photo of a purple {} on the beach",
)


# The recipes `recipe` picks: stage 3's steps, its learning rate by stage3_mode, and the images per optimizer step
# (None: the family's, the paper's 8). "fast" is the AttnDreamBooth authors' fast version (stage 3 at lr 1e-5 for
# 200 steps at batch 4; they report 20 -> 6 minutes, close to the full recipe on short prompts and slightly below
# on complex ones). Their 1e-5 is a full-weight rate: the LoRA takes 10x it (1e-4), by the same argument as the
# paper's 2e-6 -> 2e-5 above. `batch_size` is one setting for the whole run, so batch 4 holds for every stage, as
# in the authors' scripts (train_batch_size 4 in each stage).
RECIPES = {
    "paper": {"steps": 500, "learning_rates": {"lora": 2e-5, "full": 2e-6}, "batch": None},
    "fast": {"steps": 200, "learning_rates": {"lora": 1e-4, "full": 1e-5}, "batch": 4},
}
#: Stage-3 learning rate by stage3_mode in the paper's recipe: LoRA (10x the paper's) and the full fine-tune.
STAGE3_LEARNING_RATES = RECIPES["paper"]["learning_rates"]

#: Ways to initialise the new token's embedding (see `AttnDBConfig.token_init`).
TOKEN_INITS = ("category", "random")
_MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
_SAVE_DTYPES = ("fp16", "bf16", "fp32")
_REPORT_TO = ("tensorboard", "wandb")
_REGULARIZERS = ("per_layer", "pooled")
_OPTIMIZERS = ("adamw", "prodigy", "adamw8bit")
#: Weight formats of `quantize_base`: torchao's int8 weight-only (CPU and GPU; diffusers' `TorchAoConfig`).
QUANTIZE_BASE = ("int8",)
#: `stage3_targets`: the layers of stage 3's LoRA (`stages.STAGE3_TARGETS`).
STAGE3_TARGET_SETS = ("transformer", "attn2", "unet")
#: `select`: which checkpoint becomes the adapter.
SELECT_RULES = ("last", "auto")
#: `select_margin`'s default, fixed on the world's tuning concepts (docs/guide.md).
SELECT_MARGIN = 1.0
#: The CLIP of `attndb evaluate` and of the checkpoint scores (ViT-B/32, as in the Textual Inversion and
#: DreamBooth evaluations).
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def recipe_batch(recipe: str, family) -> tuple[int, int]:
    """`(batch_size, gradient_accumulation_steps)` of `recipe` on a model `family`: the family's own for the paper's
    recipe; for a recipe with a batch of its own, that many images per optimizer step in passes of at most the
    family's batch (fast: 4 x 1 on SD 1.x/2.x, 2 x 2 on SDXL)."""
    images = RECIPES[recipe]["batch"]
    if images is None:
        return family.default_batch_size, family.default_gradient_accumulation_steps
    per_pass = min(family.default_batch_size, images)
    return per_pass, max(1, images // per_pass)


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

    # -- required ---------------------------------------------------------------------------------------------
    model: str = setting(
        "Base model: a Hub id, a local diffusers Stable Diffusion folder, or a single .safetensors checkpoint "
        "(with model_config).",
        group="model",
        resume=True,
    )
    images: str = setting("Folder with the 3-20 instance photos.", group="data", metavar="DIR")
    category: str = setting("The subject's category word(s), e.g. 'dog' or 'teddy bear'.", group="data", resume=True)
    output: str = setting("Output folder for the adapter, samples and checkpoints.", group="output", metavar="DIR")
    # -- model ------------------------------------------------------------------------------------------------
    token: str | None = setting(
        "The new token (must not exist in the tokenizer). Default: <attndb-CATEGORY>.", default=None, group="data",
        resume=True,
    )
    model_config: str | None = setting(
        "With a single-file model (.safetensors): a diffusers folder or Hub id of the same architecture, for the "
        "component configs, tokenizer and scheduler.", default=None, group="model", resume=True, resume_default=None,
    )
    revision: str | None = setting("Hub revision of the base model.", default=None, group="model", resume=True)
    variant: str | None = setting(
        "Weights variant of the base model, e.g. fp16.", default=None, group="model", resume=True
    )
    # -- data and batch ---------------------------------------------------------------------------------------
    resolution: int | None = setting(
        "Training resolution in pixels (square). Default: the base model's own (512 for SD 1.5 and SD 2.1-base, "
        "768 for SD 2.1, 1024 for SDXL); the run records the size it used.", default=None, group="data", resume=True,
    )
    batch_size: int | None = setting(
        "Images per forward/backward pass (per process). Default: the base model family's: 8 on SD 1.x/2.x (the "
        "paper's batch), 2 on SDXL (with 4 accumulated passes: the same 8 images per optimizer step); recipe fast: "
        "4 (SDXL: 2, with 2 passes).", default=None, group="stages", resume=True, minimum=1,
    )
    gradient_accumulation_steps: int | None = setting(
        "Forward/backward passes per optimizer step: the effective batch is batch_size x this x processes, at the "
        "memory of batch_size. Default: 1 on SD 1.x/2.x, 4 on SDXL (recipe fast: 2).", default=None, group="stages",
        resume=True, resume_default=1, minimum=1,
    )
    seed: int = setting(
        "Seed for data order, noise, timesteps and initialisation.", default=0, group="stages", resume=True
    )
    # -- stages -----------------------------------------------------------------------------------------------
    # The stages have no flag of their own: StageConfig's fields give the per-stage flags (--steps, --ranks, ...).
    stage1: StageConfig = setting("Stage 1: token embedding.", default_factory=stage1_defaults, flag=None, resume=True)
    stage2: StageConfig = setting("Stage 2: attn2 LoRA.", default_factory=stage2_defaults, flag=None, resume=True)
    stage3: StageConfig = setting("Stage 3: U-Net LoRA or full.", default_factory=stage3_defaults, flag=None,
                                  resume=True)
    stage3_mode: str = setting(
        "Stage 3 trains a LoRA (rank stage3.rank) on every linear layer of the U-Net's transformer blocks ('lora') "
        "or the full U-Net ('full').", default="lora", group="stages", flag="--stage3",
        choices=tuple(STAGE3_LEARNING_RATES), resume=True,
    )
    stage3_targets: str = setting(
        "With --stage3 lora, its LoRA's layers: 'transformer' (every linear of the transformer blocks), 'attn2' "
        "(cross-attention only) or 'unet' (also the ResNet and resampler layers, as kohya's LoCon).",
        default="transformer", group="stages", choices=STAGE3_TARGET_SETS, resume=True, resume_default="transformer",
    )
    recipe: str = setting(
        "'paper' (stage 3: 500 steps, 8 images per step) or 'fast', the authors' fast version: stage 3 200 steps at "
        "1e-4 (lora; 10x the authors' full-weight 1e-5, as for the paper's rates) or 1e-5 (full) and 4 images per "
        "step (SDXL: 2 x 2 passes); the authors report 6 instead of 20 minutes. Flags given win.", default="paper",
        group="stages", choices=tuple(RECIPES), resume=True, resume_default="paper",
    )
    full_export_rank: int = setting("With stage3_mode 'full': SVD rank of the exported LoRA of the U-Net delta.",
                                    default=64, group="output", minimum=1)
    # token_init and stage3_train_token set up the baselines (Textual Inversion, TI+DB) that demo and the
    # benchmarks build in Python; they have no flag so that `attndb train` always runs the method.
    token_init: str = setting(
        "Initial embedding of the new token: 'category' (the mean of the category's sub-token embeddings; the "
        "method's) or 'random' (a seeded random direction at the vocabulary's mean embedding norm: a token the "
        "model has no prior for, DreamBooth's rare token; for baselines).", default="category", flag=None,
        choices=TOKEN_INITS, resume=True,
    )
    stage3_train_token: bool = setting(
        "Also train the token embedding in stage 3, jointly with the U-Net (LoRA or full), at stage 1's learning "
        "rate and weight decay: the TI+DB baseline of the paper's comparison.", default=False, flag=None, resume=True,
    )
    regularizer: str = setting(
        "Regularizer reduction: 'per_layer' (reference code) or 'pooled'.", default="per_layer", group="stages",
        choices=_REGULARIZERS, resume=True,
    )
    flip: bool = setting("Random horizontal flips (views cached).", default=True, group="data", resume=True)
    random_crops: int = setting(
        "Extra random-crop views cached per image (0: center crop only).", default=0, group="data", resume=True,
        minimum=0,
    )
    masked_loss: bool = setting(
        "Weight the diffusion loss by a subject mask (an addition to the paper's method): from the photos' "
        "transparency (cut-out PNGs), or from masks. The background then teaches nothing (cut-outs are otherwise "
        "learned on white).", default=False, group="data", resume=True, resume_default=False,
    )
    masks: str | None = setting(
        "Folder with one mask per photo, same file name stem (dog1.jpg -> dog1.png), same size, white = subject; "
        "implies masked_loss. Without it masked_loss uses the photos' alpha channel.", default=None, group="data",
        metavar="DIR", resume=True, resume_default=None,
    )
    max_grad_norm: float = setting("Gradient clipping norm (0 disables).", default=1.0, group="stages", resume=True)
    # -- options beyond the paper, each off by default (docs/guide.md "Options: Min-SNR, noise offset, Prodigy")
    snr_gamma: float | None = setting(
        "Min-SNR loss weighting (Hang et al. 2023): each sample's diffusion MSE weighted by min(SNR, gamma)/SNR "
        "(v-prediction: /(SNR + 1)); 5 is the usual value. Default: off.", default=None, group="stages",
        resume=True, resume_default=None,
    )
    noise_offset: float = setting(
        "Noise offset: adds offset x a per-channel constant to the training noise, so the model can learn very "
        "dark or bright images; 0.05-0.1 is usual, 0 is off.", default=0.0, group="stages", minimum=0, resume=True,
        resume_default=0.0,
    )
    optimizer: str = setting(
        "'adamw', 'prodigy' (pip install prodigyopt; sets its own step size: give --learning-rates 1.0 for its "
        "usual setting) or 'adamw8bit' (pip install bitsandbytes; AdamW with 8-bit moments, less memory).",
        default="adamw", group="stages", choices=_OPTIMIZERS, resume=True, resume_default="adamw",
    )
    # -- scored checkpoints and selection (docs/guide.md "Which checkpoint? Scores and selection") ------------
    score_checkpoints: bool = setting(
        "Score the checkpoints of the last stage that trains (its start, every checkpointing_steps, its end): the "
        "score prompts at fixed seeds, scored for identity against the photos and text alignment without the "
        "token (CLIP; a toy-world concept: the world's scorers). Writes OUTPUT/scores/; logs to the trackers.",
        default=False, group="scoring",
    )
    score_prompts: tuple[str, ...] = setting(
        "Prompts to score ('{}' expands to 'TOKEN CATEGORY'; 'group: prompt' puts one in a group; group "
        "'training' counts as the training prompt, every other as new).", default=(), group="scoring",
        metavar="PROMPT", default_text="the training prompt, two new contexts, a style, a colour",
    )
    score_images: int = setting("Images per score prompt (seeds seed, seed+1, ...).", default=4, group="scoring",
                                minimum=1)
    score_clip: str = setting("CLIP of the scores: a Hub id or a folder.", default=DEFAULT_CLIP_MODEL,
                              group="scoring", metavar="MODEL")
    score_dino: str | None = setting("Also score DINO identity with this ViT (e.g. facebook/dino-vits16).",
                                     default=None, group="scoring", metavar="MODEL")
    select: str = setting(
        "The adapter written: 'last' (the end of training) or 'auto' (with score_checkpoints): of the scored "
        "checkpoints whose new-prompt identity is within select_margin of the run's best, the one with the "
        "highest new-prompt text alignment.", default="last", group="scoring", choices=SELECT_RULES,
    )
    select_margin: float = setting(
        "select auto's margin below the best new-prompt identity, as a share of the run's spread (lowest to "
        "highest; 0: the best only, 1: any).", default=SELECT_MARGIN, group="scoring",
    )
    # -- memory and speed -------------------------------------------------------------------------------------
    mixed_precision: str = setting(
        "auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 on older GPUs, no on CPU.",
        default="auto", group="memory", choices=_MIXED_PRECISION, resume=True,
    )
    gradient_checkpointing: bool | None = setting(
        "Trade compute for memory in the U-Net (low-memory setting). Default: off on SD 1.x/2.x, on on SDXL (off "
        "when compile is on: the two do not combine).", default=None, group="memory",
    )
    offload_frozen: bool = setting(
        "Keep the VAE (after the latents are cached) and the text encoder (after stage 1) on the CPU; stages 2-3 "
        "move the text encoder over once to encode the prompt (low-memory setting).", default=False, group="memory",
    )
    quantize_base: str | None = setting(
        "Store the frozen denoiser's linear weights in 8 bits (torchao's int8 weight-only, through diffusers' "
        "TorchAoConfig; `pip install torchao`): about half their bf16 memory (FLUX.1's transformer 22.2 -> 11.1 "
        "GiB), the LoRAs trained on top in full precision, as QLoRA. LoRA stages only (not --stage3 full).",
        default=None, group="memory", choices=QUANTIZE_BASE, resume=True, resume_default=None,
    )
    compile: bool = setting(
        "torch.compile the U-Net. Each stage compiles once (minutes), which the paper's 660 steps may not pay "
        "back; see the README's performance section. Not with gradient_checkpointing.", default=False, group="memory",
    )
    predict_memory: bool = setting(
        "On a GPU, log each stage's predicted peak memory at the start (attndb estimate: up to a minute of CPU) "
        "and the measured one at its end.", default=True, group="memory",
    )
    # -- output -----------------------------------------------------------------------------------------------
    save_dtype: str = setting(
        "dtype of the exported LoRA and embedding.", default="fp16", group="output", choices=_SAVE_DTYPES
    )
    checkpointing_steps: int = setting(
        "Write a resumable checkpoint every N steps of a stage (0: only at stage ends).", default=0, group="output",
        minimum=0,
    )
    checkpoints_total_limit: int | None = setting(
        "Keep at most this many checkpoints (oldest pruned first; none: all).", default=None, group="output",
        minimum=1,
    )
    resume: bool = setting("Continue from the newest complete checkpoint in output.", default=False, group="output")
    overwrite: bool = setting("Allow a non-empty output folder (its files replaced).", default=False, group="output")
    push_to_hub: str | None = setting("Hub repo id to push the adapter to when done.", default=None, group="output",
                                      metavar="REPO")
    # -- logging and samples ----------------------------------------------------------------------------------
    log_every: int = setting(
        "Read the loss back from the device every N steps (fewer host syncs).", default=10, group="logging",
        minimum=1,
    )
    validation_prompts: tuple[str, ...] = setting(
        "Prompts for the sample grids ('{}' expands to 'TOKEN CATEGORY'; quote each); empty (the flag alone) "
        "disables them.", default=DEFAULT_VALIDATION_PROMPTS, group="logging", metavar="PROMPT",
        default_text="background, style and colour changes",
    )
    validation_steps: int = setting(
        "Also write a sample grid every N steps (0: only at stage ends).", default=0, group="logging",
        minimum=0,
    )
    validation_inference_steps: int = setting(
        "Denoising steps of sample images.", default=25, group="logging", minimum=0
    )
    validation_images: int = setting(
        "Images per validation prompt (seeds seed, seed+1, ...): the grid's columns.", default=2, group="logging",
        minimum=1,
    )
    validation_guidance_scale: float | None = setting(
        "Guidance scale of sample images. Default: the family pipeline's own (SD/SDXL 7.5, SD3 7.0, Flux 3.5: "
        "FLUX.1-dev's distilled guidance).", default=None, group="logging",
    )
    report_to: str | None = setting(
        "Log loss, regularizer and learning rate with accelerate (needs that package; logs go to OUTPUT/logs).",
        default=None, group="logging", choices=_REPORT_TO,
    )
    allow_tf32: bool = setting("Allow TF32 matmuls on Ampere+ GPUs.", default=True, group="memory", flag="--tf32")

    def __post_init__(self) -> None:
        for name in ("stage1", "stage2", "stage3"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, stage_from_dict(name, value))
        for name in ("validation_prompts", "score_prompts"):  # a list from a file, one string from Python
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        for name in ("model", "images", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{arg(name)} is required (got {getattr(self, name)!r}).")
        for f in dataclasses.fields(self):  # the choices and bounds the CLI offers are the ones checked here
            choices, minimum, value = f.metadata.get("choices"), f.metadata.get("minimum"), getattr(self, f.name)
            unset = value is None and f.default is None  # None: the documented "not set" of the setting
            or_none = " or None" if f.default is None else ""
            if choices and value not in choices and not unset:
                raise ConfigError(f"{arg(f.name)} must be {' or '.join(map(repr, choices))}{or_none}, got {value!r}.")
            if minimum is not None and not unset and value < minimum:
                raise ConfigError(f"{arg(f.name)} must be >= {minimum}{or_none}, got {value}.")
        if not isinstance(self.category, str):
            raise ConfigError(f"{arg('category')} must be a string such as 'dog', got {self.category!r}.")
        # An empty category is reported by trainer.check_inputs together with every other input problem.
        self.category = " ".join(self.category.split())
        if self.token is None:
            self.token = default_token(self.category)
        elif not self.token.strip() or any(ch.isspace() for ch in self.token):
            raise ConfigError(
                f"{arg('token')} must be one word without spaces, "
                f"got {self.token!r}; e.g. {arg('token')} '<sks-dog>'."
            )
        if self.masks is not None:
            if not isinstance(self.masks, str) or not self.masks.strip():
                raise ConfigError(f"{arg('masks')} must be a folder path or None, got {self.masks!r}.")
            self.masked_loss = True  # a masks folder is only read for the masked loss
        if not isinstance(self.masked_loss, bool):
            raise ConfigError(f"{arg('masked_loss')} must be true or false, got {self.masked_loss!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"{arg('resolution')} must be a positive multiple of 8, got {self.resolution}.")
        for name, key in ((n, k) for n in ("stage1", "stage2") for k in ("steps", "learning_rate")):
            if getattr(getattr(self, name), key) is None:
                raise ConfigError(f"{name}: {arg(key)} is required.")
        # The recipe fills in what stage 3 left unset (None), so a value given (flag, file, Python) wins; the batch
        # depends on the family and is filled in by `for_model`.
        recipe, stage3 = RECIPES[self.recipe], self.stage3
        if stage3.steps is None or stage3.learning_rate is None:
            rate = recipe["learning_rates"][self.stage3_mode]
            self.stage3 = dataclasses.replace(
                stage3, steps=recipe["steps"] if stage3.steps is None else stage3.steps,
                learning_rate=rate if stage3.learning_rate is None else stage3.learning_rate,
            )
        _check_combinations(self)

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
        data["validation_prompts"], data["score_prompts"] = list(self.validation_prompts), list(self.score_prompts)
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
        unset = (self.resolution, self.batch_size, self.gradient_accumulation_steps, self.gradient_checkpointing,
                 self.validation_guidance_scale)
        return any(v is None for v in unset) or any(s.rank is None for s in (self.stage2, self.stage3))

    def for_model(self, family, resolution: int) -> AttnDBConfig:
        """This config with the defaults that depend on the base model filled in: `resolution` (None: the model's
        own, `resolution` here), the stage-2/3 LoRA ranks (None: `family.default_lora_rank`) and the batch and
        memory setting (None: the family's, the batch as `recipe` says, `recipe_batch`; gradient checkpointing
        stays off under `compile`) and the samples' guidance scale (`family.sample_guidance_scale`). What the user
        set is kept. The trainer calls it once the U-Net's config is read; attndb_config.json records the
        result."""
        return _with_model_defaults(self, family, resolution)

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


def _with_model_defaults(config: AttnDBConfig, family, resolution: int) -> AttnDBConfig:
    """`AttnDBConfig.for_model`'s work (a function here to keep the class short)."""
    stages = {
        name: dataclasses.replace(getattr(config, name), rank=family.default_lora_rank)
        for name in ("stage2", "stage3")
        if getattr(config, name).rank is None
    }
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = family.default_gradient_checkpointing and not config.compile
    batch, accumulation = recipe_batch(config.recipe, family)
    guidance = config.validation_guidance_scale
    return dataclasses.replace(
        config,
        resolution=config.resolution or resolution,
        batch_size=config.batch_size or batch,
        gradient_accumulation_steps=config.gradient_accumulation_steps or accumulation,
        gradient_checkpointing=checkpointing,
        validation_guidance_scale=family.sample_guidance_scale if guidance is None else guidance,
        **stages,
    )


def _check_combinations(config: AttnDBConfig) -> None:
    """The checks of `AttnDBConfig.__post_init__` that involve two settings."""
    if config.snr_gamma is not None and not config.snr_gamma > 0:
        raise ConfigError(f"{arg('snr_gamma')} must be > 0 (5 is usual) or None (off), got {config.snr_gamma}.")
    if config.optimizer == "prodigy" and config.stage3_train_token:  # Prodigy takes one learning rate per step
        raise ConfigError(f"{arg('optimizer')} prodigy cannot train the token at stage 1's own rate in stage 3 "
                          f"({arg('stage3_train_token')}); use adamw.")
    if config.compile and config.gradient_checkpointing:
        # measured in tests/integration/test_device_paths.py: the recompiles use up dynamo's limit at once
        raise ConfigError(
            f"{arg('compile')} and {arg('gradient_checkpointing')} cannot be combined: under gradient "
            "checkpointing torch.compile recompiles the U-Net's blocks until it gives up and the run trains "
            f"uncompiled. Drop {arg('compile')} for the low-memory setting, or drop "
            f"{arg('gradient_checkpointing')} to compile."
        )
    if config.resume and config.overwrite:
        raise ConfigError(
            f"{arg('resume')} and {arg('overwrite')} exclude each other: resume continues a run, overwrite "
            "restarts it."
        )

    if config.select == "auto" and not config.score_checkpoints:
        raise ConfigError(f"{arg('select')} auto picks from the checkpoints' scores: add {arg('score_checkpoints')}.")
    if config.select == "auto" and config.checkpoints_total_limit is not None:
        raise ConfigError(
            f"{arg('select')} auto may pick any scored checkpoint, so it keeps them all: drop "
            f"{arg('checkpoints_total_limit')} (or use {arg('select')} last)."
        )
    if config.stage3_mode == "full" and config.stage3_targets != "transformer":
        raise ConfigError(f"{arg('stage3_targets')} {config.stage3_targets} picks the layers of stage 3's LoRA; "
                          f"{arg('stage3_mode')} full trains every U-Net weight: drop one of the two.")
    if config.quantize_base and config.stage3_mode == "full":
        raise ConfigError(f"{arg('quantize_base')} keeps the base model's weights frozen in 8 bits; "
                          f"{arg('stage3_mode')} full trains them: drop one of the two.")
    if not 0 <= config.select_margin <= 1:
        raise ConfigError(f"{arg('select_margin')} must be in [0, 1] (a share of the identity spread), got "
                          f"{config.select_margin}.")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a dict, with errors that name the file. An adapter folder's
    `attndb_config.json` gives the settings of the run that wrote it (so it reproduces that run)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{arg('config')} {path}: no such file.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(
            f"{arg('config')} {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{arg('config')} {path}: expected a mapping of settings at the top level, got {type(data).__name__}."
        )
    if "format_version" in data and isinstance(data.get("settings"), dict):
        # an adapter's attndb_config.json: its "settings" are the run's AttnDBConfig
        return dict(data["settings"])
    return data


def _resume_settings() -> tuple[tuple[str, ...], dict[str, Any]]:
    fields = [f for f in dataclasses.fields(AttnDBConfig) if f.metadata.get("resume")]
    defaults = {f.name: f.metadata["resume_default"] for f in fields if "resume_default" in f.metadata}
    return tuple(f.name for f in fields), defaults


#: Settings a checkpoint must share with the run that resumes it (others, e.g. logging, may change): the fields
#: with `resume` in their metadata, in field order.
#: Values of resume settings that checkpoints written before the setting existed did not record: each field's
#: `resume_default`.
RESUME_KEYS, RESUME_DEFAULTS = _resume_settings()
