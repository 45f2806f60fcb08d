# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Pretraining the world's base model from scratch: `pretrain(output, PretrainConfig())` is the command that made
the shipped weights (`attndb world pretrain`). It runs three phases, each deterministic from the seed (for a given
torch build and thread count):

1. a VAE (32 px -> 16x16x4 latents) trained on general world pictures: any colour, any pattern, any style, so it
   can represent a concept's pattern that the U-Net never sees in pretraining;
2. a latent cache of `num_images` captioned pictures of the training captions (`scenes.split_scenes`);
3. the U-Net and the CLIP text encoder trained jointly on the cached latents (v-prediction, zero terminal SNR,
   caption dropout for classifier-free guidance, EMA weights); `train_text_encoder=False` keeps the encoder at its
   seeded initialisation and `object_loss_weight` weighs the loss towards the object (see `PretrainConfig`).

Zero terminal SNR matters here more than on SD: at 16x16 latents a scaled-linear schedule leaves the mean colour
of the picture readable at t = T (the noise averaged over 256 positions has std 1/16, the signal 0.068), so a
model trained on it learns the background from the noise it starts from and ignores the context words.

Phase 3 checkpoints every `checkpoint_every` steps (safetensors + JSON, atomic); running the command again with
the same output folder resumes bit-identically. The finished pipeline is `OUT/pipeline/` (EMA weights), with
`OUT/pretrain.json` (settings, timings, loss curve) and `OUT/evaluation.json` (held-out scores).

The model itself (architecture, storage, loading) is `model`'s; this module imports it and `evaluation`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from ..checkpoints import load_optimizer_state, optimizer_state_to_files, read_json, save_tensors, write_json_atomic
from . import scenes as W
from .evaluation import evaluate_base
from .model import MAX_TEXT_LENGTH, WorldArchitecture, build_world_pipeline, load_world_pipeline, save_pipeline

__all__ = [
    "LatentCache",
    "PretrainConfig",
    "pretrain",
    "pretrain_loss",
]

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of `pretrain` (recorded in `pretrain.json` next to the weights). The defaults are the shipped
    model's recipe; the four architecture fields (`unet_width`, `unet_layers_per_block`, `text_width`,
    `text_layers`) default to `model.WorldArchitecture`'s, and a `PretrainConfig` is passed to
    `model.build_world_pipeline` as the architecture."""

    seed: int = 0
    #: 3,600 is the shipped model's: the same recipe over 1,800 steps drew held-out boxes as balls (category
    #: 75.6 % against 95.6 %; README, world section); the cosine schedule stretches with it.
    steps: int = 3600
    batch_size: int = 48
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    num_images: int = 12000
    vae_steps: int = 1500
    vae_images: int = 4000
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    checkpoint_every: int = 500
    threads: int = 2
    unet_width: int = WorldArchitecture.unet_width
    #: ResNet + transformer layers in each U-Net down block (up blocks get one more, as in diffusers). 1 is the
    #: shipped model's (4.19 M parameters); 2 adds depth at both resolutions (6.13 M) within the package's size
    #: budget (a width of 96 would not fit it). With 2 and an object weight of 4, held-out category did not improve
    #: (72.2 %, README).
    unet_layers_per_block: int = WorldArchitecture.unet_layers_per_block
    text_width: int = WorldArchitecture.text_width
    text_layers: int = WorldArchitecture.text_layers
    held_out: int = 30
    #: False: the text encoder stays at its seeded initialisation (frozen, as SD's CLIP is), so no two words can
    #: be merged by training. The shipped model trained it (True); without the object weight its encoder mapped
    #: `ball` and `box` to nearly the same states, and frozen, personalised prompts lost their context more often
    #: (see the README's world section).
    train_text_encoder: bool = True
    #: Extra loss weight on the object: each latent position's squared error counts `1 + object_loss_weight * m`,
    #: `m` the object's share of it (its mask averaged to the latent grid and widened by one position, so a corner
    #: drawn where there is none counts too). The object is a quarter of a picture and the backgrounds' random
    #: speckles dominate a plain MSE, so shape (a box's corners) is learnt last. 4 is the shipped model's (with the
    #: jointly trained encoder and 3,600 steps: held-out category 95.6 %); 0, a plain MSE, gave the step-1,800 model
    #: shipped before it (68.9 %, boxes drawn as balls; README, world section).
    object_loss_weight: float = 4.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if f.name in ("caption_dropout", "ema_decay"):
                if not 0 <= value < 1:
                    raise ValueError(f"{f.name}={value}: expected a number in [0, 1).")
            elif f.name in ("seed", "object_loss_weight", "warmup_steps"):
                if value < 0:
                    raise ValueError(f"{f.name}={value}: expected a non-negative number.")
            elif value <= 0:
                raise ValueError(f"{f.name}={value}: expected a positive number.")


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _vae_pictures(rng: np.random.Generator, n: int) -> torch.Tensor:
    """General world pictures for the VAE: random styles/contexts, and objects in any colour or pattern."""
    images = []
    for _ in range(n):
        cat = W.CATEGORIES[rng.integers(len(W.CATEGORIES))]
        ctx = [*W.CONTEXTS, None][rng.integers(len(W.CONTEXTS) + 1)]
        sty = list(W.STYLES)[rng.integers(len(W.STYLES))]
        concept = None
        if rng.random() < 0.5:
            names = list(W.CONCEPT_COLOURS)
            a, b = rng.choice(len(names), 2, replace=False)
            concept = W.Concept(-1, cat, W.PATTERNS[rng.integers(len(W.PATTERNS))], (names[a], names[b]),
                                int(rng.integers(3, 6)))
        col = list(W.COLOURS)[rng.integers(len(W.COLOURS))] if concept is None else None
        images.append(W.render(W.Scene(cat, col, ctx, sty), rng, concept=concept, scale=(6.0, 12.0))[0])
    return _to_tensor(images)


def _train_vae(vae, config: PretrainConfig, log: dict) -> None:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 1])
    pictures = _vae_pictures(rng, config.vae_images)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / config.vae_steps)
    vae.train()
    start = time.perf_counter()
    device = vae.device
    for step in range(config.vae_steps):
        x = pictures[torch.randint(0, len(pictures), (config.vae_batch_size,))].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d/%d loss %.4f", step + 1, config.vae_steps, loss.item())
            log.setdefault("vae_loss", []).append([step, round(loss.item(), 5)])
    vae.eval().requires_grad_(False)
    log["vae_seconds"] = round(time.perf_counter() - start, 1)


def _training_set(config: PretrainConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pretraining pictures (`[N, 3, 32, 32]` in [-1, 1]), their captions' token ids and the objects' masks
    on the latent grid (`[N, 1, 16, 16]`, see `PretrainConfig.object_loss_weight`)."""
    train, _ = W.split_scenes(config.held_out, seed=1)
    rng = np.random.default_rng([config.seed, 2])
    images, masks, ids = [], [], []
    for i in range(config.num_images):
        scene = train[i % len(train)]
        image, mask = W.render(scene, rng)
        images.append(image)
        masks.append(mask)
        ids.append(W.caption(scene))
    tok = tokenizer(ids, padding="max_length", max_length=MAX_TEXT_LENGTH, truncation=True, return_tensors="pt")
    share = F.avg_pool2d(torch.from_numpy(np.stack(masks)).float()[:, None], 2)
    return _to_tensor(images), tok.input_ids, F.max_pool2d(share, 3, stride=1, padding=1)


@torch.no_grad()
def _encode(vae, pictures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pictures), 256):
        dist = vae.encode(pictures[i : i + 256].to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@dataclass
class LatentCache:
    """The pretraining set as the U-Net sees it: each picture's VAE posterior (`means`, `stds`), its caption's
    token ids, the empty caption's ids (caption dropout), the latent scaling factor and, for an object-weighted
    loss, the objects' masks on the latent grid (`_training_set`)."""

    means: torch.Tensor
    stds: torch.Tensor
    ids: torch.Tensor
    empty: torch.Tensor
    scaling: float
    masks: torch.Tensor | None = None


def pretrain_loss(unet, text_encoder, noise_scheduler, cache: LatentCache, config: PretrainConfig, generator):
    """One pretraining batch's v-prediction loss: `config.batch_size` random pictures of `cache` (latents drawn
    from their posteriors), captions dropped at `config.caption_dropout`, uniform timesteps; every draw comes from
    `generator`, in this order (what makes a run reproducible and its resume bit-identical). The cache and the
    draws stay on the CPU; the batch then goes to the U-Net's device. With `config.object_loss_weight`, positions on
    the object weigh more (the weights' mean is divided out, so the loss keeps a plain MSE's scale)."""
    j = torch.randint(0, len(cache.ids), (config.batch_size,), generator=generator)
    latents = (cache.means[j] + cache.stds[j] * torch.randn(cache.means[j].shape, generator=generator)) * cache.scaling
    tokens = cache.ids[j].clone()
    tokens[torch.rand(config.batch_size, generator=generator) < config.caption_dropout] = cache.empty
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
    device = unet.device
    latents, noise, t, tokens = latents.to(device), noise.to(device), t.to(device), tokens.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise_scheduler.get_velocity(latents, noise, t)
    prediction = unet(noisy, t, text_encoder(tokens)[0]).sample
    if not config.object_loss_weight:
        return F.mse_loss(prediction, target)
    if cache.masks is None:
        raise ValueError("object_loss_weight needs the cache's object masks (LatentCache.masks).")
    weight = (1.0 + config.object_loss_weight * cache.masks[j].to(device)).expand_as(prediction)
    return (weight * (prediction - target) ** 2).mean() / weight.mean()


#: Settings added after the first runs, with the value that reproduces a run started before they existed.
_SETTINGS_BEFORE_THEY_EXISTED = {"train_text_encoder": True, "object_loss_weight": 0.0, "unet_layers_per_block": 1}


def _lr_lambda(config: PretrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        progress = min(1.0, step / config.steps)
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    return f


def _save_checkpoint(path: Path, step: int, unet, text_encoder, ema: dict, opt, generator, log: dict) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "unet.safetensors", unet.state_dict())
    save_tensors(tmp / "text_encoder.safetensors", text_encoder.state_dict())
    save_tensors(tmp / "ema.safetensors", ema)
    tensors, plain = optimizer_state_to_files(opt)
    save_tensors(tmp / "optimizer.safetensors", tensors)
    save_tensors(tmp / "rng.safetensors", {"generator": generator.get_state(), "torch": torch.get_rng_state()})
    write_json_atomic(tmp / "optimizer.json", plain)
    write_json_atomic(tmp / "state.json", {"step": step, "log": log})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def pretrain(
    output: str | os.PathLike,
    config: PretrainConfig | None = None,
    evaluate: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> Path | None:
    """Pretrain the world base model into `output` (see the module docstring); resumes from `output/checkpoint`.

    Args:
        output: the run's folder (created; a folder of an earlier run with the same settings is resumed).
        config (`PretrainConfig`): the settings.
        evaluate (`bool`): score the finished model on held-out captions (`evaluation.json`).
        stop_after (`int`, *optional*): stop at the first checkpoint at or after this step (or at the checkpoint
            resumed from, if it is past it) and write the pipeline of the EMA weights there (`steps_done` in
            `pretrain.json` says which); running again without it continues the same run.
        device (`str`, *optional*): where the models train ("cuda" on a GPU). Every random draw is made on the CPU,
            so a run's batches are the same on any device; its weights are not bit-identical across devices (a
            resume is, on the same one). Recorded in `pretrain.json`.

    Returns:
        `Path`: the pipeline folder `output/pipeline`.
    """
    config = config or PretrainConfig()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings_file = output / "settings.json"
    if settings_file.is_file():
        # a setting added since that run was started takes the value that reproduces what the code did before it
        previous = {**asdict(PretrainConfig()), **_SETTINGS_BEFORE_THEY_EXISTED, **read_json(settings_file)}
        if previous != asdict(config):
            changed = sorted(k for k in previous if previous[k] != asdict(config).get(k))
            raise ValueError(
                f"{output}: holds a pretraining run with other settings ({', '.join(changed)}); use a new --output "
                "or the same settings to resume."
            )
    write_json_atomic(settings_file, asdict(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        pipe = build_world_pipeline(config, seed=config.seed).to(device)
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        log: dict = {"settings": asdict(config), "torch": torch.__version__, "device": str(device)}
        started = time.perf_counter()

        vae_file = output / "vae.safetensors"
        if vae_file.is_file():
            vae.load_state_dict(load_file(str(vae_file)))
            vae.eval().requires_grad_(False)
            log.update(read_json(output / "vae.json"))
        else:
            _train_vae(vae, config, log)
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_file))
            write_json_atomic(output / "vae.json", {k: log[k] for k in ("vae_loss", "vae_seconds")})

        t0 = time.perf_counter()
        pictures, ids, masks = _training_set(config, tokenizer)
        means, stds = _encode(vae, pictures)
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        empty = tokenizer([""], padding="max_length", max_length=MAX_TEXT_LENGTH, return_tensors="pt").input_ids[0]
        log["cache_seconds"] = round(time.perf_counter() - t0, 1)
        log["scaling_factor"] = scaling
        logger.info("latent cache: %d pictures, scaling factor %.4f (%.0f s)", len(ids), scaling, log["cache_seconds"])

        cache = LatentCache(means, stds, ids, empty, scaling, masks)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        text_encoder.requires_grad_(config.train_text_encoder)
        named = {f"unet.{k}": v for k, v in unet.named_parameters()}  # what is trained (and averaged by the EMA)
        if config.train_text_encoder:
            named.update({f"text_encoder.{k}": v for k, v in text_encoder.named_parameters()})
        params = list(named.values())
        opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        ema = {k: v.detach().clone() for k, v in named.items()}
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        start_step = 0
        ckpt = output / "checkpoint"
        if (ckpt / "state.json").is_file():
            state = read_json(ckpt / "state.json")
            unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
            text_encoder.load_state_dict(load_file(str(ckpt / "text_encoder.safetensors")))
            ema = load_file(str(ckpt / "ema.safetensors"), device=str(unet.device))
            load_optimizer_state(
                opt, load_file(str(ckpt / "optimizer.safetensors")), read_json(ckpt / "optimizer.json")
            )
            rng = load_file(str(ckpt / "rng.safetensors"))
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            start_step = int(state["step"])
            log = {**state["log"], "device": str(device)}
            with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is the point
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                for _ in range(start_step):
                    sched.step()
            logger.info("resuming pretraining at step %d", start_step)

        unet.train()
        text_encoder.train(config.train_text_encoder)
        t1 = time.perf_counter()
        total = config.steps
        # with stop_after at or before the checkpoint resumed from, nothing is trained: the pipeline is written
        stopped = start_step if stop_after is not None and stop_after <= start_step < total else None
        for step in range(start_step, total if stopped is None else start_step):
            loss = pretrain_loss(unet, text_encoder, noise_scheduler, cache, config, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                for k, v in named.items():
                    ema[k].lerp_(v.detach(), 1 - decay)
            done = step + 1
            if step % 100 == 0 or done == total:
                rate = (time.perf_counter() - t1) / (done - start_step)
                logger.info("unet step %d/%d loss %.4f (%.2f s/step, %.0f min left)", done, total, loss.item(), rate,
                            rate * (total - done) / 60)
                log.setdefault("unet_loss", []).append([done, round(loss.item(), 5)])
            if done % config.checkpoint_every == 0 or done == total:
                log["unet_seconds"] = round(log.get("unet_seconds", 0) + time.perf_counter() - t1, 1)
                t1 = time.perf_counter()
                start_step = done
                _save_checkpoint(ckpt, done, unet, text_encoder, ema, opt, generator, log)
                if stop_after is not None and done >= stop_after and done < total:
                    stopped = done
                    break
        log["steps_done"] = stopped or total
        if stopped:
            logger.info("stopped after step %d of %d as asked; the pipeline holds the EMA weights of that step; run "
                        "again with the same settings (without --stop-after) to continue", stopped, total)

        # The pipeline carries the EMA weights.
        unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")}, strict=False)
        text_encoder.load_state_dict(
            {k[13:]: v for k, v in ema.items() if k.startswith("text_encoder.")}, strict=False
        )
        unet.eval()
        text_encoder.eval()
        final = output / "pipeline"
        save_pipeline(pipe, final)
        log["total_seconds_this_run"] = round(time.perf_counter() - started, 1)
        if evaluate:
            # what ships: the fp16-stored weights
            log["evaluation"] = evaluate_base(load_world_pipeline(final, device=str(device)))
            write_json_atomic(output / "evaluation.json", log["evaluation"])
        write_json_atomic(output / "pretrain.json", log)
        (final / "pretrain.json").write_text(json.dumps(log, indent=1), encoding="utf-8")
        return final
    finally:
        torch.set_num_threads(threads)
