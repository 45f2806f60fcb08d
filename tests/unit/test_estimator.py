# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The memory estimator: its attention substitution and autocast emulation against torch on the CPU, its meta-device
count against the same step run on real CPU tensors and against a real `Trainer` step, its counter against torch's
MemTracker, and the architectures' configs against the released models' parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from attndb_peft.amp import autocast_off
from attndb_peft.config import AttnDBConfig
from attndb_peft.estimator.accounting import CudaAutocast, count_step, fused_attention
from attndb_peft.estimator.architectures import ARCHITECTURES, architecture_for
from attndb_peft.estimator.estimate import H100_ACHIEVED_TFLOPS, _candidates, estimate_run
from attndb_peft.estimator.gpus import ALLOCATOR_HEADROOM, GPUS, local_gpu
from attndb_peft.estimator.run_model import Phase, build_models, count_phase, read_model_configs
from tests.conftest import TINY_SETTINGS, make_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [False, True])
def test_fused_attention_matches_sdpa_on_cpu(dtype, mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 3, 16, 16, dtype=dtype) if mask else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    got = fused_attention(q, k, v, attn_mask=bias, target="cpu")
    got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=tol * 10, rtol=tol)
    with CudaAutocast(None, target="cpu"):  # the mode substitutes it for F.scaled_dot_product_attention
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), want, atol=tol, rtol=tol)


def test_cuda_autocast_policy():
    """CUDA autocast's dtypes: matmuls and convolutions low precision; norms, softmax and losses float32; a float32
    parameter cast once per region; nothing cast inside `autocast_off` (the capture's float32 block)."""
    x = torch.randn(2, 8, 4)
    linear = torch.nn.Linear(4, 6)
    with CudaAutocast(torch.bfloat16, target="cpu") as mode:
        y = linear(x)
        assert y.dtype == torch.bfloat16
        assert (y @ y.transpose(-1, -2)).dtype == torch.bfloat16
        assert F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)).dtype == torch.bfloat16
        assert F.layer_norm(y, (6,)).dtype == torch.float32
        assert F.group_norm(y.transpose(1, 2), 2).dtype == torch.float32
        assert y.softmax(-1).dtype == torch.float32
        assert F.mse_loss(y, y).dtype == torch.float32
        assert F.silu(y).dtype == torch.bfloat16  # not in either list: the input's dtype
        assert mode._cast((linear.weight,), torch.bfloat16)[0] is mode._cast((linear.weight,), torch.bfloat16)[0]
        with autocast_off("cpu"):
            assert (x @ x.transpose(-1, -2)).dtype == torch.float32
    assert linear(x).dtype == torch.float32  # the mode is gone after the region


def _tiny_configs(tiny_model):
    return read_model_configs(str(tiny_model))


def _tiny_run_config(tiny_model, **overrides):
    return AttnDBConfig(
        model=str(tiny_model), images="-", category="dog", output="-", **{**TINY_SETTINGS, **overrides}
    ).for_model(_tiny_configs(tiny_model).family, TINY_SETTINGS["resolution"])


@pytest.mark.parametrize("precision, checkpointing", [(None, False), (torch.bfloat16, True)])
def test_meta_count_equals_real_cpu_count(tiny_model, precision, checkpointing):
    """The same phases counted on meta (shapes only) and on real CPU tensors give the same bytes and FLOPs."""
    config = _tiny_run_config(tiny_model, gradient_checkpointing=checkpointing, gradient_accumulation_steps=2)
    counts = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        models = build_models(_tiny_configs(tiny_model), precision or torch.float32, device)
        phases = [Phase("latents")] + [Phase("stage", s) for s in (1, 2, 3)]
        counts[device] = [
            count_phase(models, config, phase, images=4, target="cpu", autocast_dtype=precision) for phase in phases
        ]
    for meta, cpu in zip(counts["meta"], counts["cpu"]):
        assert meta.peak == cpu.peak
        assert meta.flops == cpu.flops > 0


def test_peak_counter_agrees_with_memtracker(tiny_model):
    models = build_models(_tiny_configs(tiny_model), torch.float32, "meta")
    unet = models.unet
    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), foreach=False)
    x = torch.zeros(2, 4, 8, 8, device="meta")
    states = torch.zeros(2, 77, unet.config.cross_attention_dim, device="meta")

    def step():
        with CudaAutocast(torch.bfloat16):
            loss = unet(x, torch.zeros(2, dtype=torch.long, device="meta"), states).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours = count_step(step, [unet], [optimizer], extra=[x, states], flops=False)
    torch_s = count_step(step, [unet], [optimizer], extra=[x, states], tracker="memtracker", flops=False)
    assert ours.total == torch_s.total
    assert ours.peak["weights"] == torch_s.peak["weights"]


def test_estimator_matches_a_trainer_step(tiny_model, instance_dir, tmp_path):
    """A stage-2 step of the real `Trainer` on the CPU, counted with the same counter, holds what the estimator's
    rebuilt step of the same settings counts (the trainer's small extras aside: its RNG, schedule and ids)."""
    from attndb_peft.trainer import Trainer

    config = make_config(tiny_model, instance_dir, tmp_path / "out", mixed_precision="no")
    trainer = Trainer(config)
    trainer.prepare()
    trainer.build_stage(1)
    trainer.build_stage(2)
    trainer.make_optimizer(2)
    models = trainer.models
    with trainer.stage_loop(2) as step:

        def run():
            with CudaAutocast(None, target="cpu"):  # the CPU's SDPA, as the estimator models it
                step(0)

        real = count_step(
            run,
            [models.unet, models.vae, *models.text_encoders, trainer.splice],
            [trainer.optimizer],
            device="cpu",
            extra=[trainer.latents.mean, trainer.latents.std],
            flops=False,
        )
    estimated = estimate_run(trainer.config.with_stage_values(steps=(1, 1, 0)), suggest=False)
    # estimate_run models a CUDA device; count the same phases for the CPU's kernels instead
    counted = build_models(_tiny_configs(tiny_model), torch.float32, "meta")
    count_phase(counted, trainer.config, Phase("stage", 1), images=4, target="cpu", autocast_dtype=None)
    predicted = count_phase(counted, trainer.config, Phase("stage", 2), images=4, target="cpu", autocast_dtype=None)
    assert predicted.peak["weights"] == real.peak["weights"]
    assert predicted.peak["optimizer"] == real.peak["optimizer"]
    assert predicted.total == pytest.approx(real.total, rel=0.02)
    assert [p.name for p in estimated.phases] == ["latents", "stage 1", "stage 2"]


@pytest.mark.parametrize(
    "name, unet_parameters",
    [("sd15", 859_520_964), ("sd21-base", 865_910_724), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)],
)
def test_architectures_are_the_released_models(name, unet_parameters):
    """The U-Nets built from the shipped configs have the released models' parameter counts (SD 2.1's as the H100
    measurement counted it)."""
    models = build_models(ARCHITECTURES[name].configs(), torch.bfloat16, "meta")
    assert sum(p.numel() for p in models.unet.parameters()) == unet_parameters
    assert architecture_for(ARCHITECTURES[name].hub_ids[0].upper()) is ARCHITECTURES[name]


def test_time_on_the_calibration_card_is_its_throughput(tiny_model):
    estimate = estimate_run(_tiny_run_config(tiny_model).with_stage_values(steps=(2, 3, 4)), suggest=False)
    low, high = estimate.seconds(GPUS["h100"])
    want = sum(
        p.steps * p.flops / (H100_ACHIEVED_TFLOPS[int(p.name[-1]) if p.name != "stage 3" else "lora"] * 1e12)
        for p in estimate.phases
        if p.steps
    )
    assert low == pytest.approx(want) and high == pytest.approx(want)
    slow_low, slow_high = estimate.seconds(GPUS["rtx3090"])
    assert want < slow_low <= slow_high


def test_suggestions_keep_the_effective_batch(tiny_model):
    config = _tiny_run_config(tiny_model, batch_size=4, gradient_accumulation_steps=1, stage3_mode="full")
    candidates = list(_candidates(config))
    assert [text.split("`")[-2] for text, _ in candidates[:2]] == ["gradient_checkpointing", "offload_frozen"]
    assert "`batch_size` 2 `gradient_accumulation_steps` 2" in candidates[2][0]
    assert candidates[-1][1].stage3_mode == "lora"
    for _, candidate in candidates:  # the same images per optimizer step, less memory per pass
        assert candidate.batch_size * candidate.gradient_accumulation_steps == 4
    # with a LoRA stage 3 (and torchao installed), the last resort is the 8-bit base, with everything above kept
    lora = list(_candidates(dataclasses.replace(config, stage3_mode="lora")))
    text, last = lora[-1]
    assert "`quantize_base` int8" in text and last.quantize_base == "int8" and last.offload_frozen
    assert not any(c.quantize_base for _, c in lora[:-1])
    config = config.with_stage_values(steps=(0, 1, 0))
    peak = estimate_run(config, suggest=False).peak_gib
    estimate = estimate_run(config, gpu_memory_gib=peak)  # needs the headroom too: does not fit
    assert not estimate.fits(peak) and estimate.suggestions
    assert all(found < peak for _, found in estimate.suggestions)
    # counting stops at the first setting that fits (with the headroom), if one does
    fitting = [found for _, found in estimate.suggestions if found * (1 + ALLOCATOR_HEADROOM) <= peak]
    assert fitting in ([], [estimate.suggestions[-1][1]])


def test_no_local_gpu_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert local_gpu() is None


def test_optimizer_state_follows_the_optimizer(tiny_model):
    """Prodigy keeps twice AdamW's state (plus `s` and `p0`); 8-bit AdamW a quarter for large parameters."""
    state = {}
    for kind in ("adamw", "prodigy", "adamw8bit"):
        models = build_models(_tiny_configs(tiny_model), torch.float32, "meta")
        config = _tiny_run_config(tiny_model, optimizer=kind)
        count_phase(models, config, Phase("stage", 2), images=4, flops=False)
        state[kind] = count_phase(models, config, Phase("stage", 3), images=4, flops=False).peak["optimizer"]
    assert state["prodigy"] == 2 * state["adamw"]
    assert state["adamw8bit"] < state["adamw"]
