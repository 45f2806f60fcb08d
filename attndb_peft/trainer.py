# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The one training loop, shared by the three stages.

`train(config)` checks the inputs, loads the base model, caches the VAE latents of every augmentation view,
then runs stage 1 (token embedding), stage 2 (attn2 LoRA) and stage 3 (U-Net LoRA or full) through
`Trainer.run_stage`, writing resumable checkpoints, and finally hands the learned pieces to `export.py`.

Speed choices (see benchmarks/): frozen weights in the autocast dtype and trainable ones in float32, the VAE
never runs in the loop (latent cache), the prompt is encoded once per step in stage 1 (one row, expanded to
the batch) and once per stage in stages 2-3, only the attn2 layers leave SDPA, and the loss is read back to
the host every `log_every` steps only.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch

from . import base_model
from . import checkpoints as ckpt
from .adapter_format import ADAPTER_FILES
from .attention import AttentionStore, capture_cross_attention
from .base_model import BaseModelError, check_base_model
from .config import RESUME_DEFAULTS, RESUME_KEYS, AttnDBConfig
from .data import (
    LatentCache,
    batch_indices,
    encode_views,
    image_views,
    latent_masks,
    load_image,
    load_subject_mask,
    mask_views,
    scan_image_folder,
    scan_masks,
)
from .errors import RunError, UsageError
from .families import SD, Conditioning, family_of_model, family_of_pipeline, family_of_unet_config, native_resolution
from .regularizer import attention_regularizer, diffusion_loss, diffusion_target, masked_diffusion_loss
from .reporting import check_report_to, format_run_summary, tracker_config, trackers_for, write_validation_samples
from .stages import (
    ADAPTER_STAGE2,
    ADAPTER_STAGE3,
    STAGE2_TARGET_MODULES,
    STAGE3_TARGET_MODULES,
    STAGE_NAMES,
    ConceptSplice,
    ConceptToken,
    LoraFactors,
    add_concept_tokens,
    add_lora,
    combine_loras,
    lora_factors,
    lora_from_delta,
    set_trainable,
)

__all__ = [
    "InputError",
    "OutOfMemory",
    "PROCESS_GROUP_TIMEOUT",
    "SKIPPED_STEPS_WARNING",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "check_inputs",
    "export_checkpoint",
    "train",
]

logger = logging.getLogger(__name__)

#: How long a process waits in a collective (e.g. a barrier) before the run is aborted. NCCL's default, 10
#: minutes, is shorter than what the main process may spend alone: writing a stage-3 full checkpoint (~10 GiB)
#: or the full fine-tune's export while the other processes wait in `wait_for_everyone`.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)
#: fp16: share of a stage's steps the loss scaler may skip before the run warns.
SKIPPED_STEPS_WARNING = 0.1
_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Files of a finished run inside the output folder (removed by --overwrite).
OUTPUT_FILES = ADAPTER_FILES


class InputError(UsageError):
    """Bad input or usage found before training starts (CLI exit code 2). Nothing has been written."""


class TrainingDiverged(RunError):
    """The loss or gradients became non-finite (CLI exit code 1). The last good checkpoint is kept."""


class OutOfMemory(RunError):
    """The GPU ran out of memory (CLI exit code 1); the message lists the settings that reduce memory."""


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    token: str
    stage_seconds: dict[int, float] = field(default_factory=dict)
    peak_memory_gib: float = 0.0
    files: list[Path] = field(default_factory=list)
    validation_seconds: float = 0.0
    sample_files: list[Path] = field(default_factory=list)
    card_samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, path in OUT) for the model card
    batch: str = ""  # the effective batch, spelled out for the run summary


def check_inputs(config: AttnDBConfig, tokenizer=None, unet_config: dict | None = None) -> list[str]:
    """Every problem with the run's inputs that can be found without loading the U-Net, VAE or text
    encoder: images, output folder, token, category and the training prompt's length (with the base model's
    tokenizer, or `tokenizer` when given), with `masked_loss` the subject masks, and a U-Net attndb cannot train
    (its config, or `unet_config`: inpainting/depth models). Returns warnings (e.g. SDXL with
    `--stage3 full`); raises `InputError` listing all problems."""
    problems: list[str] = []
    warnings: list[str] = []
    report = scan_image_folder(config.images, config.resolution)
    problems += report.problems
    warnings = list(report.warnings)
    if config.masked_loss and report.images:
        masks = scan_masks(report.images, config.masks)
        problems += masks.problems
        warnings += masks.warnings
    if tracker_problem := check_report_to(config.report_to):
        problems.append(tracker_problem)
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        problems.append(f"--output {out}: exists and is not a folder; choose another path.")
    elif out.is_dir() and any(out.iterdir()) and not (config.resume or config.overwrite):
        problems.append(
            f"--output {out}: folder is not empty; pass --resume to continue its run, --overwrite to replace it, "
            "or choose an empty folder."
        )
    if config.resume and ckpt.find_latest(out) is None:
        problems.append(f"--resume: no complete checkpoint in {out / ckpt.CHECKPOINT_DIR}; start without --resume.")
    try:
        if tokenizer is None:
            check_base_model(config.model, config.revision, model_config=config.model_config)  # one line if unusable
            tokenizer = load_tokenizer(config)
    except BaseModelError as exc:
        problems.append(str(exc))
    except Exception as exc:  # a broken folder: say which
        problems.append(f"--model {config.model}: cannot load its tokenizer ({type(exc).__name__}: {exc}).")
    else:
        token_ids = tokenizer(config.token, add_special_tokens=False).input_ids
        if config.token in tokenizer.get_vocab() or (len(token_ids) == 1 and token_ids[0] != tokenizer.unk_token_id):
            # a word the tokenizer already has as one token would be hijacked everywhere it appears
            problems.append(
                f"--token {config.token!r} already exists in the tokenizer of {config.model}; choose an unused "
                "token such as '<attndb-dog>'."
            )
        if not tokenizer(config.category, add_special_tokens=False).input_ids:
            problems.append(
                f"--category {config.category!r} tokenizes to nothing; give the subject's category as a word such "
                "as 'dog'."
            )
        else:
            problems += _prompt_problems(config, tokenizer)
        if re.fullmatch(r"[A-Za-z0-9]+", config.token):
            # the tokenizer splits added tokens out of any text, so 'zwx' also matches inside 'zwxy'
            warnings.append(
                f"--token {config.token!r} is plain letters/digits: it will also match inside longer words (e.g. "
                f"'{config.token}s'). A delimited token such as '<{config.token}>' avoids that."
            )
    unet_problems, unet_warnings = _unet_problems(config, unet_config)
    problems += unet_problems
    warnings += unet_warnings
    if problems:
        raise InputError("Cannot start training:\n  - " + "\n  - ".join(problems))
    return warnings


def _prompt_problems(config: AttnDBConfig, tokenizer) -> list[str]:
    """The training prompt must fit the text encoder's window (77 tokens) with the token and category in it."""
    length = len(tokenizer(config.prompt.replace(config.token, " ")).input_ids) + 1  # + the new token's id
    if length > tokenizer.model_max_length:
        return [
            f"--category {config.category!r}: the training prompt {config.prompt!r} is {length} tokens long, more "
            f"than the text encoder's {tokenizer.model_max_length}; give a shorter category (one or a few words)."
        ]
    return []


#: Full fine-tuning an SDXL U-Net (2.6 B parameters) with AdamW: fp32 weights, gradients and two moments.
_SDXL_FULL_GIB = 41


def _unet_problems(config: AttnDBConfig, unet_config: dict | None) -> tuple[list[str], list[str]]:
    """`(problems, warnings)` of the U-Net: ones attndb cannot train, and settings that will hardly fit, from the
    U-Net's config (read from the model folder when not given; nothing is said when it cannot be read: loading
    the model reports that)."""
    if unet_config is None:
        try:
            from diffusers import UNet2DConditionModel

            unet_config = UNet2DConditionModel.load_config(config.model, subfolder="unet", revision=config.revision)
        except Exception:
            return [], []
    problems, warnings = [], []
    if unet_config.get("in_channels", 4) != 4:
        problems.append(
            f"--model {config.model}: its U-Net takes {unet_config['in_channels']} input channels (an inpainting "
            "or depth model); attndb trains text-to-image models with 4 latent channels, e.g. SD 1.5 or SD 2.1."
        )
    if family_of_unet_config(unet_config) is not SD and config.stage3_mode == "full":
        warnings.append(
            f"--stage3 full on an SDXL U-Net: its AdamW state alone is about {_SDXL_FULL_GIB} GB on the device "
            "(fp32 weights, gradients and two moments), before activations; --stage3 lora (the default) trains a "
            "LoRA instead."
        )
    return problems, warnings


def load_tokenizer(config: AttnDBConfig):
    return base_model.load_tokenizer(config.model, config.revision, config.model_config)


def _resolve_mixed_precision(requested: str, device: torch.device | str | None = None) -> str:
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


def train(config: AttnDBConfig) -> Path:
    """Run the three AttnDreamBooth stages and write the adapter folder.

    Args:
        config (`AttnDBConfig`): the run's settings.

    Returns:
        `Path`: the output folder (see design.md for its files).

    Raises:
        InputError: bad input found before any model is loaded; nothing is written.
        TrainingDiverged: the loss became non-finite; checkpoints written so far stay.
        hub.PushError: with `config.push_to_hub`, the push failed; the adapter folder is complete.
    """
    if config.push_to_hub:
        from .hub import check_repo_id, push_to_hub

        check_repo_id(config.push_to_hub)  # before the run, not hours later
    trainer = Trainer(config)
    output_dir = trainer.run().output_dir
    if config.push_to_hub and trainer.accelerator.is_main_process:
        push_to_hub(output_dir, config.push_to_hub)
    return output_dir


class Trainer:
    """Holds the models and the state shared by the stages; `run` is the whole job.

    Args:
        config (`AttnDBConfig`): the run's settings.
        components (`dict`, *optional*): models already in memory, keyed like a diffusers pipeline's
            `components` (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`), used instead of loading
            `config.model`. They are trained in place (the tokenizer and text encoder gain the token).
            benchmarks/bench_train.py uses this for random-weight models; `config.model` then only names them.
    """

    def __init__(self, config: AttnDBConfig, components: dict | None = None) -> None:
        self.config = config
        self.components = components
        self.output_dir = Path(config.output)
        self.result = TrainResult(output_dir=self.output_dir, token=config.token)

    # ------------------------------------------------------------------------------------------ setup
    def run(self) -> TrainResult:
        """The whole job: `prepare`, the three stages (resuming if asked), export."""
        try:
            return self._run()
        except torch.cuda.OutOfMemoryError as exc:
            cfg = self.config
            raise OutOfMemory(
                f"CUDA ran out of memory (batch size {cfg.batch_size}, {cfg.resolution} px, gradient checkpointing "
                f"{'on' if cfg.gradient_checkpointing else 'off'}, stage 3 {cfg.stage3_mode}). Reduce memory with "
                "--gradient-checkpointing --offload-frozen (the low-memory setting), a smaller --batch-size (e.g. "
                f"{max(cfg.batch_size // 2, 1)}), a lower "
                "--resolution, or --stage3 lora instead of full. Checkpoints written so far are kept: add "
                "--gradient-checkpointing and --resume to continue (batch size and resolution must stay the same "
                "to resume; changing them needs --overwrite)."
            ) from exc

    def _run(self) -> TrainResult:
        resume = self.prepare()
        for stage in (1, 2, 3):
            self.build_stage(stage)
            if resume is not None and stage <= resume["stage"]:
                self._load_weights(resume["dir"], stage)
            if resume is not None and stage < resume["stage"]:
                continue  # finished before the checkpoint: its weights are restored, nothing to train
            start_step = resume["step"] if resume is not None and stage == resume["stage"] else 0
            self.make_optimizer(stage)
            if start_step:
                self._load_optimizer_and_rng(resume)
            self.run_stage(stage, start_step)
        self.result.files = self.export()
        if self.device.type == "cuda":
            self.result.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
        if self.accelerator.is_main_process:
            logger.info(format_run_summary(self.result, STAGE_NAMES, self.device))
        self.accelerator.end_training()
        return self.result

    def prepare(self) -> dict | None:
        """Check inputs, start accelerate, load the models, add the token and cache the latents. Returns the
        checkpoint to resume from (with `resume`), else None."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        # cpu=True without CUDA makes torchrun / `accelerate launch --multi_gpu` processes on a CPU-only machine
        # join one gloo process group (accelerate's MULTI_CPU) instead of each training alone.
        cpu = not torch.cuda.is_available()
        # accelerate's process state first: it picks this process's device, which "auto" precision then probes
        # (every rank asking GPU 0 would be wrong on mixed machines and creates a context there).
        state = PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)
        self.mixed_precision = _resolve_mixed_precision(cfg.mixed_precision, state.device)
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            cpu=cpu,
            log_with=trackers_for(cfg.report_to),
            project_config=ProjectConfiguration(project_dir=cfg.output, logging_dir=str(Path(cfg.output) / "logs")),
        )
        self.device = self.accelerator.device
        # Every process checks (they see the same files and all stop alike); nothing is written before this.
        given = self.components or {}
        cfg = self._resolve_model_defaults(given)
        unet_config = dict(given["unet"].config) if "unet" in given else None
        for warning in check_inputs(cfg, given.get("tokenizer"), unet_config):
            if self.accelerator.is_main_process:
                logger.warning(warning)
        self.accelerator.wait_for_everyone()
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        resume = self._read_resume_checkpoint() if cfg.resume else None
        if self.accelerator.is_main_process:
            self._prepare_output_dir()
        self.accelerator.wait_for_everyone()
        self._load_models()
        cfg = self.config  # every default is known now, even for a model whose configs could not be read above
        accumulation, processes = cfg.gradient_accumulation_steps, self.accelerator.num_processes
        self.result.batch = (
            f"{cfg.batch_size * accumulation * processes} images per optimizer step ({cfg.batch_size} per pass x "
            f"{accumulation} accumulated pass(es) x {processes} process(es))"
        )
        if self.accelerator.is_main_process:
            logger.info("Effective batch: %s", self.result.batch)
        if self.accelerator.log_with:
            self.accelerator.init_trackers("attndb", config=tracker_config(cfg))
        self._build_latent_cache()
        self._offload_frozen(keep_text_encoder=True)
        return resume

    def _resolve_model_defaults(self, given: dict, unet=None, vae=None) -> AttnDBConfig:
        """Fill in the defaults that depend on the base model (`AttnDBConfig.for_model`): `resolution=None` becomes
        the model's own size (`families.native_resolution`: 1024 for SDXL, 512 for SD 2.1-base, 768 for SD 2.1),
        stage-2/3 `rank=None` the family's LoRA rank, and an unset batch/accumulation/checkpointing the family's
        setting. Read from the U-Net and VAE configs alone, before the
        input checks, so that the checks, `--resume`'s comparison and attndb_config.json all see what is trained.
        A model whose configs cannot be read here is resolved from the loaded models instead (`unet`, `vae`), or
        fails to load with loading's own message. Returns the (possibly replaced) config."""
        cfg = self.config
        if not cfg.model_defaults_missing:
            return cfg
        if unet is not None:
            configs = (unet.config, vae.config if vae is not None else None)
        elif "unet" in given:
            configs = (given["unet"].config, given["vae"].config if "vae" in given else None)
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            source = cfg.model_config if base_model.is_single_file(cfg.model) and cfg.model_config else cfg.model
            try:
                configs = tuple(
                    cls.load_config(source, subfolder=sub, revision=cfg.revision)
                    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"))
                )
            except Exception:  # reported when the model is loaded
                return cfg
        family = family_of_unet_config(configs[0])
        self.config = resolved = cfg.for_model(family, native_resolution(*configs))
        if self.accelerator.is_main_process:
            if cfg.resolution is None:
                logger.info("Resolution: %d px, the base model's own (--resolution to change).", resolved.resolution)
            if (cfg.stage2.rank, cfg.stage3.rank) != (resolved.stage2.rank, resolved.stage3.rank):
                logger.info("LoRA ranks (stages 2, 3): %d, %d (the %s default; --ranks to change).",
                            resolved.stage2.rank, resolved.stage3.rank, family.name.upper())
            if None in (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing):
                logger.info("Batch %d per pass x %d accumulated, gradient checkpointing %s (the %s default; "
                            "--batch-size, --gradient-accumulation-steps, --[no-]gradient-checkpointing to change).",
                            resolved.batch_size, resolved.gradient_accumulation_steps,
                            "on" if resolved.gradient_checkpointing else "off", family.name.upper())
        return resolved

    def _prepare_output_dir(self) -> None:
        out = self.output_dir
        if self.config.overwrite and out.is_dir():
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
            for sub in (ckpt.CHECKPOINT_DIR, "samples", "logs"):
                shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)

    def _load_models(self) -> None:
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        cfg = self.config
        kwargs = {"revision": cfg.revision}
        weights = {"variant": cfg.variant, "torch_dtype": self.weight_dtype, **kwargs}
        if self.components is None and base_model.is_single_file(cfg.model):
            pipe = base_model.load_single_file(cfg.model, cfg.model_config, self.weight_dtype)
            self.family = family_of_pipeline(pipe)
            self.tokenizers, self.text_encoders = (list(t) for t in zip(*self.family.components(pipe)))
            self.vae, self.unet = pipe.vae, pipe.unet
            self.noise_scheduler = DDPMScheduler.from_pretrained(cfg.model_config, subfolder="scheduler", **kwargs)
        elif self.components is None:
            # What the family's pipeline holds: SD one tokenizer/encoder pair, SDXL two (families.py).
            self.family = family_of_model(cfg.model, cfg.revision)
            more = self.family.tokenizers[1:]  # SDXL's tokenizer_2
            self.tokenizers = [load_tokenizer(cfg)] + [
                CLIPTokenizer.from_pretrained(cfg.model, subfolder=name, **kwargs) for name in more
            ]
            self.text_encoders = [
                getattr(transformers, cls).from_pretrained(cfg.model, subfolder=name, **weights)
                for name, cls in zip(self.family.text_encoders, self.family.text_encoder_classes)
            ]
            self.vae = AutoencoderKL.from_pretrained(cfg.model, subfolder="vae", **weights)
            self.unet = UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", **weights)
            self.noise_scheduler = DDPMScheduler.from_pretrained(cfg.model, subfolder="scheduler", **kwargs)
        else:
            c = self.components
            self.family = family_of_unet_config(c["unet"].config)
            self.tokenizers = [c[name] for name in self.family.tokenizers]
            self.text_encoders = [c[name].to(dtype=self.weight_dtype) for name in self.family.text_encoders]
            self.vae = c["vae"]
            self.unet = c["unet"].to(dtype=self.weight_dtype)
            self.vae.to(dtype=self.weight_dtype)
            self.noise_scheduler = DDPMScheduler.from_config(c["scheduler"].config)
        # The first pair under its pipeline names (SD's only one): what reporting, tests and tools read.
        self.tokenizer, self.text_encoder = self.tokenizers[0], self.text_encoders[0]
        self.family.fix_pooling(list(zip(self.tokenizers, self.text_encoders)))
        for model in (*self.text_encoders, self.vae, self.unet):
            model.requires_grad_(False)
            model.to(self.device)
        cfg = self._resolve_model_defaults({}, self.unet, self.vae)
        native = native_resolution(self.unet.config, self.vae.config)
        if cfg.resolution != native and self.accelerator.is_main_process:
            logger.warning(
                "--resolution %d: %s generates at %d px (e.g. SD 2.1 at 768, SD 2.1-base at 512); training at "
                "another size usually makes the concept worse at the model's own size. Pass --resolution %d unless "
                "you mean it.",
                cfg.resolution,
                cfg.model,
                native,
                native,
            )
        self._warn_full_checkpoint_disk_use()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.compile:  # in place (state-dict keys unchanged); each stage's new graph recompiles on first use
            self.unet.compile()
        try:
            concepts = add_concept_tokens(
                zip(self.tokenizers, self.text_encoders), cfg.token, cfg.category, cfg.prompt, cfg.token_init, cfg.seed
            )
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self.concept: ConceptToken = concepts[0]
        self.splice = ConceptSplice(self.text_encoders, self.concept.token_id).to(self.device)
        # the prompt in each tokenizer (SDXL's second pads with "!", so the ids differ after end-of-text)
        self.prompt_ids = [c.prompt_ids.to(self.device) for c in concepts]
        self.base_weights: dict[str, torch.Tensor] | None = None  # stage-3 full: U-Net before stages 2-3
        self.full_export: tuple[dict[str, LoraFactors], float] | None = None  # stage-3 full: (LoRA, energy kept)

    def _build_latent_cache(self) -> None:
        cfg = self.config
        views, owner, masks = [], [], []
        paths = scan_image_folder(cfg.images, cfg.resolution).images
        sources = scan_masks(paths, cfg.masks).sources if cfg.masked_loss else []
        for i, path in enumerate(paths):
            image_views_i = image_views(
                load_image(path), cfg.resolution, cfg.flip, cfg.random_crops, seed=cfg.seed + i
            )
            views += image_views_i
            owner += [i] * len(image_views_i)
            if cfg.masked_loss:  # the same views of the subject mask (same crop boxes, resize and flips)
                subject = load_subject_mask(path, sources[i])
                masks += mask_views(subject, cfg.resolution, cfg.flip, cfg.random_crops, seed=cfg.seed + i)
        upcast = self.family.vae_fp32_encode and self.vae.dtype == torch.float16  # the SDXL VAE overflows in fp16
        if upcast:
            self.vae.to(torch.float32)
        mean, std = encode_views(self.vae, views, batch_size=cfg.batch_size)
        if upcast:
            self.vae.to(torch.float16)
        mask = latent_masks(masks, tuple(mean.shape[-2:])).to(mean.device) if cfg.masked_loss else None
        self.latents = LatentCache(
            mean,
            std,
            owner,
            self.vae.config.scaling_factor,
            getattr(self.vae.config, "shift_factor", None) or 0.0,
            mask=mask,
        )
        self.num_images = len(paths)
        logger.info("Cached %d views of %d images", len(views), len(paths))
        if mask is not None:
            masked = sum(source is not None for source in sources)
            logger.info(
                "Masked loss: %d of %d images masked (%s); mean subject share of the views %.2f",
                masked,
                len(paths),
                f"--masks {cfg.masks}" if cfg.masks else "alpha channel",
                float(mask.mean()),
            )

    # ------------------------------------------------------------------------------------------ stages
    def build_stage(self, stage: int) -> None:
        """Make exactly this stage's parameters trainable (what each trains is defined in stages.py)."""
        cfg = self.config
        stage_cfg = cfg.stages[stage - 1]
        # Seed per stage so a LoRA's random init does not depend on what ran before (exact resume).
        torch.manual_seed(cfg.seed * 1000 + stage)
        self.built_stage = stage
        if stage == 1:
            self.params = list(self.splice.vectors)
        else:
            self.splice.write_back()
            if stage == 2:
                self.params = add_lora(
                    self.unet, ADAPTER_STAGE2, stage_cfg.rank, stage_cfg.lora_alpha, STAGE2_TARGET_MODULES
                )
            elif cfg.stage3_mode == "lora":
                self.params = add_lora(
                    self.unet, ADAPTER_STAGE3, stage_cfg.rank, stage_cfg.lora_alpha, STAGE3_TARGET_MODULES
                )
                self.unet.set_adapters([ADAPTER_STAGE2, ADAPTER_STAGE3])
            else:
                self._start_full_finetune()
                self.params = list(self.unet.parameters())
            if self.trains_token(stage):  # TI+DB: the token vector(s) learn jointly with the U-Net
                self.params += self.splice.vectors
        set_trainable([self.unet, *self.text_encoders, self.vae, self.splice], self.params)
        for p in self.params:  # trainable weights live in float32; autocast computes in the weight dtype
            p.data = p.data.float()

    def make_optimizer(self, stage: int) -> None:
        """AdamW and the LR schedule of one stage, and the stage's noise generator."""
        from diffusers.optimization import get_scheduler

        cfg = self.config
        stage_cfg = cfg.stages[stage - 1]
        groups = [{"params": self.params}]
        if stage > 1 and self.trains_token(stage):  # the token at stage 1's rate, the U-Net at this stage's
            vectors = {id(v) for v in self.splice.vectors}
            token = [p for p in self.params if id(p) in vectors]
            rest = [p for p in self.params if id(p) not in vectors]
            groups = [
                {"params": rest},
                {"params": token, "lr": cfg.stage1.learning_rate, "weight_decay": cfg.stage1.weight_decay},
            ]
        optimizer = torch.optim.AdamW(
            groups,
            lr=stage_cfg.learning_rate,
            weight_decay=stage_cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.lr_scheduler = get_scheduler(
            stage_cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=stage_cfg.lr_warmup_steps,
            num_training_steps=max(stage_cfg.steps, 1),
        )
        # accelerate wraps the optimizer for fp16 loss scaling; the LR scheduler is stepped by hand (accelerate's
        # wrapper would step it once per process).
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.generator = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 1000 + stage * 100 + self.accelerator.process_index
        )

    def trains_token(self, stage: int) -> bool:
        """Whether `stage` trains the token vector: stage 1, and stage 3 with `stage3_train_token` (TI+DB). Such a
        stage encodes the prompt through the token splice every step."""
        return stage == 1 or (stage == 3 and self.config.stage3_train_token)

    def _start_full_finetune(self) -> None:
        """Stage 3 full: remember the base weights (for the export's delta), fold the stage-2 LoRA into the U-Net
        and drop the adapter, then train every U-Net weight in float32."""
        self.base_weights = {
            k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self._base_unet_state().items()
        }
        self.stage2_state = self._adapter_state(ADAPTER_STAGE2)
        self.unet.to(torch.float32)  # before fusing, so the stage-2 delta is not rounded to bf16/fp16
        self.unet.fuse_lora(adapter_names=[ADAPTER_STAGE2])
        self.unet.unload_lora()

    def _base_unet_state(self) -> dict[str, torch.Tensor]:
        """The U-Net's base weights (without LoRA tensors), with PEFT's `base_layer.` naming removed."""
        state = {}
        for name, tensor in self.unet.state_dict().items():
            if "lora_" in name:
                continue
            state[name.replace(".base_layer.", ".")] = tensor
        return state

    def _adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """One LoRA adapter's parameters under their PEFT names, prefixed `unet.` (checkpoint keys)."""
        return {f"unet.{n}": p.detach().clone() for n, p in self.unet.named_parameters() if f".{adapter_name}." in n}

    def run_stage(self, stage: int, start_step: int) -> None:
        """The training loop of one stage."""
        from tqdm.auto import tqdm

        cfg = self.config
        stage_cfg = cfg.stages[stage - 1]
        acc = self.accelerator
        started = time.perf_counter()
        progress = tqdm(
            total=stage_cfg.steps,
            initial=start_step,
            desc=f"stage {stage}/3 {STAGE_NAMES[stage]}",
            disable=not acc.is_local_main_process or logger.getEffectiveLevel() > logging.INFO,
        )
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        running, since_log = torch.zeros(2, device=self.device), 0
        with self.stage_loop(stage) as train_step:
            for step in range(start_step, stage_cfg.steps):
                mse, reg, ok = train_step(step)
                finite &= ok
                running += torch.stack([mse, reg])
                since_log += 1

                done = step + 1
                progress.update(1)
                is_last = done == stage_cfg.steps
                checkpoint_now = is_last or (cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0)
                if done % cfg.log_every == 0 or checkpoint_now:  # the only host syncs of the loop
                    self._check_finite(finite, stage, done)
                    self._check_skipped(stage, done - start_step)
                    mse_avg, reg_avg = (running / since_log).tolist()
                    running.zero_()
                    since_log = 0
                    progress.set_postfix(
                        loss=f"{mse_avg:.4f}", reg=f"{reg_avg:.3g}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.1e}"
                    )
                    logger.debug("stage %d step %d: loss %.5f reg %.5g", stage, done, mse_avg, reg_avg)
                    self._log_metrics(stage, done, mse_avg, reg_avg)
                if checkpoint_now:
                    self.save_checkpoint(stage, done)
                if cfg.validation_steps and done % cfg.validation_steps == 0 and not is_last:
                    self.validate(stage, done)
        progress.close()
        if stage_cfg.steps == 0:  # a skipped stage still leaves a checkpoint to resume after it
            self.save_checkpoint(stage, 0)
        self.result.stage_seconds[stage] = time.perf_counter() - started
        if stage == 3 and cfg.stage3_mode == "full" and acc.is_main_process:
            self.use_full_export()  # the final samples come from what is exported
        self.validate(stage, stage_cfg.steps, stage_end=True)

    def _log_metrics(self, stage: int, step: int, loss: float, reg: float) -> None:
        """Send loss, regularizer and learning rate to the trackers of --report-to (a no-op without any);
        the step axis runs on across stages."""
        lr = self.lr_scheduler.get_last_lr()[0]
        values = {f"stage{stage}/loss": loss, f"stage{stage}/regularizer": reg, f"stage{stage}/lr": lr}
        self.accelerator.log(values, step=sum(s.steps for s in self.config.stages[: stage - 1]) + step)

    def validate(self, stage: int, step: int, stage_end: bool = False) -> None:
        """Sample grid of the validation prompts (and at a stage end the attention figure) under OUT/samples/,
        written by the main process (see reporting.py)."""
        if self.config.validation_prompts and self.accelerator.is_main_process:
            started = time.perf_counter()
            self.result.sample_files += write_validation_samples(self, stage, step, stage_end)
            self.result.validation_seconds += time.perf_counter() - started
        self.accelerator.wait_for_everyone()

    @contextmanager
    def stage_loop(self, stage: int) -> Iterator[Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Set up the training loop of one stage (after `build_stage` and `make_optimizer`) and yield its step
        function.

        Inside the block the prompt is encoded once (stages 2-3: the text side is frozen), the token splice
        (stage 1) and the attn2 capture (when the stage's regularizer is on) are installed and the U-Net is in
        train mode; all of it is undone on exit. `step(i)` runs optimizer step `i` of the stage and returns
        `(mse, reg, finite)` as device tensors without waiting for the device; the caller decides when to read
        them back. `run_stage` is the loop around it; benchmarks/bench_train.py times it directly.
        """
        from peft.helpers import disable_input_dtype_casting

        stage_cfg = self.config.stages[stage - 1]
        use_regularizer = stage_cfg.lambda_mu > 0 or stage_cfg.lambda_var > 0
        encodes = self.trains_token(stage)
        cached_states = None
        if not encodes:
            cached_states = self._encode_prompt()
        self._offload_frozen(keep_text_encoder=encodes)
        store = AttentionStore()
        splice = self.splice if encodes else nullcontext()
        capture = (
            capture_cross_attention(self.unet, self.concept.capture_indices, store)
            if use_regularizer
            else nullcontext()
        )
        # PEFT casts each LoRA layer's input to the LoRA weights' dtype (float32 here) and autocast casts it
        # straight back: under autocast that round trip is exact and only costs memory traffic, so skip it.
        no_input_cast = disable_input_dtype_casting(self.unet, active=self.weight_dtype != torch.float32)
        unet = self._data_parallel_unet(stage)
        # fp16 steps the loss scaler skipped in this stage (a device counter; see _check_skipped)
        self.skipped_steps, self._warned_skipped = torch.zeros((), dtype=torch.long, device=self.device), False
        self.unet.train()
        try:
            with splice, capture, no_input_cast:
                yield partial(
                    self._train_step,
                    stage,
                    view_schedule=self._view_schedule(stage),
                    cached_states=cached_states,
                    store=store if use_regularizer else None,
                    unet=unet,
                )
        finally:
            self.unet.eval()
            del unet  # a DDP wrapper's reducer and its gradient hooks go with it

    def _data_parallel_unet(self, stage: int):
        """What the stage's training forward calls: with several processes in stages 2-3, the U-Net wrapped in
        torch's `DistributedDataParallel` for this stage's trainable parameters (built after `build_stage`, so
        it sees exactly them), which averages their gradients in ~25 MB buckets while the backward pass still
        runs, instead of one blocking collective per parameter after it. Otherwise the U-Net itself (stage 1's
        one token vector is averaged in `_train_step`, a single collective).

        Every process builds the same weights (same base model, LoRA initialised from the same seed), so the
        wrapper skips its initial broadcast of the whole U-Net (`init_sync=False`)."""
        if self.accelerator.num_processes == 1 or stage == 1:
            return self.unet
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            self.unet,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
            init_sync=False,
            gradient_as_bucket_view=True,
        )

    def _view_schedule(self, stage: int) -> torch.Tensor:
        """The cached views every step of the stage trains on, `[steps, batch]` on the device.

        Built on the host up front and copied once: building a step's ids from a Python list in the loop would
        copy host memory to the device every step, and that copy waits for the device to drain (a host sync),
        so the host could not queue the next step while the device works on this one."""
        cfg, acc = self.config, self.accelerator
        rows = [
            self.latents.view_ids(
                *batch_indices(
                    step,
                    cfg.batch_size * cfg.gradient_accumulation_steps,  # this process's passes, in order
                    self.num_images,
                    self.latents.views_per_image,
                    cfg.seed * 10 + stage,
                    acc.process_index,
                    acc.num_processes,
                ),
                device="cpu",
            )
            for step in range(cfg.stages[stage - 1].steps)
        ]
        width = cfg.batch_size * cfg.gradient_accumulation_steps
        schedule = torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.long)
        return schedule.to(self.device)

    def _encode_prompt(self) -> Conditioning:
        """The prompt's U-Net conditioning, once per stage in stages 2-3 (the text side is frozen there)."""
        for encoder in self.text_encoders:
            encoder.to(self.device)  # back from the CPU with offload_frozen; a no-op otherwise
        with torch.no_grad(), self.accelerator.autocast():
            cond = self.family.encode(self.text_encoders, self.prompt_ids, self.config.resolution)
        added = None if cond.added is None else {k: v.to(self.weight_dtype) for k, v in cond.added.items()}
        return Conditioning(cond.states.to(self.weight_dtype), added)

    def _offload_frozen(self, keep_text_encoder: bool) -> None:
        """With `offload_frozen`, move the frozen models the loop does not run to the CPU: the VAE always (the
        latents are cached), the text encoder unless the stage encodes through it (stage 1)."""
        if not self.config.offload_frozen:
            return
        self.vae.to("cpu")
        for encoder in self.text_encoders:
            encoder.to(self.device if keep_text_encoder else "cpu")

    def _train_step(
        self,
        stage: int,
        step: int,
        view_schedule: torch.Tensor,
        cached_states: Conditioning | None,
        store: AttentionStore | None,
        unet=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step (see `stage_loop`). `view_schedule`: the cached views of every step;
        `cached_states`: the prompt's encoder states (stages 2-3; stage 1 encodes through the splice); `store`:
        the capture's store when the regularizer is on; `unet`: what the forward calls (`_data_parallel_unet`,
        default the U-Net)."""
        unet = self.unet if unet is None else unet
        cfg = self.config
        stage_cfg = cfg.stages[stage - 1]
        acc = self.accelerator
        # The whole step's randomness is drawn up front, in the order of one pass over batch x accumulation images,
        # so accumulating N passes sees the very inputs of one pass with an N times larger batch.
        latents = self.latents.sample(view_schedule[step], self.generator)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=self.generator,
            device=self.device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        # masked_loss: the subject masks of the same cached views (a lookup; no random draws, so the step's
        # images, noise and timesteps are those of the unmasked run)
        masks = None if self.latents.mask is None else self.latents.mask[view_schedule[step]]
        passes, size = cfg.gradient_accumulation_steps, cfg.batch_size
        # The passes add up to the loss of one pass over all their images: the MSE is a mean over the batch, so
        # each pass's share is divided by the number of passes; the per-layer regularizer is a sum over the batch,
        # so each pass adds its own sum. The pooled regularizer takes its statistics over the whole batch, which
        # passes cannot share: each pass pools its own images and the passes are averaged (an approximation).
        reg_weight = 1.0 if cfg.regularizer == "per_layer" else 1.0 / passes
        mse_sum = reg_sum = torch.zeros((), device=self.device)
        for k in range(passes):
            part = slice(k * size, (k + 1) * size)
            # under DDP (stages 2-3, several processes) only the last pass all-reduces the accumulated gradients
            last = k == passes - 1
            with nullcontext() if last or unet is self.unet else unet.no_sync():
                with acc.autocast():
                    if cached_states is None:  # gradients reach the spliced token vector through the frozen encoder
                        cond = self.family.encode(self.text_encoders, self.prompt_ids, cfg.resolution)
                    else:
                        cond = cached_states
                    states, added = cond.for_batch(size, self.weight_dtype)
                    if store is not None:
                        store.clear()
                    pred = unet(noisy[part].to(self.weight_dtype), timesteps[part], states, added_cond_kwargs=added)
                    if masks is None:
                        mse = diffusion_loss(pred.sample, target[part])
                    else:
                        mse = masked_diffusion_loss(pred.sample, target[part], masks[part])
                    if store is not None:
                        reg = attention_regularizer(
                            *store.concept_and_category(), stage_cfg.lambda_mu, stage_cfg.lambda_var, cfg.regularizer
                        )
                    else:
                        reg = torch.zeros((), device=self.device)
                    loss = mse / passes + reg * reg_weight
                acc.backward(loss)
            if store is not None:
                store.clear()
            mse_sum, reg_sum = mse_sum + mse.detach() / passes, reg_sum + reg.detach() * reg_weight
        mse, reg = mse_sum, reg_sum
        if acc.num_processes > 1 and unet is self.unet:  # stage 1; DDP has averaged stages 2-3 already
            for p in self.params:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
        finite = torch.isfinite(mse + reg)
        if self.mixed_precision != "fp16" and grad_norm is not None:  # fp16 overflow is the scaler's job
            finite &= torch.isfinite(grad_norm)
        scaler = acc.scaler  # fp16 on a GPU: the loss scaler skips steps with overflowing gradients
        scale = scaler._scale.clone() if scaler is not None and scaler._scale is not None else None
        self.optimizer.step()
        if scale is not None:  # the scaler backs off exactly when it skipped the step; counted without a sync
            self.skipped_steps += scaler._scale < scale
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mse.detach(), reg.detach(), finite

    def _check_finite(self, finite: torch.Tensor, stage: int, step: int) -> None:
        """Stop the run if any step since the last check was non-finite (one host sync). With several processes
        they decide together (one collective): a process that stopped alone would leave the others waiting in
        the next collective until the timeout."""
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite.float(), reduction="sum") == self.accelerator.num_processes
        if not bool(finite):
            lr = self.config.stages[stage - 1].learning_rate
            raise TrainingDiverged(
                f"stage {stage} ({STAGE_NAMES[stage]}) diverged by step {step}: the loss or gradients became "
                f"non-finite. The learning rate ({lr:g}) is the likely cause; lower it (--learning-rates) and "
                "resume from the last checkpoint with --resume. No adapter was written."
            )

    def _check_skipped(self, stage: int, steps: int) -> None:
        """fp16: warn (once a stage) when the loss scaler skipped more than `SKIPPED_STEPS_WARNING` of the stage's
        steps so far. The divergence check cannot see these steps (the scaler handles the overflow) and the LR
        schedule still advances on them, so many skips mean a stage trained far fewer steps than it reports.
        The processes agree: gradients are averaged, so an overflow on one is an overflow on all."""
        if self.accelerator.scaler is None or self._warned_skipped or steps == 0:
            return
        skipped = int(self.skipped_steps)
        if skipped > SKIPPED_STEPS_WARNING * steps:
            self._warned_skipped = True
            if self.accelerator.is_main_process:
                logger.warning(
                    "stage %d (%s): the fp16 loss scaler skipped %d of the first %d steps (overflowing gradients); "
                    "those steps changed nothing but still advanced the learning-rate schedule. Lower the "
                    "learning rate (--learning-rates) or train in bf16 (--mixed-precision bf16) where the GPU has it.",
                    stage,
                    STAGE_NAMES[stage],
                    skipped,
                    steps,
                )

    # ------------------------------------------------------------------------------------------ checkpoints
    def _warn_full_checkpoint_disk_use(self) -> None:
        """A `--stage3 full` checkpoint holds the U-Net and its AdamW moments (~10 GB for SD): say what periodic
        ones will take when nothing prunes them, instead of filling the disk silently."""
        cfg = self.config
        if cfg.stage3_mode != "full" or not cfg.checkpointing_steps or cfg.checkpoints_total_limit is not None:
            return
        count = cfg.stage3.steps // cfg.checkpointing_steps
        if count < 2 or not self.accelerator.is_main_process:
            return
        per_checkpoint = sum(p.numel() for p in self.unet.parameters()) * 4 * 3 / 1e9  # fp32 weights + 2 moments
        logger.warning(
            "--stage3 full with --checkpointing-steps %d: %d stage-3 checkpoints of ~%.1f GB each (~%.0f GB), all "
            "kept. Add --checkpoints-total-limit 2 to keep only the newest two.",
            cfg.checkpointing_steps,
            count,
            per_checkpoint,
            count * per_checkpoint,
        )

    def _trainable_state(self, stage: int) -> dict[str, torch.Tensor]:
        """Every tensor learned so far: the token vector, the LoRA parameters under their PEFT names and, in
        stage 3 full, the whole U-Net."""
        state = {_token_key(i): v.detach() for i, v in enumerate(self.splice.vectors)}
        if stage == 2 or (stage == 3 and self.config.stage3_mode == "lora"):
            state.update(self._adapter_state(ADAPTER_STAGE2))
        if stage == 3 and self.config.stage3_mode == "lora":
            state.update(self._adapter_state(ADAPTER_STAGE3))
        if stage == 3 and self.config.stage3_mode == "full":
            state.update(self.stage2_state)
            state.update({f"unet_full.{k}": v for k, v in self.unet.state_dict().items()})
        return state

    def save_checkpoint(self, stage: int, step: int) -> None:
        acc = self.accelerator
        tmp = ckpt.temporary_dir(self.output_dir, stage, step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng_tensors, rng_plain = ckpt.rng_state_to_files(self.generator)
        ckpt.save_tensors(tmp / f"rng-{acc.process_index}.safetensors", rng_tensors)
        ckpt.write_json_atomic(tmp / f"rng-{acc.process_index}.json", rng_plain)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.save_tensors(tmp / "weights.safetensors", self._trainable_state(stage))
            opt_tensors, opt_plain = ckpt.optimizer_state_to_files(self.optimizer.optimizer)
            ckpt.save_tensors(tmp / "optimizer.safetensors", opt_tensors)
            ckpt.write_json_atomic(tmp / "optimizer.json", opt_plain)
            settings = self.config.to_dict()
            ckpt.commit(
                tmp,
                {
                    "stage": stage,
                    "step": step,
                    "num_processes": acc.num_processes,
                    "lr_scheduler": self.lr_scheduler.state_dict(),
                    "settings": {k: settings[k] for k in RESUME_KEYS},
                    "config": settings,  # everything, for `attndb export --checkpoint`
                },
            )
            ckpt.prune(self.output_dir, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()

    def _read_resume_checkpoint(self) -> dict:
        path = ckpt.find_latest(self.output_dir)
        state = ckpt.read_json(path / "state.json")
        settings = self.config.to_dict()
        # settings added after a checkpoint was written count as their defaults there
        written = {**RESUME_DEFAULTS, **state["settings"]}
        # More (or fewer) stage-3 steps extend a run: the rest of stage 3 must match, and the checkpoint must not
        # lie beyond the new end of stage 3 (pick an earlier step with `attndb export --checkpoint` instead).
        written["stage3"] = {**written["stage3"], "steps": settings["stage3"]["steps"]}
        changed = [k for k in RESUME_KEYS if written.get(k) != settings[k]]
        if changed:
            raise InputError(
                f"--resume: {path} was written with different settings ({', '.join(changed)}); use the same "
                "settings, or start over with --overwrite."
            )
        if state["num_processes"] != self.accelerator.num_processes:
            raise InputError(
                f"--resume: {path} was written by {state['num_processes']} process(es), this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        logger.info("Resuming from %s", path)
        stage, step = state["stage"], state["step"]
        steps3, planned3 = self.config.stage3.steps, state["settings"]["stage3"]["steps"]
        if stage == 3 and step > steps3:
            raise InputError(
                f"--resume: {path} is at stage-3 step {step}, beyond the {steps3} stage-3 steps asked for; ask for "
                f"at least {step}, or export that checkpoint (or an earlier one) with `attndb export --checkpoint`."
            )
        if steps3 != planned3:
            logger.info("Stage 3: %d steps instead of the %d the checkpoint's run planned.", steps3, planned3)
            if self.config.stage3.lr_scheduler not in ("constant", "constant_with_warmup"):
                logger.warning(
                    "The stage-3 learning-rate schedule (%s) is laid out over the new %d steps, so from step %d it "
                    "differs from the schedule the run had.",
                    self.config.stage3.lr_scheduler,
                    steps3,
                    step if stage == 3 else 0,
                )
        if step >= self.config.stages[stage - 1].steps and stage < 3:
            # The stage was finished: its weights are restored and the next stage starts from step 0.
            return {"dir": path, "stage": stage + 1, "step": 0, "state": state}
        return {"dir": path, "stage": stage, "step": step, "state": state}

    def _load_weights(self, path: Path, stage: int) -> None:
        """Restore what `stage` learned from a checkpoint, right after `build_stage(stage)`."""
        weights = ckpt.load_tensors(path / "weights.safetensors", self.accelerator.device)
        with torch.no_grad():
            if self.trains_token(stage):
                for i, vector in enumerate(self.splice.vectors):
                    vector.copy_(weights[_token_key(i)])
            if stage == 3 and self.config.stage3_mode == "full":
                full = {k[len("unet_full.") :]: v for k, v in weights.items() if k.startswith("unet_full.")}
                if full:
                    self.unet.load_state_dict(full)
            elif stage > 1:
                adapter = ADAPTER_STAGE2 if stage == 2 else ADAPTER_STAGE3
                for name, param in self.unet.named_parameters():
                    key = f"unet.{name}"
                    if f".{adapter}." in name and key in weights:
                        param.copy_(weights[key])

    def _load_optimizer_and_rng(self, resume: dict) -> None:
        path, state = resume["dir"], resume["state"]
        ckpt.load_optimizer_state(
            self.optimizer.optimizer,
            ckpt.load_tensors(path / "optimizer.safetensors", self.accelerator.device),
            ckpt.read_json(path / "optimizer.json"),
        )
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        index = self.accelerator.process_index
        ckpt.load_rng_state(
            self.generator,
            ckpt.load_tensors(path / f"rng-{index}.safetensors"),
            ckpt.read_json(path / f"rng-{index}.json"),
        )

    # ------------------------------------------------------------------------------------------ export
    def pipeline(self):
        """The family's pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`) over the models being
        trained (adapters active, the token's current vectors written into the embedding matrices), with the base
        model's own inference scheduler."""
        import diffusers

        cfg = self.config
        self.splice.write_back()
        pipeline_class = getattr(diffusers, self.family.pipeline_class)
        source = base_model.config_source(cfg.model, cfg.model_config)
        _, scheduler_class = pipeline_class.load_config(source, revision=cfg.revision)["scheduler"]
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(
            source, subfolder="scheduler", revision=cfg.revision
        )
        text = {
            **dict(zip(self.family.tokenizers, self.tokenizers)),
            **dict(zip(self.family.text_encoders, self.text_encoders)),
            **self.family.no_safety_checker(),
        }
        return pipeline_class(vae=self.vae, unet=self.unet, scheduler=scheduler, **text)

    def export(self, report: dict | None = None) -> list[Path]:
        from .export import export_adapter

        files: list[Path] = []
        if self.accelerator.is_main_process:
            cfg = self.config
            embeddings = [v.detach().float().cpu()[None] for v in self.splice.vectors]
            report = dict(report or {})
            if self.built_stage == 2:  # a stage-2 checkpoint being exported
                lora = combine_loras(lora_factors(self.unet, ADAPTER_STAGE2))
            elif cfg.stage3_mode == "lora":
                lora = combine_loras(lora_factors(self.unet, ADAPTER_STAGE2), lora_factors(self.unet, ADAPTER_STAGE3))
            else:
                if self.full_export is None:
                    self.use_full_export()
                lora, report["full_export_retained"] = self.full_export
            files = export_adapter(
                self.output_dir,
                cfg,
                embeddings,
                lora,
                report=report,
                samples=self.result.card_samples,
                family=self.family,
                unet_config=self.unet.config,
            )
        self.accelerator.wait_for_everyone()
        return files

    def export_checkpoint(self, path: Path, stage: int) -> list[Path]:
        """Load the base model, rebuild stages 1..`stage` with the checkpoint's weights and export them (the
        steps of `run` without training). Use the module function `export_checkpoint`."""
        from accelerate import Accelerator

        self.mixed_precision = _resolve_mixed_precision(self.config.mixed_precision)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)
        self._load_models()
        for built in range(1, stage + 1):
            self.build_stage(built)
            self._load_weights(path, built)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        report = {"checkpoint": path.name}
        return self.export(report)

    def use_full_export(self) -> None:
        """Stage 3 full, at the end of the stage (main process): compute the exported LoRA (`full_export`) and
        put exactly what it makes into the in-memory U-Net, so the final samples and the model card show what
        the adapter does: every weight becomes base + the LoRA's delta (at `save_dtype`, as the file holds it);
        biases and norms, which a LoRA cannot carry, go back to the base model's. The stage's last checkpoint
        keeps the fine-tuned weights."""
        cfg = self.config
        lora, retained = self._full_export_lora()
        self.full_export = (lora, retained)
        logger.info(
            "Stage 3 full: the rank-%d LoRA export keeps %.1f%% of the U-Net delta's energy (squared Frobenius "
            "norm); the final samples show the exported LoRA.",
            cfg.full_export_rank,
            100 * retained,
        )
        dtype = _SAVE_DTYPES[cfg.save_dtype]
        with torch.no_grad():
            for name, param in self.unet.named_parameters():
                value = self.base_weights[name].to(param.device, param.dtype)
                factors = lora.get(name.removesuffix(".weight"))
                if factors is not None:  # the LoRA as saved: factors rounded to save_dtype
                    saved = LoraFactors(factors.down.to(dtype), factors.up.to(dtype), factors.scale)
                    value = value + saved.delta().to(param.device, param.dtype)
                param.copy_(value)

    def _full_export_lora(self) -> tuple[dict[str, LoraFactors], float]:
        """Stage 3 full: the rank-`full_export_rank` LoRA of every U-Net linear/conv weight that changed in
        stages 2-3 (final - base), and the share of the change's energy (squared Frobenius norm) it keeps.

        Each delta is formed and factorized on the training device, one weight at a time (the base weights wait
        in CPU memory); only the factors come back to the CPU."""
        rank = self.config.full_export_rank
        lora: dict[str, LoraFactors] = {}
        kept, total = 0.0, 0.0
        with torch.no_grad():
            for name, tensor in self.unet.state_dict().items():
                if not (name.endswith(".weight") and tensor.ndim in (2, 4)):
                    continue
                delta = tensor.float() - self.base_weights[name].to(tensor.device)
                norm = float(delta.square().sum())
                if norm == 0:
                    continue
                factors, retained = lora_from_delta(delta, rank)
                lora[name.removesuffix(".weight")] = LoraFactors(factors.down.cpu(), factors.up.cpu())
                kept, total = kept + retained * norm, total + norm
        return lora, (kept / total if total else 1.0)


def _token_key(index: int) -> str:
    """A checkpoint's key for the token vector of text encoder `index` (SD's only one keeps its old name)."""
    return "token_embedding" if index == 0 else f"token_embedding_{index + 1}"


def export_checkpoint(
    checkpoint: str | Path, output: str | Path, model: str | None = None, model_config: str | None = None
) -> list[Path]:
    """Write the adapter folder of a training checkpoint: the same files a finished run writes, loadable with
    `load_attndb`, so any step can be picked (e.g. an earlier stage-3 step when the end over-fits).

    Args:
        checkpoint: a checkpoint folder, `OUT/checkpoints/stage{2,3}-step{K}` (stage 1 holds only the token).
        output: the adapter folder to write (new or empty).
        model (`str`, *optional*): the base model, when it is no longer where the run found it.
        model_config (`str`, *optional*): with a single-file `model`, its diffusers config (folder or Hub id).

    Returns:
        `list[Path]`: the files written.

    Raises:
        InputError: not a checkpoint, a stage-1 checkpoint, a non-empty output folder or an unusable base model;
            nothing is written.
    """
    path, out = Path(checkpoint), Path(output)
    if not (path / "state.json").is_file():
        raise InputError(
            f"--checkpoint {path}: not a complete checkpoint (no state.json); give a folder such as "
            f"OUT/{ckpt.CHECKPOINT_DIR}/stage3-step250 of a run."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--output {out}: exists and is not an empty folder; give a new or empty folder.")
    state = ckpt.read_json(path / "state.json")
    stage, step = state["stage"], state["step"]
    if stage == 1:
        raise InputError(
            f"--checkpoint {path}: a stage-1 checkpoint holds only the token embedding, not an adapter; export a "
            "stage-2 or stage-3 checkpoint."
        )
    # Checkpoints written before "config" was stored have the resume settings; the rest take their defaults.
    values = {**state["settings"], **state.get("config", {})}
    values.update(output=str(out), resume=False, overwrite=False, push_to_hub=None)
    values.setdefault("images", str(path))  # not read: exporting needs no images
    if model:
        values["model"] = model
    if model_config:
        values["model_config"] = model_config
    config = AttnDBConfig.from_dict(values, source=str(path / "state.json"))
    trained = [s.steps for s in config.stages]  # the card and attndb_config.json record what was trained
    trained[stage - 1] = step
    trained[stage:] = [0] * (3 - stage)
    config = config.with_stage_values(steps=trained)
    try:
        check_base_model(config.model, config.revision, model_config=config.model_config)
    except BaseModelError as exc:
        raise InputError(str(exc)) from None
    return Trainer(config).export_checkpoint(path, stage)
