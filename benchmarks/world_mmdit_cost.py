# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What a world base of the MMDiT kind would cost to pretrain on a CPU, measured next to the shipped U-Net's.

The world's shipped base (`attndb_peft.world`) is a U-Net; SD3.5 and Flux.1 are joint-attention transformers
(MMDiT). A world base of that kind would be a tiny `SD3Transformer2DModel` pretrained with the world recipe
(`world.pretrain`: the same latents, captions and text encoder trained jointly, 3,600 steps of batch 48), with a
flow-matching loss in place of v-prediction. This script times one such training step for both denoisers on the
same batch, on the same machine:

- `unet`: the shipped architecture (`world.model.build_world_pipeline`, fresh weights), v-prediction loss;
- `mmdit-L`: an `SD3Transformer2DModel` of L joint blocks, 2 heads x 64 (SD3's head width), patch 2 over the
  16x16x4 latents (64 image tokens) reading the world text encoder's 16 positions and its pooled output, with
  SD3's rectified-flow loss (logit-normal times);

each with the text encoder trained jointly and AdamW over both, as `world.pretrain` does, on random latents and
captions (the step's cost does not depend on the data). It prints, and writes as JSON, the parameters, the FLOPs
and the median seconds of a step, and the recipe's 3,600 steps at that time (`recipe_minutes`: the steps alone,
without EMA, data draws or logging, which the real pretraining adds; docs/world.md compares the U-Net's with its
recorded pretraining).

    python benchmarks/world_mmdit_cost.py            # benchmarks/results/world_mmdit_cost/cost.json

What it does not measure: the SD3 pipeline's second CLIP encoder and T5 (a world base of that kind would need
both, or a pipeline without T5), and whether such a model learns the world as well as the U-Net did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from attndb_peft.world import scenes as W
from attndb_peft.world.model import MAX_TEXT_LENGTH, build_world_pipeline

OUT = Path(__file__).resolve().parent / "results" / "world_mmdit_cost" / "cost.json"
#: Steps of the shipped recipe (`world.pretrain.PretrainConfig.steps`).
RECIPE_STEPS = 3600
#: SD3's per-head width; the blocks are `heads` x this wide.
HEAD_WIDTH = 64


def build_mmdit(layers: int, heads: int, text_width: int, seed: int = 0) -> SD3Transformer2DModel:
    """An SD3 MMDiT over the world's 16x16x4 latents reading a `text_width`-wide text encoder."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=W.SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=HEAD_WIDTH,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        caption_projection_dim=HEAD_WIDTH * heads,
        pooled_projection_dim=text_width,
        pos_embed_max_size=W.SIZE // 4,
    )


def _unet_loss(unet, text_encoder, latents, tokens, generator):
    t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    # the loss's cost, not its schedule: a v-target of the same shape stands in for the scheduler's
    noisy, target = latents + noise, noise - latents
    return F.mse_loss(unet(noisy, t, text_encoder(tokens)[0]).sample, target)


def _mmdit_loss(transformer, text_encoder, latents, tokens, generator):
    sigma = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))  # SD3's logit-normal times
    noise = torch.randn(latents.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    noisy, target = (1 - s) * latents + s * noise, noise - latents
    encoded = text_encoder(tokens)
    prediction = transformer(
        hidden_states=noisy,
        encoder_hidden_states=encoded.last_hidden_state,
        pooled_projections=encoded.pooler_output,
        timestep=sigma * 1000,
    ).sample
    return F.mse_loss(prediction, target)


def time_step(denoiser, text_encoder, loss_fn, batch_size: int, repeats: int) -> dict:
    """Median seconds of `repeats` training steps of `denoiser` + `text_encoder`, after one warm-up step whose
    forward and backward FLOPs torch's `FlopCounterMode` counts."""
    generator = torch.Generator().manual_seed(0)
    params = [*denoiser.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(batch_size, 4, W.SIZE // 2, W.SIZE // 2, generator=generator)
    tokens = torch.randint(0, text_encoder.config.vocab_size, (batch_size, MAX_TEXT_LENGTH), generator=generator)
    seconds, counter = [], FlopCounterMode(display=False)
    for i in range(repeats + 1):
        started = time.perf_counter()
        with counter if i == 0 else contextlib.nullcontext():  # FLOPs counted in the warm-up step
            loss_fn(denoiser, text_encoder, latents, tokens, generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            seconds.append(time.perf_counter() - started)
    return {
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "gflops_per_step": round(counter.get_total_flops() / 1e9, 2),
        "seconds_per_step": round(statistics.median(seconds), 4),
        "seconds": [round(s, 4) for s in seconds],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,8", help="MMDiT depths to time, comma-separated (default 4,8)")
    parser.add_argument("--heads", type=int, default=2, help=f"MMDiT heads of {HEAD_WIDTH} (default 2)")
    parser.add_argument("--batch-size", type=int, default=48, help="the recipe's batch (default 48)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the recipe's)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the JSON goes (default {OUT})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = build_world_pipeline()
    text_encoder = pipe.text_encoder.train()  # one encoder for every model: its weights do not change a step's cost
    text_width = text_encoder.config.hidden_size
    results = {"unet": time_step(pipe.unet.train(), text_encoder, _unet_loss, args.batch_size, args.repeats)}
    for layers in (int(x) for x in args.layers.split(",")):
        transformer = build_mmdit(layers, args.heads, text_width).train()
        results[f"mmdit-{layers}"] = time_step(transformer, text_encoder, _mmdit_loss, args.batch_size, args.repeats)
    for r in results.values():
        r["recipe_minutes"] = round(r["seconds_per_step"] * RECIPE_STEPS / 60, 1)
    report = {
        "machine": f"{platform.machine()} CPU, {args.threads} torch threads",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'model':<10} {'parameters':>11} {'GFLOP/step':>11} {'s/step':>8} {'3,600 steps (min)':>18}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['parameters']:>11,} {r['gflops_per_step']:>11.1f} {r['seconds_per_step']:>8.3f}"
            f" {r['recipe_minutes']:>18.1f}"
        )
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
