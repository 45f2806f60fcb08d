# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""One optimizer step of a stage (`TrainStep`) and what the loop around it needs: the views every step trains on
(`view_schedule`), the U-Net under DistributedDataParallel (`data_parallel_unet`) and the checks of the loss
(`check_finite`, `SkippedSteps`).

Speed choices (see benchmarks/bench_train.py): the VAE never runs in the loop (latent cache), a step's random
draws are made up front, and nothing here waits for the device: the loop reads the loss back every `log_every`
steps only.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..attention import AttentionStore
from ..config import AttnDBConfig
from ..data import LatentCache, batch_indices
from ..errors import RunError
from ..families import Conditioning
from ..regularizer import (
    attention_regularizer,
    diffusion_loss,
    diffusion_target,
    flow_matching_pair,
    flow_matching_sigmas,
    masked_diffusion_loss,
    min_snr_weights,
)
from ..stages import STAGE_NAMES
from .runtime import Runtime

__all__ = [
    "SKIPPED_STEPS_WARNING",
    "SkippedSteps",
    "TrainStep",
    "TrainingDiverged",
    "check_finite",
    "data_parallel_unet",
    "encode_prompt",
    "offload_frozen",
    "view_schedule",
]

logger = logging.getLogger(__name__)

#: fp16: share of a stage's steps the loss scaler may skip before the run warns.
SKIPPED_STEPS_WARNING = 0.1


class TrainingDiverged(RunError):
    """The loss or gradients became non-finite (CLI exit code 1). The last good checkpoint is kept."""


def view_schedule(config: AttnDBConfig, stage: int, latents: LatentCache, num_images: int, runtime: Runtime):
    """The cached views every step of the stage trains on, `[steps, batch]` on the device.

    Built on the host up front and copied once: building a step's ids from a Python list in the loop would
    copy host memory to the device every step, and that copy waits for the device to drain (a host sync),
    so the host could not queue the next step while the device works on this one."""
    acc = runtime.accelerator
    width = config.batch_size * config.gradient_accumulation_steps  # this process's passes, in order
    rows = [
        latents.view_ids(
            *batch_indices(
                step,
                width,
                num_images,
                latents.views_per_image,
                config.seed * 10 + stage,
                acc.process_index,
                acc.num_processes,
            ),
            device="cpu",
        )
        for step in range(config.stages[stage - 1].steps)
    ]
    schedule = torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.long)
    return schedule.to(runtime.device)


def data_parallel_unet(unet, runtime: Runtime, wrap: bool):
    """What a stage's training forward calls: with several processes and `wrap` (stages 2-3), the U-Net wrapped in
    torch's `DistributedDataParallel` for the stage's trainable parameters (built after the stage, so it sees
    exactly them), which averages their gradients in ~25 MB buckets while the backward pass still runs, instead
    of one blocking collective per parameter after it. Otherwise the U-Net itself (stage 1's one token vector is
    averaged in `TrainStep`, a single collective).

    Every process builds the same weights (same base model, LoRA initialised from the same seed), so the
    wrapper skips its initial broadcast of the whole U-Net (`init_sync=False`)."""
    if runtime.accelerator.num_processes == 1 or not wrap:
        return unet
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        unet,
        device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
        broadcast_buffers=False,
        init_sync=False,
        gradient_as_bucket_view=True,
    )


def encode_prompt(models, prompt_ids: list, runtime: Runtime, config: AttnDBConfig) -> Conditioning:
    """The prompt's U-Net conditioning, once per stage when the stage keeps the text side frozen."""
    for encoder in models.text_encoders:
        encoder.to(runtime.device)  # back from the CPU with offload_frozen; a no-op otherwise
    with torch.no_grad(), runtime.accelerator.autocast():
        cond = models.family.encode(models.text_encoders, prompt_ids, config.resolution)
    dtype = runtime.weight_dtype
    added = None if cond.added is None else {k: v.to(dtype) for k, v in cond.added.items()}
    return Conditioning(cond.states.to(dtype), added)


def offload_frozen(models, device: torch.device, config: AttnDBConfig, keep_text_encoder: bool) -> None:
    """With `offload_frozen`, move the frozen models the loop does not run to the CPU: the VAE always (the
    latents are cached), the text encoders unless the stage encodes through them."""
    if not config.offload_frozen:
        return
    models.vae.to("cpu")
    for encoder in models.text_encoders:
        encoder.to(device if keep_text_encoder else "cpu")


@dataclass
class TrainStep:
    """One optimizer step of a stage: `step(i)` runs step `i` and returns `(mse, reg, finite)` as device tensors
    without waiting for the device.

    Attributes:
        config (`AttnDBConfig`): the run's settings.
        stage (`int`): the stage (its settings: `config.stages[stage - 1]`).
        runtime (`Runtime`): accelerator, precision, device.
        models (`BaseModels`): the models (the frozen U-Net, `unet` below calls it).
        latents (`LatentCache`): the cached views.
        prompt_ids (`list[torch.Tensor]`): the prompt's ids in each tokenizer.
        schedule (`torch.Tensor`): the cached views of every step (`view_schedule`).
        cached_states (`Conditioning`, *optional*): the prompt's encoder states when the stage does not encode
            it (gradients then never reach the text side).
        store (`AttentionStore`, *optional*): the capture's store when the regularizer is on.
        unet: what the forward calls (`data_parallel_unet`).
        params, optimizer, lr_scheduler, generator: the stage's weights, optimizer and its schedule, noise
            generator.
        skipped (`torch.Tensor`): fp16 steps the loss scaler skipped (a device counter, added to in place).
    """

    config: AttnDBConfig
    stage: int
    runtime: Runtime
    models: object
    latents: LatentCache
    prompt_ids: list
    schedule: torch.Tensor
    cached_states: Conditioning | None
    store: AttentionStore | None
    unet: object
    params: list
    optimizer: object
    lr_scheduler: object
    generator: torch.Generator
    skipped: torch.Tensor

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, models, device = self.config, self.models, self.runtime.device
        stage_cfg = cfg.stages[self.stage - 1]
        acc, scheduler, store = self.runtime.accelerator, models.noise_scheduler, self.store
        weight_dtype = self.runtime.weight_dtype
        # The whole step's randomness is drawn up front, in the order of one pass over batch x accumulation
        # images, so accumulating N passes sees the very inputs of one pass with an N times larger batch.
        latents = self.latents.sample(self.schedule[step], self.generator)
        noise = torch.randn(latents.shape, generator=self.generator, device=device)
        snr_weights = None
        if models.family.flow_matching:  # rectified flow: x_t = (1 - t) x + t noise, predict noise - x
            normal = torch.randn((latents.shape[0],), generator=self.generator, device=device)
            sigmas = flow_matching_sigmas(normal, scheduler.config)
            noisy, target = flow_matching_pair(latents, noise, sigmas)
            timesteps = sigmas * scheduler.config.num_train_timesteps
        else:
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.generator, device=device
            )
            if cfg.noise_offset:  # drawn after the others, so that offset 0 draws nothing and keeps today's stream
                offset = torch.randn((*latents.shape[:2], 1, 1), generator=self.generator, device=device)
                noise = noise + cfg.noise_offset * offset
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = diffusion_target(scheduler, latents, noise, timesteps)
            if cfg.snr_gamma is not None:  # Min-SNR: per-sample loss weights from the timesteps (no random draws)
                snr_weights = min_snr_weights(
                    scheduler.alphas_cumprod, timesteps, cfg.snr_gamma, scheduler.config.prediction_type
                )
        # masked_loss: the subject masks of the same cached views (a lookup; no random draws, so the step's
        # images, noise and timesteps are those of the unmasked run)
        masks = None if self.latents.mask is None else self.latents.mask[self.schedule[step]]
        passes, size = cfg.gradient_accumulation_steps, cfg.batch_size
        # The passes add up to the loss of one pass over all their images: the MSE is a mean over the batch, so
        # each pass's share is divided by the number of passes; the per-layer regularizer is a sum over the
        # batch, so each pass adds its own sum. The pooled regularizer takes its statistics over the whole batch,
        # which passes cannot share: each pass pools its own images and the passes are averaged (an
        # approximation).
        reg_weight = 1.0 if cfg.regularizer == "per_layer" else 1.0 / passes
        mse_sum = reg_sum = torch.zeros((), device=device)
        unwrapped = self.unet is models.unet
        for k in range(passes):
            part = slice(k * size, (k + 1) * size)
            # under DDP (stages 2-3, several processes) only the last pass all-reduces the accumulated gradients
            last = k == passes - 1
            with nullcontext() if last or unwrapped else self.unet.no_sync():
                with acc.autocast():
                    if self.cached_states is None:  # gradients reach the spliced token through the frozen encoder
                        cond = models.family.encode(models.text_encoders, self.prompt_ids, cfg.resolution)
                    else:
                        cond = self.cached_states
                    states, added = cond.for_batch(size, weight_dtype)
                    if store is not None:
                        store.clear()
                    pred = models.family.predict(
                        self.unet, noisy[part].to(weight_dtype), timesteps[part], states, added
                    )
                    weights = None if snr_weights is None else snr_weights[part]
                    if masks is None:
                        mse = diffusion_loss(pred, target[part], weights=weights)
                    else:
                        mse = masked_diffusion_loss(pred, target[part], masks[part], weights=weights)
                    if store is not None:
                        reg = attention_regularizer(
                            *store.concept_and_category(), stage_cfg.lambda_mu, stage_cfg.lambda_var, cfg.regularizer
                        )
                    else:
                        reg = torch.zeros((), device=device)
                    loss = mse / passes + reg * reg_weight
                acc.backward(loss)
            if store is not None:
                store.clear()
            mse_sum, reg_sum = mse_sum + mse.detach() / passes, reg_sum + reg.detach() * reg_weight
        mse, reg = mse_sum, reg_sum
        if acc.num_processes > 1 and unwrapped:  # stage 1; DDP has averaged stages 2-3 already
            for p in self.params:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
        finite = torch.isfinite(mse + reg)
        if self.runtime.mixed_precision != "fp16" and grad_norm is not None:  # fp16 overflow is the scaler's job
            finite &= torch.isfinite(grad_norm)
        scaler = acc.scaler  # fp16 on a GPU: the loss scaler skips steps with overflowing gradients
        scale = scaler._scale.clone() if scaler is not None and scaler._scale is not None else None
        self.optimizer.step()
        if scale is not None:  # the scaler backs off exactly when it skipped the step; counted without a sync
            self.skipped += scaler._scale < scale
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mse.detach(), reg.detach(), finite


def check_finite(runtime: Runtime, finite: torch.Tensor, stage: int, step: int, learning_rate: float) -> None:
    """Stop the run if any step since the last check was non-finite (one host sync). With several processes
    they decide together (one collective): a process that stopped alone would leave the others waiting in
    the next collective until the timeout.

    Raises:
        TrainingDiverged: a step was non-finite.
    """
    acc = runtime.accelerator
    if acc.num_processes > 1:
        finite = acc.reduce(finite.float(), reduction="sum") == acc.num_processes
    if not bool(finite):
        raise TrainingDiverged(
            f"stage {stage} ({STAGE_NAMES[stage]}) diverged by step {step}: the loss or gradients became "
            f"non-finite. The learning rate ({learning_rate:g}) is the likely cause; lower it (--learning-rates) "
            "and resume from the last checkpoint with --resume. No adapter was written."
        )


class SkippedSteps:
    """fp16: the steps of a stage the loss scaler skipped, and the warning when there are many.

    The divergence check cannot see these steps (the scaler handles the overflow) and the LR schedule still
    advances on them, so many skips mean a stage trained far fewer steps than it reports. The processes agree:
    gradients are averaged, so an overflow on one is an overflow on all.
    """

    def __init__(self, device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.long, device=device)  # added to by `TrainStep`, on the device
        self.warned = False

    def check(self, runtime: Runtime, stage: int, steps: int) -> None:
        """Warn (once a stage) when more than `SKIPPED_STEPS_WARNING` of the stage's `steps` so far were skipped."""
        if runtime.accelerator.scaler is None or self.warned or steps == 0:
            return
        skipped = int(self.count)
        if skipped > SKIPPED_STEPS_WARNING * steps:
            self.warned = True
            if runtime.accelerator.is_main_process:
                logger.warning(
                    "stage %d (%s): the fp16 loss scaler skipped %d of the first %d steps (overflowing gradients); "
                    "those steps changed nothing but still advanced the learning-rate schedule. Lower the "
                    "learning rate (--learning-rates) or train in bf16 (--mixed-precision bf16) where the GPU has it.",
                    stage,
                    STAGE_NAMES[stage],
                    skipped,
                    steps,
                )
