# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The training loop shared by the three stages, read top to bottom in `Trainer.run`.

`train(config)` starts the runtime (accelerator, precision, device), checks the inputs, loads the base model,
caches the VAE latents of every augmentation view, then for each stage builds it (`training.stage_kinds`),
restores or skips it when resuming, runs its loop (`stage_loop`, `run_stage`) and finishes it, writing resumable
checkpoints, and finally hands the learned pieces to `export.py`.

Speed choices (see benchmarks/bench_train.py): frozen weights in the autocast dtype and trainable ones in
float32, the VAE never runs in the loop (latent cache), the prompt is encoded in every step only by a stage that
trains the token and once per stage otherwise, only the attn2 layers leave SDPA, and the loss is read back to the
host every `log_every` steps only.

Where the pieces live: `training.inputs` (checks and model defaults), `training.runtime` (accelerate, precision),
`training.stage_kinds` (one class per kind of stage), `training.step` (one optimizer step and its checks),
`training.resume` (checkpoints, resume), `training.cache` (the latent cache), `base_model` (loading the base model
and assembling its pipeline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

from . import checkpoints as ckpt
from .adapter_format import ADAPTER_FILES
from .attention import AttentionStore
from .base_model import BaseModelError, BaseModels, build_pipeline, check_base_model, load_base_models
from .config import AttnDBConfig
from .data import LatentCache
from .errors import RunError, arg
from .estimator.estimate import estimate_run
from .estimator.gpus import local_gpu
from .export import export_adapter
from .families import native_resolution
from .hub import check_repo_id, push_to_hub
from .reporting import SampleSource, format_run_summary, global_step, tracker_config, write_validation_samples
from .scoring import ScoreBook, scored_stage
from .stages import STAGE_NAMES, ConceptSplice, ConceptToken, add_concept_tokens
from .training import resume as resume_lib
from .training.cache import build_latent_cache
from .training.inputs import InputError, check_inputs, load_tokenizer, resolve_model_defaults, warn_resolution
from .training.memory import StageMemory
from .training.optimizers import for_stage
from .training.resume import ResumePoint
from .training.runtime import PROCESS_GROUP_TIMEOUT, Runtime, out_of_memory_message, start_runtime
from .training.scored import ScoredCheckpoints
from .training.stage_kinds import Stage, make_stage
from .training.step import (
    SKIPPED_STEPS_WARNING,
    SkippedSteps,
    TrainingDiverged,
    TrainStep,
    check_finite,
    data_parallel_unet,
    encode_prompt,
    offload_frozen,
    view_schedule,
)

__all__ = [
    "OUTPUT_FILES",
    "PROCESS_GROUP_TIMEOUT",
    "SKIPPED_STEPS_WARNING",
    "InputError",
    "OutOfMemory",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "check_inputs",
    "dry_run",
    "export_checkpoint",
    "load_tokenizer",
    "train",
]

logger = logging.getLogger(__name__)

#: Files of a finished run inside the output folder (removed by `overwrite`).
OUTPUT_FILES = ADAPTER_FILES


class OutOfMemory(RunError):
    """The GPU ran out of memory (CLI exit code 1); the message lists the settings that reduce memory."""


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    token: str
    stage_seconds: dict[int, float] = field(default_factory=dict)
    peak_memory_gib: float = 0.0
    memory: StageMemory | None = None  # each stage's predicted and measured peak (GPU runs)
    files: list[Path] = field(default_factory=list)
    validation_seconds: float = 0.0
    sample_files: list[Path] = field(default_factory=list)
    card_samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, path in OUT) for the model card
    batch: str = ""  # the effective batch, spelled out for the run summary
    scores: ScoreBook | None = None  # the scored checkpoints (`score_checkpoints`)
    selected: str | None = None  # the checkpoint the adapter was written from (`select` auto)


def train(config: AttnDBConfig) -> Path:
    """Run the three AttnDreamBooth stages and write the adapter folder.

    Args:
        config (`AttnDBConfig`): the run's settings.

    Returns:
        `Path`: the output folder (its files: `adapter_format.ADAPTER_FILES`, checkpoints, samples, logs).

    Raises:
        InputError: bad input found before any model is loaded; nothing is written.
        TrainingDiverged: the loss became non-finite; checkpoints written so far stay.
        hub.PushError: with `config.push_to_hub`, the push failed; the adapter folder is complete.
    """
    if config.push_to_hub:
        check_repo_id(config.push_to_hub)  # before the run, not hours later
    trainer = Trainer(config)
    output_dir = trainer.run().output_dir
    if config.push_to_hub and trainer.accelerator.is_main_process:
        logger.info("Pushed to the Hub: %s", push_to_hub(output_dir, config.push_to_hub))
    return output_dir


class Trainer:
    """Holds the models and the state shared by the stages; `run` is the whole job.

    The steps of `run` are public so that tests and benchmarks/bench_train.py can drive one stage: `prepare`,
    then per stage `build_stage`, `make_optimizer` and either `run_stage` or the step function of `stage_loop`.

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
        self.runtime: Runtime | None = None  # `prepare`
        self.models: BaseModels | None = None  # the base model's pieces, trained in place
        self.concept: ConceptToken | None = None  # the token's ids (first tokenizer)
        self.splice: ConceptSplice | None = None  # the token's trainable vector(s)
        self.prompt_ids: list[torch.Tensor] = []  # the prompt in each tokenizer
        self.latents: LatentCache | None = None  # every view's latents (`training.cache`)
        self.num_images = 0
        self.stage: Stage | None = None  # the stage built last
        self.optimizer = self.lr_scheduler = self.generator = None  # the current stage's (`make_optimizer`)
        self.skipped = SkippedSteps(torch.device("cpu"))  # fp16 steps skipped in the current stage
        self.memory: StageMemory | None = None  # predicted and measured peak per stage (GPU runs), `prepare`
        self.scoring: ScoredCheckpoints | None = None  # the checkpoint scores (`prepare`)
        self.scored: Stage | None = None  # the built stage whose checkpoints are scored

    # -------------------------------------------------------------------- views of what the objects own
    accelerator = property(lambda self: self.runtime.accelerator, doc="This process's `Accelerator`.")
    device = property(lambda self: self.runtime.device, doc="This process's device.")
    weight_dtype = property(lambda self: self.runtime.weight_dtype, doc="The frozen weights' dtype.")
    denoiser = unet = property(lambda self: self.models.denoiser, doc="The denoiser (U-Net, transformer) trained.")
    vae = property(lambda self: self.models.vae, doc="The VAE (frozen).")
    text_encoders = property(lambda self: self.models.text_encoders, doc="The text encoders (frozen).")
    text_encoder = property(lambda self: self.models.text_encoder, doc="The first text encoder.")
    tokenizers = property(lambda self: self.models.tokenizers, doc="The tokenizers (with the token).")
    tokenizer = property(lambda self: self.models.tokenizer, doc="The first tokenizer.")
    family = property(lambda self: self.models.family, doc="The base model's family.")
    noise_scheduler = property(lambda self: self.models.noise_scheduler, doc="The training noise schedule.")
    params = property(lambda self: self.stage.params, doc="The current stage's trainable parameters.")
    skipped_steps = property(lambda self: self.skipped.count, doc="fp16 steps skipped in the current stage.")

    mixed_precision = property(lambda self: self.runtime.mixed_precision, doc="Autocast precision: no, fp16, bf16.")

    # ------------------------------------------------------------------------------------ the whole job
    def run(self) -> TrainResult:
        """The whole job: `prepare`, the three stages (resuming if asked), export.

        Raises:
            OutOfMemory: CUDA ran out of memory; the message lists what reduces memory.
        """
        try:
            return self._run()
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(out_of_memory_message(self.config)) from exc

    def _run(self) -> TrainResult:
        point = self.prepare()
        for stage in (1, 2, 3):
            self.build_stage(stage)
            if point is not None and stage <= point.stage:
                self.stage.load_state(resume_lib.load_weights(point.path, self.device))
            if point is not None and stage < point.stage:
                continue  # finished before the checkpoint: its weights are restored, nothing to train
            start_step = point.step if point is not None and stage == point.stage else 0
            self.make_optimizer(stage)
            if start_step:
                resume_lib.restore_optimizer_and_rng(
                    point, self.optimizer, self.lr_scheduler, self.generator, self.accelerator.process_index,
                    self.device,
                )
            self.run_stage(stage, start_step)
        self.result.files = self.export(self.select())
        self.result.peak_memory_gib, self.result.memory = self.memory.run_peak(), self.memory
        if self.accelerator.is_main_process:
            logger.info(format_run_summary(self.result, STAGE_NAMES, self.device))
        self.accelerator.end_training()
        return self.result

    def prepare(self) -> ResumePoint | None:
        """Start accelerate, check inputs, load the models, add the token and cache the latents. Returns where to
        resume (with `resume`), else None."""
        cfg = self.config
        self.runtime = start_runtime(cfg.mixed_precision, cfg.output, cfg.report_to)
        acc = self.accelerator
        # Every process checks (they see the same files and all stop alike); nothing is written before this.
        given = self.components or {}
        cfg = self.config = resolve_model_defaults(cfg, given, announce=acc.is_main_process)
        unet_config = dict(given["unet"].config) if "unet" in given else None
        for warning in check_inputs(cfg, given.get("tokenizer"), unet_config):
            if acc.is_main_process:
                logger.warning(warning)
        acc.wait_for_everyone()
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        point = resume_lib.read_resume_point(self.output_dir, cfg, acc.num_processes) if cfg.resume else None
        at = (point.stage, point.step) if point is not None else None
        self.scoring = ScoredCheckpoints.start(cfg, acc, self.device, at)  # before anything is written
        self.result.scores = self.scoring.book
        if acc.is_main_process:
            resume_lib.prepare_output_dir(self.output_dir, cfg.overwrite)
        acc.wait_for_everyone()
        self._load_models()
        cfg = self.config  # every default is known now, even for a model whose configs could not be read above
        self.memory = StageMemory(self.device, acc.is_main_process)
        self.memory.predict(cfg)
        accumulation, processes = cfg.gradient_accumulation_steps, acc.num_processes
        self.result.batch = (
            f"{cfg.batch_size * accumulation * processes} images per optimizer step ({cfg.batch_size} per pass x "
            f"{accumulation} accumulated pass(es) x {processes} process(es))"
        )
        if acc.is_main_process:
            logger.info("Effective batch: %s", self.result.batch)
        if acc.log_with:
            acc.init_trackers("attndb", config=tracker_config(cfg))
        self.latents, self.num_images = build_latent_cache(cfg, self.family, self.vae)
        offload_frozen(self.models, self.device, cfg, keep_text_encoder=True)
        return point

    def _load_models(self) -> None:
        """Load the base model (`base_model.load_base_models`), freeze it on the device, fill in the defaults
        only the loaded models tell, and add the token to every tokenizer and text encoder."""
        cfg, is_main = self.config, self.accelerator.is_main_process
        self.models = models = load_base_models(
            cfg.model, cfg.revision, cfg.model_config, torch_dtype=self.weight_dtype, variant=cfg.variant,
            components=self.components, quantize=cfg.quantize_base,
        )
        models.family.fix_pooling(list(zip(models.tokenizers, models.text_encoders)))
        for model in (*models.text_encoders, models.vae, models.denoiser):
            model.requires_grad_(False)
            model.to(self.device)
        self.config = cfg = resolve_model_defaults(cfg, {}, models.denoiser, models.vae, announce=is_main)
        if is_main:
            warn_resolution(cfg, native_resolution(models.denoiser.config, models.vae.config))
            resume_lib.warn_full_checkpoint_disk_use(cfg, models.denoiser)
        if cfg.gradient_checkpointing:
            models.denoiser.enable_gradient_checkpointing()
        if cfg.compile:  # in place (state-dict keys unchanged); each stage's new graph recompiles on first use
            models.denoiser.compile()
        self.concept, self.splice, self.prompt_ids = add_token(models, cfg, self.device)

    # ------------------------------------------------------------------------------------------ stages
    def build_stage(self, stage: int) -> Stage:
        """Build stage `stage` (`training.stage_kinds.make_stage`) and make exactly its parameters trainable."""
        # Seed per stage so a LoRA's random init does not depend on what ran before (exact resume).
        torch.manual_seed(self.config.seed * 1000 + stage)
        self.stage = make_stage(stage, self.config, self.models, self.splice)
        self.stage.build()
        if stage == scored_stage(self.config):
            self.scored = self.stage
        return self.stage

    def make_optimizer(self, stage: int) -> None:
        """The optimizer, LR schedule and noise generator of the built stage (`training.optimizers.for_stage`)."""
        self.optimizer, self.lr_scheduler, self.generator = for_stage(
            self.config, stage, self.stage.param_groups(), self.device, self.accelerator
        )

    def run_stage(self, stage: int, start_step: int) -> None:
        """The training loop of one stage, from `start_step`: steps, logging, checkpoints, samples, the end."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        stage_cfg = cfg.stages[stage - 1]
        started = time.perf_counter()
        progress = tqdm(
            total=stage_cfg.steps,
            initial=start_step,
            desc=f"stage {stage}/3 {STAGE_NAMES[stage]}",
            disable=not acc.is_local_main_process or logger.getEffectiveLevel() > logging.INFO,
        )
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        running, since_log = torch.zeros(2, device=self.device), 0
        scoring = self.scoring.covers(stage)
        if scoring and start_step == 0:
            self.scoring.score(self.sampling(), stage, 0)
        self.memory.stage_started()
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
                    self.skipped.check(self.runtime, stage, done - start_step)
                    mse_avg, reg_avg = (running / since_log).tolist()
                    running.zero_()
                    since_log = 0
                    lr = self.lr_scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{mse_avg:.4f}", reg=f"{reg_avg:.3g}", lr=f"{lr:.1e}")
                    logger.debug("stage %d step %d: loss %.5f reg %.5g", stage, done, mse_avg, reg_avg)
                    values = {"loss": mse_avg, "regularizer": reg_avg, "lr": lr}  # to the trackers, if any
                    acc.log({f"stage{stage}/{k}": v for k, v in values.items()}, step=global_step(cfg, stage, done))
                if checkpoint_now:
                    self.save_checkpoint(stage, done)
                    if scoring:
                        self.scoring.score(self.sampling(), stage, done)
                if cfg.validation_steps and done % cfg.validation_steps == 0 and not is_last:
                    self.validate(stage, done)
        progress.close()
        if stage_cfg.steps > start_step:
            self.memory.stage_ended(stage)
        if stage_cfg.steps == 0:  # a skipped stage still leaves a checkpoint to resume after it
            self.save_checkpoint(stage, 0)
        self.result.stage_seconds[stage] = time.perf_counter() - started
        if acc.is_main_process:
            self.stage.finish()
        self.validate(stage, stage_cfg.steps, stage_end=True)

    @contextmanager
    def stage_loop(self, stage: int) -> Iterator[Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Set up the training loop of the built stage (after `build_stage` and `make_optimizer`) and yield its
        step function (`training.step.TrainStep`).

        Inside the block the prompt is encoded once (unless the stage encodes it every step: it trains the
        token), the token splice (such stages) and the attn2 capture (when the stage's regularizer is on) are
        installed and the U-Net is in train mode; all of it is undone on exit. `step(i)` runs optimizer step `i`
        of the stage and returns `(mse, reg, finite)` as device tensors without waiting for the device; the
        caller decides when to read them back. `run_stage` is the loop around it; benchmarks/bench_train.py times
        it directly.
        """
        stage_cfg = self.config.stages[stage - 1]
        use_regularizer = stage_cfg.lambda_mu > 0 or stage_cfg.lambda_var > 0
        encodes = self.stage.encodes_prompt
        cached_states = None if encodes else encode_prompt(self.models, self.prompt_ids, self.runtime, self.config)
        offload_frozen(self.models, self.device, self.config, keep_text_encoder=encodes)
        store = AttentionStore()
        splice = self.splice if encodes else nullcontext()
        family, indices = self.family, self.concept.capture_indices
        text = family.text_length(self.prompt_ids)
        capture = family.capture(self.denoiser, indices, store, text) if use_regularizer else nullcontext()
        # PEFT casts each LoRA layer's input to the LoRA weights' dtype (float32 here) and autocast casts it
        # straight back: under autocast that round trip is exact and only costs memory traffic, so skip it.
        no_input_cast = disable_input_dtype_casting(self.unet, active=self.weight_dtype != torch.float32)
        unet = data_parallel_unet(self.unet, self.runtime, self.stage.data_parallel)
        self.skipped = SkippedSteps(self.device)
        self.unet.train()
        try:
            with splice, capture, no_input_cast:
                yield TrainStep(
                    self.config, stage, self.runtime, self.models, self.latents, self.prompt_ids,
                    view_schedule(self.config, stage, self.latents, self.num_images, self.runtime),
                    cached_states, store if use_regularizer else None, unet, self.params, self.optimizer,
                    self.lr_scheduler, self.generator, self.skipped.count,
                )
        finally:
            self.unet.eval()
            del unet  # a DDP wrapper's reducer and its gradient hooks go with it

    def _check_finite(self, finite: torch.Tensor, stage: int, step: int) -> None:
        check_finite(self.runtime, finite, stage, step, self.config.stages[stage - 1].learning_rate)

    # ------------------------------------------------------------------------------------ checkpoints, samples
    def save_checkpoint(self, stage: int, step: int) -> None:
        """Write the built stage's checkpoint at `step` (`training.resume.save_checkpoint`)."""
        resume_lib.save_checkpoint(
            self.accelerator, self.output_dir, self.config, stage, step, self.stage.trainable_state,
            self.optimizer, self.lr_scheduler, self.generator,
        )

    def sampling(self) -> SampleSource:
        """What `reporting.write_validation_samples` reads: settings, the models being trained, the pipeline."""
        return SampleSource(
            self.config, self.output_dir, self.unet, [self.vae, *self.text_encoders], self.device,
            self.accelerator.autocast, self.pipeline, self.result.card_samples,
        )

    def validate(self, stage: int, step: int, stage_end: bool = False) -> None:
        """Sample grid of the validation prompts (and at a stage end the attention figure) under OUT/samples/,
        written by the main process (see reporting.py)."""
        if self.config.validation_prompts and self.accelerator.is_main_process:
            started = time.perf_counter()
            self.result.sample_files += write_validation_samples(self.sampling(), stage, step, stage_end)
            self.result.validation_seconds += time.perf_counter() - started
        self.accelerator.wait_for_everyone()

    def select(self) -> dict:
        """With `select` auto, go back to the chosen checkpoint (`training.scored`); what the export records."""
        chosen = self.scoring.choose()
        if chosen is not None:
            self.result.selected = chosen["checkpoint"]
            if not self.scoring.is_last(chosen):
                path = self.output_dir / ckpt.CHECKPOINT_DIR / chosen["checkpoint"]
                self.scored.restore(resume_lib.load_weights(path, self.device))
                if self.stage is self.scored and self.config.validation_prompts:  # main process only: no barrier
                    redrawn = write_validation_samples(self.sampling(), chosen["stage"], chosen["step"], True)
                    self.result.sample_files = list(dict.fromkeys([*self.result.sample_files, *redrawn]))
        return self.scoring.finish(chosen)

    # ------------------------------------------------------------------------------------------ export
    def pipeline(self):
        """The family's pipeline over the models being trained (adapters active, the token's current vectors
        written into the embedding matrices), with the base model's own inference scheduler."""
        self.splice.write_back()
        return build_pipeline(self.models)

    def export(self, report: dict | None = None) -> list[Path]:
        """Write the adapter folder from the built stage (main process); returns the files written."""
        files: list[Path] = []
        if self.accelerator.is_main_process:
            embeddings = [v.detach().float().cpu()[None] for v in self.splice.vectors]
            report = dict(report or {})
            lora = self.stage.export_lora(report)
            files = export_adapter(
                self.output_dir,
                self.config,
                embeddings,
                lora,
                report=report,
                samples=self.result.card_samples,
                family=self.family,
                unet_config=self.denoiser.config,
            )
        self.accelerator.wait_for_everyone()
        return files

    def export_checkpoint(self, path: Path, stage: int) -> list[Path]:
        """Load the base model, rebuild stages 1..`stage` with the checkpoint's weights and export them (the
        steps of `run` without training). Use the module function `export_checkpoint`."""
        self.runtime = start_runtime(self.config.mixed_precision)
        self._load_models()
        for built in range(1, stage + 1):
            self.build_stage(built).load_state(resume_lib.load_weights(path, self.device))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self.export({"checkpoint": path.name})


def add_token(models: BaseModels, config: AttnDBConfig, device) -> tuple[ConceptToken, ConceptSplice, list]:
    """Add the run's token to every tokenizer and text encoder of `models` (`stages.add_concept_tokens`).

    Returns:
        `(concept, splice, prompt_ids)`: the token in the tokenizer whose positions the regularizer reads (the
        family's `attended` one: CLIP-L, or Flux's T5), its trainable vectors, and the prompt in each tokenizer
        (SDXL's second pads with "!", so the ids differ after end-of-text; T5's are its own).

    Raises:
        InputError: the token exists already, or the prompt does not hold the token and category.
    """
    family = models.family
    lengths = tuple(family.prompt_length(i, t) for i, t in enumerate(models.tokenizers))
    try:
        concepts = add_concept_tokens(
            zip(models.tokenizers, models.text_encoders), config.token, config.category, config.prompt,
            config.token_init, config.seed, family.shared_positions, lengths,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    splice = ConceptSplice(models.text_encoders, [c.token_id for c in concepts]).to(device)
    return concepts[family.attended], splice, [c.prompt_ids.to(device) for c in concepts]


def dry_run(config: AttnDBConfig):
    """What `attndb train --dry-run` does: every input check of a run (images, masks, output folder, token,
    category, the base model, with `resume` the checkpoint to continue), then the memory and time estimate of its
    stages (`estimator.estimate.estimate_run`, on this machine's GPU when it has one). Nothing is loaded but
    configs and the tokenizer, and nothing is written.

    Returns:
        `estimator.estimate.Estimate`: the prediction.

    Raises:
        InputError: bad input (the message lists every problem found).
    """
    if config.push_to_hub:
        check_repo_id(config.push_to_hub)
    config = resolve_model_defaults(config, {})
    for warning in check_inputs(config):
        logger.warning(warning)
    if config.resume:
        resume_lib.read_resume_point(Path(config.output), config, 1)
    return estimate_run(config, gpu=local_gpu())


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
            f"{arg('checkpoint')} {path}: not a complete checkpoint (no state.json); give a folder such as "
            f"OUT/{ckpt.CHECKPOINT_DIR}/stage3-step250 of a run."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{arg('output')} {out}: exists and is not an empty folder; give a new or empty folder.")
    state = ckpt.read_json(path / "state.json")
    stage, step = state["stage"], state["step"]
    if stage == 1:
        raise InputError(
            f"{arg('checkpoint')} {path}: a stage-1 checkpoint holds only the token embedding, not an adapter; "
            "export a stage-2 or stage-3 checkpoint."
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
