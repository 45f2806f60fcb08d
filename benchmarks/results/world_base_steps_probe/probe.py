"""Issue 9 probe: do more U-Net steps buy shape (held-out category)?

Continues the shipped base model's own pretraining run (its step-1,800 checkpoint: raw weights, EMA, AdamW state)
for `EXTRA` more steps with a warm restart of the rate (200 warm-up steps to `PEAK`, cosine to 5 % of it), and
scores the EMA weights with `evaluate_base` (30 held-out captions x 3 seeds, default sampler) every `EVERY` steps.
Run on 2026-11-27 (1 thread, shared CPU) as `probe.py RUN 1500 500 3e-4` and stopped after the +500 point (to free
the CPU for the frozen-text-encoder pretraining): steps.json holds the two points, step 1,800 and 2,300.
Not how a base model should be made (`attndb world pretrain --steps N` from scratch is); it asks only whether the
extra steps move category accuracy, before anyone spends GPU or CPU hours on a longer run.

Usage: python probe.py RUN_DIR [EXTRA] [EVERY] [PEAK]   (RUN_DIR: an `attndb world pretrain` folder)
Environment: THREADS (1), OBJECT_WEIGHT (the continuation's `object_loss_weight`; default the run's own),
OUT (the results file; default steps.json beside this script), SCORE_START=0 to skip scoring the starting point.
The text encoder trains only if the run trained it.
Also run on 2026-11-28 on the frozen-text-encoder run with OBJECT_WEIGHT=4 (object_weight.json).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from attndb_peft.checkpoints import load_optimizer_state, read_json
from attndb_peft.world import model as M
from attndb_peft.world.evaluation import evaluate_base

run = Path(sys.argv[1])
EXTRA = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
EVERY = int(sys.argv[3]) if len(sys.argv) > 3 else 500
PEAK = float(sys.argv[4]) if len(sys.argv) > 4 else 3e-4
KEYS = ("context", "style", "colour", "category")
out_file = Path(__file__).with_name(os.environ.get("OUT", "steps.json"))

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
config = M.PretrainConfig(**read_json(run / "settings.json"))
if "OBJECT_WEIGHT" in os.environ:
    config.object_loss_weight = float(os.environ["OBJECT_WEIGHT"])
pipe = M.load_world_pipeline(run / "pipeline")
pipe.set_progress_bar_config(disable=True)
unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
ckpt = run / "checkpoint"
state = read_json(ckpt / "state.json")
start = int(state["step"])
unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
text_encoder.load_state_dict(load_file(str(ckpt / "text_encoder.safetensors")))
ema = load_file(str(ckpt / "ema.safetensors"))
named = {f"unet.{k}": v for k, v in unet.named_parameters()}
if config.train_text_encoder:
    named.update({f"text_encoder.{k}": v for k, v in text_encoder.named_parameters()})
params = list(named.values())
for p in params:
    p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=PEAK, weight_decay=0.0)
load_optimizer_state(opt, load_file(str(ckpt / "optimizer.safetensors")), read_json(ckpt / "optimizer.json"))
for group in opt.param_groups:
    group["lr"] = group["initial_lr"] = PEAK


def rate(step):
    warm = min(1.0, (step + 1) / 200)
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / EXTRA))))


sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
pictures, ids, masks = M._training_set(config, tokenizer)
means, stds = M._encode(vae, pictures)
scaling = vae.config.scaling_factor
empty = tokenizer([""], padding="max_length", max_length=ids.shape[1], return_tensors="pt").input_ids[0]
cache = M.LatentCache(means, stds, ids, empty, scaling, masks)
noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
generator = torch.Generator().manual_seed(config.seed + 1)
results = {"base_run": str(run), "start_step": start, "extra": EXTRA, "peak_lr": PEAK, "settings": asdict(config),
           "threads": torch.get_num_threads(), "points": []}


def score(step):
    raw = {k: v.detach().clone() for k, v in named.items()}
    with torch.no_grad():
        for k, v in named.items():
            v.copy_(ema[k])
    unet.eval()
    t = time.time()
    result = evaluate_base(pipe)
    with torch.no_grad():
        for k, v in named.items():
            v.copy_(raw[k])
    unet.train()
    point = {"step": step, "held_out": {k: result["held_out"][k] for k in KEYS},
             "train": {k: result["train"][k] for k in KEYS}, "eval_seconds": round(time.time() - t)}
    results["points"].append(point)
    out_file.write_text(json.dumps(results, indent=1))
    print(point, flush=True)


if os.environ.get("SCORE_START", "1") != "0":
    score(start)
t0, i0 = time.time(), 0
for i in range(EXTRA):
    step = start + i
    loss = M.pretrain_loss(unet, text_encoder, noise_scheduler, cache, config, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in named.items():
            ema[k].lerp_(v.detach(), 1 - config.ema_decay)
    if i % 100 == 0:
        print(f"step {step + 1} loss {loss.item():.4f} {(time.time() - t0) / (i + 1 - i0):.2f} s/step", flush=True)
    if (i + 1) % EVERY == 0:
        results.setdefault("train_seconds", 0)
        results["train_seconds"] += round(time.time() - t0)
        score(step + 1)
        t0, i0 = time.time(), i + 1
