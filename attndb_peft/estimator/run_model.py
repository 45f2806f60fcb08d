# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""A run's models and steps rebuilt for counting: the base model from its configs alone (no weights) and each
phase of a run — the latent cache, the three stages, the sample grids — as the trainer runs it, step for step.

Every family the trainer trains is covered (SD 1.x/2.x, SDXL, SD3/3.5, Flux.1): what differs between them is
asked of the family (`families.ModelFamily`), as the trainer does: the denoiser's class and how it is called
(`family.predict`), the text encoders and how a prompt is encoded (`family.encode`), the prompt lengths
(`family.prompt_length`: T5 padded to 256 or 512), the attention capture (`family.capture`), the noise (DDPM, or
rectified flow for `family.flow_matching`) and the LoRA targets (`family.stage2_targets`, `family.stage3_targets`).

The steps mirror `training.step.TrainStep` and the stage classes of `training.stage_kinds` (frozen weights in the
autocast dtype, trainable ones in float32, the capture with its float32 scores, the token spliced into the prompt
in the stages that train it, the passes of gradient accumulation, AdamW, gradient clipping); the stage-2 and
stage-3 LoRAs are injected by the same `stages.add_lora` with the same target modules. The functions take a
device, so the same step runs on `meta` (the estimate) and on real CPU tensors (tests/unit/test_estimator.py and
test_estimator_mmdit.py check that both count the same bytes, and that the count matches a real `Trainer` step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from .. import joint_attention
from ..attention import AttentionStore, capture_cross_attention
from ..base_model import BaseModelError, config_source, is_single_file, quantize_denoiser
from ..config import AttnDBConfig
from ..data import scan_image_folder
from ..errors import arg
from ..families import FluxFamily, ModelFamily, family_of_model, family_of_unet_config, native_resolution
from ..regularizer import attention_regularizer, diffusion_loss, flow_matching_pair, flow_matching_sigmas
from ..stages import ADAPTER_STAGE2, ADAPTER_STAGE3, ConceptSplice, add_lora, set_trainable
from .accounting import CudaAutocast, StepCount, count_flops, count_step

__all__ = [
    "ASSUMED_IMAGES",
    "ModelConfigs",
    "Phase",
    "RunModels",
    "build_models",
    "count_phase",
    "image_count",
    "read_model_configs",
    "token_ids",
]

#: Position of `[V]` in "a photo of a [V] [category]": after the start token in CLIP's ids; T5's tokenizer puts
#: none, so there it is one earlier (`_token_position`).
_TOKEN_POSITION = 5
#: Images assumed in the latent cache when the run's folder cannot be read (the most the method is meant for).
ASSUMED_IMAGES = 20
#: The length of the released tokenizers whose encoder's embedding matrix has spare rows, by the encoder config's
#: `model_type`, for when the tokenizer itself is not read (a known architecture, a Hub cache holding only
#: configs): T5's 32 000 SentencePiece pieces and 100 sentinels in 32 128 rows. The token then takes row 32 100
#: and the matrix keeps its size, as `stages.add_concept_token` does. CLIP's vocabularies fill their matrices: the
#: token adds a row.
_RELEASED_TOKENIZER_LENGTHS = {"t5": 32100}


@dataclass
class ModelConfigs:
    """The configs of a base model's components: all the estimate reads of it.

    Attributes:
        family (`ModelFamily`): SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1.
        denoiser (`dict`): the denoiser's config (the family's `denoiser_class`; `unet` is the same dict).
        vae (`dict`): the VAE's config.
        text_encoders (`list`): the transformers config of each text encoder, in the family's order.
        source (`str`): where they were read (a folder or Hub id).
        tokenizer_lengths (`list`, *optional*): per text encoder, its tokenizer's length before the token is
            added, where it was read (None, or a shorter list: not read; see `token_ids`).
    """

    family: ModelFamily
    denoiser: dict
    vae: dict
    text_encoders: list
    source: str
    tokenizer_lengths: list | None = None

    @property
    def unet(self) -> dict:
        """The denoiser's config under the name the U-Net families' callers know."""
        return self.denoiser

    @property
    def resolution(self) -> int:
        return native_resolution(self.denoiser, self.vae)


def token_ids(configs: ModelConfigs) -> list[int]:
    """The run's token id in each text encoder: its tokenizer's next id (`stages.add_concept_token`). The encoder's
    embedding matrix grows by a row only when the id is past its rows (`_build`); T5's has spare rows."""
    lengths = list(configs.tokenizer_lengths or [])
    ids = []
    for i, config in enumerate(configs.text_encoders):
        length = lengths[i] if i < len(lengths) else None
        if length is None:
            length = min(_RELEASED_TOKENIZER_LENGTHS.get(config.model_type, config.vocab_size), config.vocab_size)
        ids.append(int(length))
    return ids


def read_model_configs(model: str, revision: str | None = None, model_config: str | None = None) -> ModelConfigs:
    """Read the component configs of a base model: a diffusers folder, a Hub id (its `config.json` files only,
    from the Hub or its cache) or, for a single `.safetensors` file, `model_config`.

    The family is the model's own (`families.family_of_model`: its `model_index.json`, else its U-Net config);
    the denoiser's config is read from the family's subfolder (`unet` or `transformer`). The length of a T5
    tokenizer is read too where it can be (its matrix has spare rows: whether the token adds one depends on it).

    Raises:
        BaseModelError: the configs cannot be read (the message names the model and what to do).
    """
    import diffusers
    from transformers import AutoConfig

    if is_single_file(model) and not model_config:
        raise BaseModelError(
            f"{arg('model')} {model}: a single-file checkpoint needs {arg('model_config')} (a diffusers folder or Hub "
            "id of the same architecture) for its component configs."
        )
    source = config_source(model, model_config)
    family = family_of_model(source, revision)
    what = "U-Net" if family.denoiser == "unet" else "transformer"
    try:
        denoiser_class = getattr(diffusers, family.denoiser_class)
        denoiser = dict(denoiser_class.load_config(source, subfolder=family.denoiser, revision=revision))
        vae = dict(diffusers.AutoencoderKL.load_config(source, subfolder="vae", revision=revision))
    except Exception as exc:
        raise BaseModelError(
            f"{arg('model')} {source}: cannot read its {what} and VAE configs ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); give a diffusers Stable Diffusion (1.x, 2.x, XL, 3, "
            "3.5) or Flux.1 folder or Hub id."
        ) from None
    if family.denoiser == "unet":  # the U-Net itself tells SDXL from SD (a model_index.json may not be there)
        family = family_of_unet_config(denoiser)
    encoders = []
    for name in family.text_encoders:
        try:
            encoders.append(AutoConfig.from_pretrained(source, subfolder=name, revision=revision))
        except Exception as exc:
            raise BaseModelError(
                f"{arg('model')} {source}: cannot read the config of its {name} ({type(exc).__name__})."
            ) from None
    lengths = [_tokenizer_length(source, name, revision, c) for name, c in zip(family.tokenizers, encoders)]
    return ModelConfigs(family, denoiser, vae, encoders, str(source), lengths)


def _tokenizer_length(source: str, subfolder: str, revision: str | None, encoder_config) -> int | None:
    """The length of a tokenizer whose encoder's matrix may have spare rows (T5's), None where it cannot be read
    without a download (or is not needed: CLIP's vocabularies fill their matrices)."""
    if encoder_config.model_type not in _RELEASED_TOKENIZER_LENGTHS:
        return None
    try:
        from transformers import AutoTokenizer

        local = dict(subfolder=subfolder, revision=revision, local_files_only=True)
        return len(AutoTokenizer.from_pretrained(source, **local))
    except Exception:  # not here (a Hub cache with the configs only): the released tokenizer's length is assumed
        return None


@dataclass
class RunModels:
    """The models of a run on one device, built from configs (random or no weights), in the run's dtypes."""

    family: ModelFamily
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    splice: ConceptSplice
    device: torch.device
    weight_dtype: torch.dtype
    optimizer: torch.optim.Optimizer | None = None  # the last counted stage's, alive while its samples are drawn

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name the U-Net families' callers know."""
        return self.denoiser

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.vae, *self.text_encoders, self.splice]


def build_models(
    configs: ModelConfigs, weight_dtype: torch.dtype, device: torch.device | str = "meta", quantize: str | None = None
) -> RunModels:
    """Build the base model's denoiser, VAE and text encoders from their configs on `device` in `weight_dtype`
    (on `meta`: shapes only, in seconds for the largest released models), frozen, with the run's token added to
    each text encoder's vocabulary and its trainable vector (`stages.ConceptSplice`); `quantize` ("int8",
    `quantize_base`): the denoiser's linear weights quantized as the trainer quantizes them (torchao, on meta too)."""

    device = torch.device(device)
    with quiet_diffusers():
        models = _build(configs, weight_dtype, device)
    if quantize is not None:
        quantize_denoiser(models.denoiser, quantize)
    return models


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' warnings off for the block: each `.to(dtype)` of a model warns that no module of it is kept in
    float32, dozens of times per estimate; and PEFT's on a LoRA over a base quantized in place (merging it is not
    possible, which the counting never does)."""
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            yield
    finally:
        log.setLevel(level)


def _build(configs: ModelConfigs, weight_dtype: torch.dtype, device: torch.device) -> RunModels:
    import diffusers
    import transformers

    family = configs.family
    ids = token_ids(configs)
    encoder_configs = [copy.deepcopy(c) for c in configs.text_encoders]
    for c, token_id in zip(encoder_configs, ids):
        c.vocab_size = max(c.vocab_size, token_id + 1)  # the run's token: a new row unless a spare one is free
    with torch.device(device):
        denoiser = getattr(diffusers, family.denoiser_class).from_config(configs.denoiser)
        vae = diffusers.AutoencoderKL.from_config(configs.vae)
        encoders = [getattr(transformers, cls)(c) for cls, c in zip(family.text_encoder_classes, encoder_configs)]
    for model in (denoiser, vae, *encoders):
        model.requires_grad_(False)
        model.eval()  # as `from_pretrained` leaves them: T5's dropout (0.1 in t5-v1_1) off, as in the trainer
        model.to(device, weight_dtype)
    splice = ConceptSplice(encoders, ids).to(device)
    return RunModels(family, denoiser, vae, encoders, splice, device, weight_dtype)


@dataclass
class Phase:
    """What one counted phase is: `"latents"` (the VAE encodes the views), `"stage"` 1, 2 or 3, or `"samples"`
    (a stage end's validation grid, counted after the stage whose optimizer state it keeps alive)."""

    name: str
    stage: int = 0


def _token_position(encoder) -> int:
    return _TOKEN_POSITION - 1 if encoder.config.model_type == "t5" else _TOKEN_POSITION


def _prompt_ids(models: RunModels) -> list[torch.Tensor]:
    """The prompt in each tokenizer, padded as the trainer pads it (`family.prompt_length`: CLIP's 77 positions,
    T5's 256 or 512), with the token at its place (the other ids do not change what is counted)."""
    ids = []
    for i, (encoder, splice) in enumerate(zip(models.text_encoders, models.splice.splices)):
        window = getattr(encoder.config, "max_position_embeddings", None) or 77
        length = models.family.prompt_length(i, SimpleNamespace(model_max_length=window))
        prompt = torch.zeros(1, length, dtype=torch.long, device=models.device)
        prompt[0, _token_position(encoder)] = splice.token_id
        ids.append(prompt)
    return ids


def _views(config: AttnDBConfig, images: int | None) -> int:
    per_image = (1 + config.random_crops) * (2 if config.flip else 1)
    return (images or ASSUMED_IMAGES) * per_image


@contextlib.contextmanager
def _capture(models: RunModels, indices: list[int], store: AttentionStore, text_length: int, target: str):
    """The stage's attention capture (`family.capture`), its kernels those of `target`.

    The U-Net's capture is told its output path (SDPA on CUDA, explicit on the CPU, what its `"auto"` picks by
    the tensors' device). The joint-attention capture picks its log-sum-exp kernel by the tensors' device too: on
    `meta` it would take its chunked fallback, which neither device runs for float32; there it is given the
    target's kernel (CUDA's memory-efficient attention, or the CPU's flash attention)."""
    family = models.family
    if family.denoiser == "unet":
        with capture_cross_attention(
            models.denoiser, indices, store, output="sdpa" if target == "cuda" else "explicit"
        ):
            yield
        return
    with contextlib.ExitStack() as stack:
        if models.device.type == "meta":
            fused = dict(joint_attention._FUSED_DTYPES, meta=joint_attention._FUSED_DTYPES[target])
            stack.enter_context(mock.patch.object(joint_attention, "_FUSED_DTYPES", fused))
            if target == "cpu":  # the module's CUDA branch is what any device but the CPU takes
                stack.enter_context(mock.patch.object(joint_attention, "_fused_forward", _cpu_fused_forward))
                stack.enter_context(mock.patch.object(joint_attention, "_fused_pt", _cpu_fused_pt))
        stack.enter_context(family.capture(models.denoiser, indices, store, text_length))
        yield


def _cpu_fused_forward(q: torch.Tensor, k: torch.Tensor, scale: float):
    """`joint_attention._fused_forward`'s CPU branch, for `meta` tensors (the same op and outputs)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=scale)
    return out, lse[..., : q.shape[-2]].to(q.dtype).contiguous(), (lse,)


def _cpu_fused_pt(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, extra, scale: float):
    """`joint_attention._fused_pt`'s CPU branch, for `meta` tensors (the same op and outputs)."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return op(x, q, k, k, out, extra[-1], 0.0, False, scale=scale)[2]


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
    device, family, denoiser = models.device, models.family, models.denoiser
    latent = config.resolution // 2 ** (len(models.vae.config.block_out_channels) - 1)
    channels = models.vae.config.latent_channels  # the cache's; Flux's transformer takes them packed 2x2
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
        resident = [denoiser, models.splice] + (models.text_encoders if trains_token else [])
    else:
        resident = models.modules
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)  # single-tensor: fused AdamW's footprint
    stage_cfg = config.stages[stage - 1]
    regularize = stage_cfg.lambda_mu > 0 or stage_cfg.lambda_var > 0
    prompt_ids = _prompt_ids(models)
    start = _token_position(models.text_encoders[family.attended])  # the positions the regularizer reads
    indices = list(range(start, start + 1 + category_tokens))
    size, passes = config.batch_size, config.gradient_accumulation_steps
    width = size * passes
    cached = None
    if not trains_token:
        with torch.no_grad(), CudaAutocast(autocast_dtype, target):
            cached = family.encode(models.text_encoders, prompt_ids, config.resolution)
    if config.gradient_checkpointing:  # diffusers' own checkpointing, its blocks recomputed under the autocast
        denoiser.enable_gradient_checkpointing(_checkpointing(autocast_dtype, target))
    store = AttentionStore()
    weight_dtype = models.weight_dtype
    timesteps = torch.zeros(width, dtype=torch.long, device=device)  # DDPM's; rectified flow draws its own

    def noised() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trainer's latents, noise, noisy latents, target and timesteps, drawn once for all passes and
        alive all step (`TrainStep`), with what holds them."""
        held = [torch.zeros(width, channels, latent, latent, device=device) for _ in range(2)]
        if not family.flow_matching:
            held += [torch.zeros_like(held[0]) for _ in range(2)]
            return held, held[2], held[3], timesteps
        # the scheduler's shift changes the sigmas' values, not what the draw holds: none is read here
        sigmas = flow_matching_sigmas(torch.zeros(width, device=device), {})
        noisy, target_ = flow_matching_pair(held[0], held[1], sigmas)
        return [*held, noisy, target_, sigmas], noisy, target_, sigmas * 1000

    def step(passes_run: int) -> None:
        held, noisy, target_, t = noised()
        for k in range(passes_run):
            part = slice(k * size, (k + 1) * size)
            with CudaAutocast(autocast_dtype, target):
                if trains_token:
                    with models.splice:
                        cond = family.encode(models.text_encoders, prompt_ids, config.resolution)
                else:
                    cond = cached
                states, added = cond.for_batch(size, weight_dtype)
                store.clear()
                pred = family.predict(denoiser, noisy[part].to(weight_dtype), t[part], states, added)
                loss = diffusion_loss(pred, target_[part]) / passes
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
    denoiser.train()
    text_length = family.text_length(prompt_ids)
    try:
        with _capture(models, indices, store, text_length, target) if regularize else contextlib.nullcontext():
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
        denoiser.eval()
        if config.gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()


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
    """What stage `stage` trains, added to the models the way `training.stage_kinds` does (the family's LoRA
    targets: the U-Net's attn2 layers, a joint block's text projections)."""
    denoiser, family = models.denoiser, models.family
    vectors = list(models.splice.vectors)
    if stage == 1:
        return vectors
    if stage == 2:
        s = config.stage2
        return add_lora(denoiser, ADAPTER_STAGE2, s.rank, s.lora_alpha, family.stage2_targets)
    s = config.stage3
    token = vectors if config.stage3_train_token else []
    if config.stage3_mode == "full":  # FullUnetStage: the stage-2 LoRA fused, every weight in float32
        if getattr(denoiser, "peft_config", None):
            denoiser.unload_lora()
        denoiser.to(torch.float32)
        return list(denoiser.parameters()) + token
    add_lora(denoiser, ADAPTER_STAGE3, s.rank, s.lora_alpha, dict(family.stage3_targets)[config.stage3_targets])
    # PEFT puts the second adapter of a layer stage 2 wrapped on the CPU; moving it to `meta` makes new parameters
    denoiser.to(models.device)
    denoiser.set_adapters([ADAPTER_STAGE2, ADAPTER_STAGE3])
    return [p for n, p in denoiser.named_parameters() if f".{ADAPTER_STAGE3}." in n] + token


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
    call, `inference.generate_images` draws up to 4 a call; Flux.1 is guidance-distilled, its pipeline runs the
    images once) and the VAE decoding them, without gradients."""
    family, denoiser, vae = models.family, models.denoiser, models.vae
    count = min(config.validation_images, 4)
    batch = count if isinstance(family, FluxFamily) else 2 * count
    latent = views.shape[-1]
    channels = vae.config.latent_channels
    ids = _prompt_ids(models)
    if family.flow_matching:  # the pipelines pass one timestep per image
        timestep = torch.zeros(batch, device=models.device)
    else:
        timestep = torch.zeros((), dtype=torch.long, device=models.device)

    def step() -> None:
        with torch.no_grad(), CudaAutocast(autocast_dtype, target):
            cond = family.encode(models.text_encoders, [i.expand(batch, -1) for i in ids], config.resolution)
            latents = torch.zeros(batch, channels, latent, latent, device=models.device)
            states, added = cond.for_batch(batch, models.weight_dtype)
            family.predict(denoiser, latents.to(models.weight_dtype), timestep, states, added)
            vae.decode(latents[:count].to(vae.dtype))

    denoiser.eval()
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
