# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""A run's models and steps rebuilt for counting: the base model from its configs alone (no weights) and each
phase of a run — the latent cache, the three stages, the sample grids — as the trainer runs it, step for step.

The steps mirror `training.step.TrainStep` and the stage classes of `training.stage_kinds` (frozen weights in the
autocast dtype, trainable ones in float32, the attn2 capture with its float32 scores, the token spliced into the
prompt in the stages that train it, the passes of gradient accumulation, AdamW, gradient clipping); the stage-2
and stage-3 LoRAs are injected by the same `stages.add_lora` with the same target modules. The functions take a
device, so the same step runs on `meta` (the estimate) and on real CPU tensors (tests/unit/test_estimator.py
checks that both count the same bytes, and that the count matches a real `Trainer` step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import AttentionStore, capture_cross_attention
from ..base_model import BaseModelError, config_source, is_single_file
from ..config import AttnDBConfig
from ..data import scan_image_folder
from ..errors import arg
from ..families import ModelFamily, family_of_unet_config, native_resolution
from ..regularizer import attention_regularizer, diffusion_loss
from ..stages import (
    ADAPTER_STAGE2,
    ADAPTER_STAGE3,
    STAGE2_TARGET_MODULES,
    STAGE3_TARGETS,
    ConceptSplice,
    add_lora,
    set_trainable,
)
from .accounting import CudaAutocast, StepCount, count_flops, count_step

__all__ = ["ModelConfigs", "Phase", "RunModels", "build_models", "count_phase", "read_model_configs"]

#: Position of `[V]` and the category in "a photo of a [V] [category]" (after the start token).
_TOKEN_POSITION = 5
#: Images assumed in the latent cache when the run's folder cannot be read (the most the method is meant for).
ASSUMED_IMAGES = 20


@dataclass
class ModelConfigs:
    """The configs of a base model's components: all the estimate reads of it.

    Attributes:
        family (`ModelFamily`): SD 1.x/2.x or SDXL.
        unet (`dict`): the U-Net's config.
        vae (`dict`): the VAE's config.
        text_encoders (`list`): the transformers config of each text encoder, in the family's order.
        source (`str`): where they were read (a folder or Hub id).
    """

    family: ModelFamily
    unet: dict
    vae: dict
    text_encoders: list
    source: str

    @property
    def resolution(self) -> int:
        return native_resolution(self.unet, self.vae)


def read_model_configs(model: str, revision: str | None = None, model_config: str | None = None) -> ModelConfigs:
    """Read the component configs of a base model: a diffusers folder, a Hub id (its `config.json` files only,
    from the Hub or its cache) or, for a single `.safetensors` file, `model_config`.

    Raises:
        BaseModelError: the configs cannot be read (the message names the model and what to do).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig

    if is_single_file(model) and not model_config:
        raise BaseModelError(
            f"{arg('model')} {model}: a single-file checkpoint needs {arg('model_config')} (a diffusers folder or Hub "
            "id of the same architecture) for its component configs."
        )
    source = config_source(model, model_config)
    try:
        unet = dict(UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision))
        vae = dict(AutoencoderKL.load_config(source, subfolder="vae", revision=revision))
    except Exception as exc:
        raise BaseModelError(
            f"{arg('model')} {source}: cannot read its U-Net and VAE configs ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); give a diffusers Stable Diffusion or SDXL folder or "
            "Hub id."
        ) from None
    family = family_of_unet_config(unet)
    encoders = []
    for name in family.text_encoders:
        try:
            encoders.append(AutoConfig.from_pretrained(source, subfolder=name, revision=revision))
        except Exception as exc:
            raise BaseModelError(
                f"{arg('model')} {source}: cannot read the config of its {name} ({type(exc).__name__})."
            ) from None
    return ModelConfigs(family, unet, vae, encoders, str(source))


@dataclass
class RunModels:
    """The models of a run on one device, built from configs (random or no weights), in the run's dtypes."""

    family: ModelFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    splice: ConceptSplice
    device: torch.device
    weight_dtype: torch.dtype
    optimizer: torch.optim.Optimizer | None = None  # the last counted stage's, alive while its samples are drawn

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders, self.splice]


def build_models(configs: ModelConfigs, weight_dtype: torch.dtype, device: torch.device | str = "meta") -> RunModels:
    """Build the base model's U-Net, VAE and text encoders from their configs on `device` in `weight_dtype`
    (on `meta`: shapes only, in a fraction of a second), frozen, with the run's token added to each text
    encoder's vocabulary and its trainable vector (`stages.ConceptSplice`)."""

    device = torch.device(device)
    with quiet_diffusers():
        return _build(configs, weight_dtype, device)


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' warnings off for the block: each `.to(dtype)` of a model warns that no module of it is kept in
    float32, dozens of times per estimate."""
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _build(configs: ModelConfigs, weight_dtype: torch.dtype, device: torch.device) -> RunModels:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    encoder_configs = [copy.deepcopy(c) for c in configs.text_encoders]
    for c in encoder_configs:
        c.vocab_size += 1  # the run's token
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs.unet)
        vae = AutoencoderKL.from_config(configs.vae)
        encoders = [
            getattr(transformers, cls)(c) for cls, c in zip(configs.family.text_encoder_classes, encoder_configs)
        ]
    for model in (unet, vae, *encoders):
        model.requires_grad_(False)
        model.to(device, weight_dtype)
    token_id = encoders[0].get_input_embeddings().weight.shape[0] - 1
    splice = ConceptSplice(encoders, token_id).to(device)
    return RunModels(configs.family, unet, vae, encoders, splice, device, weight_dtype)


@dataclass
class Phase:
    """What one counted phase is: `"latents"` (the VAE encodes the views), `"stage"` 1, 2 or 3, or `"samples"`
    (a stage end's validation grid, counted after the stage whose optimizer state it keeps alive)."""

    name: str
    stage: int = 0


def _prompt_ids(models: RunModels) -> list[torch.Tensor]:
    """A 77-position prompt with the token at its place (the other ids do not change what is counted)."""
    token_id = models.splice.splices[0].token_id
    ids = torch.zeros(1, 77, dtype=torch.long, device=models.device)
    ids[0, _TOKEN_POSITION] = token_id
    return [ids for _ in models.text_encoders]


def _views(config: AttnDBConfig, images: int | None) -> int:
    per_image = (1 + config.random_crops) * (2 if config.flip else 1)
    return (images or ASSUMED_IMAGES) * per_image


def count_phase(
    models: RunModels,
    config: AttnDBConfig,
    phase: Phase,
    images: int | None = None,
    target: str = "cuda",
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    category_tokens: int = 1,
    flops: bool = True,
) -> StepCount:
    """Count one phase of `config`'s run on `models` (built for it by `build_models`; changed in place: call the
    phases in order, latents, 1, 2, 3, as the run does).

    Args:
        models (`RunModels`): the run's models on the counting device.
        config (`AttnDBConfig`): the run's settings, model defaults filled in (`AttnDBConfig.for_model`).
        phase (`Phase`): the phase.
        images (`int`, *optional*): the number of instance images (the latent cache's size); None:
            `ASSUMED_IMAGES`.
        target (`str`): the device modelled, `"cuda"` or `"cpu"` (the attention kernels; the capture computes
            its output by SDPA on CUDA and explicitly on the CPU, as its `"auto"` does).
        autocast_dtype (`torch.dtype`, *optional*): the run's autocast dtype; None: float32, no autocast.
        category_tokens (`int`): how many tokens the category has (columns the capture keeps besides `[V]`).
        flops (`bool`): also count the FLOPs of a step (one more pass).
    """
    with quiet_diffusers():
        return _count_phase(models, config, phase, images, target, autocast_dtype, category_tokens, flops)


def _count_phase(models, config, phase, images, target, autocast_dtype, category_tokens, flops) -> StepCount:
    device = models.device
    latent = config.resolution // 2 ** (len(models.vae.config.block_out_channels) - 1)
    channels = models.unet.config.in_channels
    views = torch.zeros(_views(config, images), 2 * channels, latent, latent, device=device)  # mean and std
    if phase.name == "latents":
        return _count_latents(models, config, target, views, flops)
    if phase.name == "samples":
        return _count_samples(models, config, target, autocast_dtype, views)
    stage = phase.stage
    offload = config.offload_frozen
    trains_token = stage == 1 or (stage == 3 and config.stage3_train_token)
    params = _stage_params(models, config, stage)
    set_trainable(models.modules, params)
    for p in params:
        p.data = p.data.float()
    if offload:  # training.step.offload_frozen: the VAE leaves; the text encoders stay only to encode the token
        resident = [models.unet, models.splice] + (models.text_encoders if trains_token else [])
    else:
        resident = models.modules
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)  # single-tensor: fused AdamW's footprint
    stage_cfg = config.stages[stage - 1]
    regularize = stage_cfg.lambda_mu > 0 or stage_cfg.lambda_var > 0
    indices = list(range(_TOKEN_POSITION, _TOKEN_POSITION + 1 + category_tokens))
    prompt_ids = _prompt_ids(models)
    size, passes = config.batch_size, config.gradient_accumulation_steps
    width = size * passes
    cached = None
    if not trains_token:
        with torch.no_grad(), CudaAutocast(autocast_dtype, target):
            cached = models.family.encode(models.text_encoders, prompt_ids, config.resolution)
    if config.gradient_checkpointing:  # diffusers' own checkpointing, its blocks recomputed under the autocast
        models.unet.enable_gradient_checkpointing(_checkpointing(autocast_dtype, target))
    store = AttentionStore()
    capture = capture_cross_attention(models.unet, indices, store, output="sdpa" if target == "cuda" else "explicit")
    weight_dtype = models.weight_dtype
    timesteps = torch.zeros(width, dtype=torch.long, device=device)

    def step(passes_run: int) -> None:
        # the trainer's latents, noise, noisy latents and target: drawn once for all passes, alive all step
        held = [torch.zeros(width, channels, latent, latent, device=device) for _ in range(4)]
        noisy, target_ = held[2], held[3]
        for k in range(passes_run):
            part = slice(k * size, (k + 1) * size)
            with CudaAutocast(autocast_dtype, target):
                if trains_token:
                    with models.splice:
                        cond = models.family.encode(models.text_encoders, prompt_ids, config.resolution)
                else:
                    cond = cached
                states, added = cond.for_batch(size, weight_dtype)
                store.clear()
                pred = models.unet(noisy[part].to(weight_dtype), timesteps[part], states, added_cond_kwargs=added)
                loss = diffusion_loss(pred.sample, target_[part]) / passes
                if regularize:
                    loss = loss + attention_regularizer(
                        *store.concept_and_category(), stage_cfg.lambda_mu, stage_cfg.lambda_var, config.regularizer
                    )
            loss.backward()
            store.clear()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _init_optimizer_state(optimizer, params, config.optimizer)
    models.optimizer = optimizer
    models.unet.train()
    try:
        with capture if regularize else contextlib.nullcontext():
            # Every pass after the first sees what the first left (the accumulated gradients), so two passes
            # give the peak of any number; the FLOPs of one pass times the passes give the step's.
            count = count_step(
                lambda: step(min(passes, 2)),
                resident,
                [optimizer],
                device=device,
                extra=[views, timesteps],
                warmup=0,
                flops=False,
            )
            count.flops = count_flops(lambda: step(1)) * passes if flops else 0
            return count
    finally:
        models.unet.eval()
        if config.gradient_checkpointing:
            models.unet.disable_gradient_checkpointing()


#: bitsandbytes' 8-bit optimizers keep parameters below this many elements in float32 (`min_8bit_size`) and the
#: others' moments as uint8 with one float32 scale per block of this many elements (blockwise quantization).
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256


def _init_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], kind: str) -> None:
    """Give the optimizer its state the way the first step does, without running a step: the counted step is one
    in the middle of a stage. AdamW is torch's own. The others are modelled by their state's size, their update
    then not run (its kernels keep no tensor of a parameter's size alive): `prodigy` (prodigyopt) keeps AdamW's two
    moments plus `s` and the initial weights `p0`; `adamw8bit` (bitsandbytes) keeps two uint8 moments and their
    block scales for each parameter of at least `BNB_MIN_8BIT_SIZE` elements, float32 moments for the others."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if kind == "adamw":
        return
    for p in params:
        state = optimizer.state[p]
        if kind == "prodigy":
            state["s"], state["p0"] = torch.zeros_like(p), p.detach().clone()
        elif kind == "adamw8bit" and p.numel() >= BNB_MIN_8BIT_SIZE:
            blocks = -(-p.numel() // BNB_BLOCK)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros_like(p, dtype=torch.uint8)
                state[f"{name}_absmax"] = torch.zeros(blocks, device=p.device)
    optimizer.step = lambda *args, **kwargs: None  # the state's size is what is modelled, not the update


def _checkpointing(dtype: torch.dtype | None, target: str):
    """diffusers' default checkpointing function (non-reentrant `torch.utils.checkpoint`), whose recomputation
    runs under the emulated autocast, as torch's checkpoint restores the forward's autocast state."""
    from torch.utils.checkpoint import checkpoint

    def recompute_contexts():
        return contextlib.nullcontext(), CudaAutocast(dtype, target, cache=False)

    def checkpointed(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=recompute_contexts)

    return checkpointed


def _stage_params(models: RunModels, config: AttnDBConfig, stage: int) -> list[torch.nn.Parameter]:
    """What stage `stage` trains, added to the models the way `training.stage_kinds` does."""
    unet = models.unet
    vectors = list(models.splice.vectors)
    if stage == 1:
        return vectors
    if stage == 2:
        s = config.stage2
        return add_lora(unet, ADAPTER_STAGE2, s.rank, s.lora_alpha, STAGE2_TARGET_MODULES)
    s = config.stage3
    token = vectors if config.stage3_train_token else []
    if config.stage3_mode == "full":  # FullUnetStage: the stage-2 LoRA fused, every weight in float32
        if getattr(unet, "peft_config", None):
            unet.unload_lora()
        unet.to(torch.float32)
        return list(unet.parameters()) + token
    add_lora(unet, ADAPTER_STAGE3, s.rank, s.lora_alpha, STAGE3_TARGETS[config.stage3_targets])
    # PEFT puts the second adapter of a layer stage 2 wrapped on the CPU; moving it to `meta` makes new parameters
    unet.to(models.device)
    unet.set_adapters([ADAPTER_STAGE2, ADAPTER_STAGE3])
    return [p for n, p in unet.named_parameters() if f".{ADAPTER_STAGE3}." in n] + token


def _count_latents(
    models: RunModels, config: AttnDBConfig, target: str, views: torch.Tensor, flops: bool
) -> StepCount:
    """`training.cache.build_latent_cache`: the VAE encodes batches of `batch_size` views, no gradients."""
    vae = models.vae
    upcast = models.family.vae_fp32_encode and models.weight_dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    pixels = torch.zeros(
        config.batch_size, 3, config.resolution, config.resolution, device=models.device, dtype=vae.dtype
    )

    def step() -> None:
        with torch.no_grad(), CudaAutocast(None, target):
            posterior = vae.encode(pixels).latent_dist
            posterior.mean.float(), posterior.std.float()

    try:
        return count_step(step, models.modules, [], device=models.device, warmup=0, extra=[views], flops=flops)
    finally:
        if upcast:
            vae.to(torch.float16)


def _count_samples(
    models: RunModels, config: AttnDBConfig, target: str, autocast_dtype: torch.dtype | None, views: torch.Tensor
) -> StepCount:
    """`reporting.write_validation_samples` at a stage's end: every model on the device, the stage's weights and
    optimizer state still alive, the pipeline's denoising step (classifier-free guidance: twice the images of one
    call, `inference.generate_images` draws up to 4 a call) and the VAE decoding them, without gradients."""
    unet, vae = models.unet, models.vae
    count = min(config.validation_images, 4)
    latent = views.shape[-1]
    channels = unet.config.in_channels
    ids = _prompt_ids(models)
    timestep = torch.zeros((), dtype=torch.long, device=models.device)

    def step() -> None:
        with torch.no_grad(), CudaAutocast(autocast_dtype, target):
            cond = models.family.encode(
                models.text_encoders, [i.expand(2 * count, -1) for i in ids], config.resolution
            )
            latents = torch.zeros(2 * count, channels, latent, latent, device=models.device)
            states, added = cond.for_batch(2 * count, models.weight_dtype)
            unet(latents.to(models.weight_dtype), timestep, states, added_cond_kwargs=added)
            vae.decode(latents[:count].to(vae.dtype))

    unet.eval()
    optimizers = [models.optimizer] if models.optimizer is not None else []
    return count_step(step, models.modules, optimizers, device=models.device, warmup=0, extra=[views], flops=False)


def image_count(folder: str | None) -> int | None:
    """The number of instance images in `folder`, or None when it cannot be read (the estimate assumes
    `ASSUMED_IMAGES`)."""
    if not folder or not Path(folder).is_dir():
        return None
    try:
        return len(scan_image_folder(folder, None).images) or None
    except Exception:
        return None
