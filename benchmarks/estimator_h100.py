# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The memory estimator against peaks measured on an H100: thirteen training steps of the SD2.1-base architecture
at batch 8, 512 px, predicted on the `meta` device and set next to `torch.cuda.max_memory_allocated` measured for
the same steps (benchmarks/results/h100/measurements.json, made by benchmarks/h100/bench_gpu.py and
bench_floor.py on an H100 80GB HBM3, 2026-11-26).

The configurations, rebuilt here from those scripts:
- `stages`: stages 1-3 of a reference-like path (fp32 weights + fp16 autocast; a naive attention processor that
  materialises every attention matrix, the self-attention ones included; the text encoder's own gradients on in
  stage 1; the VAE and text encoder run every step; full attn2 / full U-Net weights; foreach AdamW) and of an
  optimised path (bf16 frozen weights, one trainable embedding row, cached latents and prompt states, two token
  columns kept, LoRA for stages 2-3 at ranks 32 / 128, fused AdamW, or the full U-Net in fp32 for stage 3).
- `floor`: six plain U-Net steps (fp32 weights + bf16 autocast; bf16 weights; bf16 channels-last; bf16 frozen
  with input gradients; the last two compiled, which the estimator cannot model: reported, not predicted).

Each step is built once, on `meta` (the prediction) or, with `--measure`, on CUDA (a measurement, for a GPU lent
to a later run). The prediction adds what the counters cannot see but `max_memory_allocated` includes: the
cuBLAS workspaces (`estimator.gpus`). Predicted step times come from the FLOPs counted here and the throughput
each measured step achieved, so they are the calibration itself and are not compared.

    python benchmarks/estimator_h100.py                  # predict, compare, write the table
    python benchmarks/estimator_h100.py --measure        # on a GPU: measure the same steps, compare
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attndb_peft.estimator.accounting import CudaAutocast, count_flops, count_step
from attndb_peft.estimator.architectures import ARCHITECTURES
from attndb_peft.estimator.gpus import GPUS

ROOT = Path(__file__).resolve().parent
MEASURED = ROOT / "results" / "h100" / "measurements.json"
OUT = ROOT / "results" / "estimator"

#: The measured architecture (the scripts spell out SD2.1-base's configs; these are the same).
ARCH = ARCHITECTURES["sd21-base"]
BATCH, RES = 8, 512
V, C = 5, 6  # token positions of [V] and [category] in "a photo of a [V] [category]"
STAGE3_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]
STAGES = [
    ("ref_s1", 1, "ref"),
    ("opt_s1", 1, "opt"),
    ("ref_s2", 2, "ref"),
    ("opt_s2", 2, "opt_lora"),
    ("ref_s3", 3, "ref"),
    ("opt_s3_full", 3, "opt_full"),
    ("opt_s3_lora", 3, "opt_lora"),
]
FLOOR = [
    ("fp32w_amp_eager", torch.float32, False, True),
    ("bf16w_eager", torch.bfloat16, False, True),
    ("bf16w_eager_cl", torch.bfloat16, True, True),
    ("bf16w_frozen_inputgrad_eager", torch.bfloat16, False, False),
]
COMPILED = ("bf16w_compiled", "bf16w_frozen_inputgrad_compiled")


class Capture:
    """The scripts' attention processor: an explicit softmax over all keys (the attention matrix materialised),
    keeping the maps of the 77-key (cross-attention) layers for the regularizer: whole in the reference path,
    two token columns in the optimised one."""

    def __init__(self, store: list, full: bool) -> None:
        self.store, self.full = store, full

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = attn.to_k(context).view(b, -1, h, q.shape[-1]).transpose(1, 2)
        v = attn.to_v(context).view(b, -1, h, q.shape[-1]).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
        if probs.shape[-1] == 77:
            self.store.append(probs if self.full else probs[..., [V, C]])
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def regularizer(store: list, full: bool, lambda_mu: float, lambda_var: float) -> torch.Tensor:
    pick = (V, C) if full else (0, 1)
    v = torch.cat([m[..., pick[0]].float().mean(1).flatten() for m in store])
    c = torch.cat([m[..., pick[1]].float().mean(1).flatten() for m in store])
    return lambda_mu * (v.mean() - c.mean()) ** 2 + lambda_var * (v.var() - c.var()) ** 2


def _models(device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(ARCH.unet).to(dtype)
        text = CLIPTextModel(ARCH.configs().text_encoders[0]).to(dtype)
        vae = AutoencoderKL.from_config(ARCH.vae).to(dtype)
    for m in (unet, text, vae):
        m.requires_grad_(False)
    return unet, text, vae


def stage_setup(stage: int, mode: str, device):
    """One configuration of `STAGES` on `device`: `(step, modules, optimizer)`."""
    from peft import LoraConfig

    cuda = torch.device(device).type == "cuda"
    ref = mode == "ref"
    dtype = torch.float32 if ref else (torch.bfloat16 if stage == 1 or "lora" in mode else torch.float32)
    amp = torch.float16 if ref else torch.bfloat16
    unet, text, vae = _models(device, dtype)
    store: list = []
    unet.set_attn_processor(
        {n: (Capture(store, ref) if ("attn2" in n or ref) else p) for n, p in unet.attn_processors.items()}
    )
    emb = text.get_input_embeddings()
    if stage == 1:
        row = torch.nn.Parameter(emb.weight[C].detach().float().clone())
        params = [row]
        emb.register_forward_hook(
            lambda m, i, o: torch.cat([o[:, :V], row.to(o.dtype).expand(o.shape[0], 1, -1), o[:, V + 1 :]], 1)
        )
        if ref:
            text.requires_grad_(True)
    elif stage == 2 and ref:
        params = [p for n, p in unet.named_parameters() if "attn2" in n]
        for p in params:
            p.requires_grad_(True)
    elif stage == 2:
        unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)"))
        params = [p for p in unet.parameters() if p.requires_grad]
    elif mode.endswith("lora"):
        unet.add_adapter(LoraConfig(r=128, lora_alpha=128, target_modules=STAGE3_LORA_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    # fused AdamW (optimised) has no temporaries; on meta the single-tensor path comes closest. The reference
    # path's non-fused AdamW takes the foreach path on CUDA, with its temporaries.
    if cuda:
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=not ref)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=ref)
    scaler = torch.amp.GradScaler(enabled=ref and cuda)  # in-place unscaling: no memory of its own
    images = torch.zeros(BATCH, 3, RES, RES, device=device)
    ids = torch.zeros(BATCH, 77, dtype=torch.long, device=device)

    def autocast():
        return torch.autocast("cuda", amp) if cuda else CudaAutocast(amp)

    with torch.no_grad(), autocast():
        latent_cache = vae.encode(images.to(vae.dtype)).latent_dist.sample() * 0.18215
        states_cache = text(ids)[0]

    def step():
        with autocast():
            if ref:
                with torch.no_grad():
                    latents = vae.encode(images.to(vae.dtype)).latent_dist.sample() * 0.18215
            else:
                latents = latent_cache
            if stage == 1:
                states = text(ids)[0]
            elif ref:
                with torch.no_grad():
                    states = text(ids)[0]
            else:
                states = states_cache
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (BATCH,), device=device)
            store.clear()
            pred = unet((latents + noise).to(unet.dtype), t, states.to(unet.dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
            lambda_mu, lambda_var = (0.1, 0.0) if stage == 1 else (2.0, 5.0)
            loss = loss + regularizer(store, ref, lambda_mu, lambda_var)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        store.clear()

    return step, [unet, text, vae], optimizer, [images, ids, latent_cache, states_cache]


def floor_setup(dtype, channels_last: bool, train_weights: bool, device):
    """One configuration of `FLOOR`: a plain U-Net step, bf16 autocast."""
    from diffusers import UNet2DConditionModel

    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(ARCH.unet).to(dtype)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    unet.requires_grad_(train_weights)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = None
    if train_weights:
        optimizer = (
            torch.optim.AdamW(params, lr=1e-6, fused=True) if cuda else torch.optim.AdamW(params, foreach=False)
        )
    x = torch.zeros(BATCH, 4, 64, 64, device=device, requires_grad=not train_weights)
    e = torch.zeros(BATCH, 77, 1024, device=device)

    def step():
        with torch.autocast("cuda", torch.bfloat16) if cuda else CudaAutocast(torch.bfloat16):
            out = unet(x.to(dtype), torch.randint(0, 1000, (BATCH,), device=device), e.to(dtype)).sample
            loss = F.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    return step, [unet], [optimizer] if optimizer else [], [x, e]


def predict(setup) -> dict:
    step, modules, optimizers, extra = setup
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    started = time.perf_counter()
    count = count_step(step, modules, optimizers, warmup=1, extra=extra, flops=False)
    flops = count_flops(step)
    workspace = GPUS["h100"].workspace_bytes
    return {
        "predicted_gib": round((count.total + workspace) / 2**30, 2),
        "breakdown_gib": {k: round(v / 2**30, 3) for k, v in count.peak.items() if k != "total"}
        | {"workspace": round(workspace / 2**30, 3)},
        "tflop_per_step": round(flops / 1e12, 3),
        "counted_in_s": round(time.perf_counter() - started, 1),
    }


def measure(setup, steps: int = 5) -> dict:
    step, *_ = setup
    torch.cuda.synchronize()
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - started)
    return {
        "measured_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "ms": round(sorted(times)[len(times) // 2] * 1000, 1),
    }


def configurations():
    for name, stage, mode in STAGES:
        yield name, lambda d, s=stage, m=mode: stage_setup(s, m, d)
    for name, dtype, channels_last, train in FLOOR:
        yield name, lambda d, a=dtype, b=channels_last, c=train: floor_setup(a, b, c, d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", action="store_true", help="Measure on the CUDA device instead of predicting.")
    p.add_argument("--only", default="", help="Comma-separated configuration names.")
    p.add_argument("--out", type=Path, default=OUT, help="Folder for the comparison (JSON and Markdown).")
    a = p.parse_args(argv)
    recorded = json.loads(MEASURED.read_text())
    measured = {r["name"]: r for r in recorded["stages"] + recorded["floor"]}
    rows = []
    for name, build in configurations():
        if a.only and name not in a.only.split(","):
            continue
        row = {"name": name, **{k: measured[name][k] for k in ("peak_gib", "ms") if k in measured.get(name, {})}}
        if a.measure:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row |= measure(build("cuda"))
        else:
            row |= predict(build("meta"))
            if "peak_gib" in row:
                row["error_pct"] = round(100 * (row["predicted_gib"] - row["peak_gib"]) / row["peak_gib"], 1)
            if "ms" in row:
                row["achieved_tflops"] = round(row["tflop_per_step"] / (row["ms"] / 1000), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache() if a.measure else None
    for name in COMPILED:
        if name in measured and not a.only:
            rows.append(
                {
                    "name": name,
                    **{k: measured[name][k] for k in ("peak_gib", "ms")},
                    "note": "torch.compile: not modelled (the compiled graph frees and fuses differently)",
                }
            )
    if not a.measure:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "h100_comparison.json").write_text(
            json.dumps(
                {
                    "measured": f"{recorded['device']}, {recorded['date']} ({MEASURED.relative_to(ROOT.parent)})",
                    "predicted_on": "meta device, torch " + torch.__version__,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
        (a.out / "h100_comparison.md").write_text(table(rows) + "\n")
        print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| step | measured GiB | predicted GiB | error | TFLOP/step | achieved TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('peak_gib', '')} | {r.get('predicted_gib', r.get('note', ''))} | "
            f"{str(r['error_pct']) + ' %' if 'error_pct' in r else ''} | {r.get('tflop_per_step', '')} | "
            f"{r.get('achieved_tflops', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
