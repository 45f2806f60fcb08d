# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Gradient accumulation: N passes of batch b train like one pass of batch N*b, and resume stays bit-identical."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import make_config
from test_reliability import ENV, TESTS, _adapter, _train_args

from attndb_peft.cli import main
from attndb_peft.trainer import Trainer


def _first_step_gradients(tiny_model, instance_dir, out, **overrides):
    """The gradients of every stage's first optimizer step (recorded just before the optimizer uses them)."""
    trainer = Trainer(make_config(tiny_model, instance_dir, out, **overrides))
    trainer.prepare()
    grads = {}
    for stage in (1, 2, 3):
        trainer.build_stage(stage)
        trainer.make_optimizer(stage)
        step = trainer.optimizer.step

        def record(*args, stage=stage, step=step, **kwargs):
            grads[stage] = [p.grad.detach().clone() for p in trainer.params]
            return step(*args, **kwargs)

        trainer.optimizer.step = record
        with trainer.stage_loop(stage) as train_step:
            train_step(0)
    return trainer, grads


def test_accumulated_passes_give_the_gradient_of_one_larger_batch(tiny_model, instance_dir, tmp_path):
    _, large = _first_step_gradients(tiny_model, instance_dir, tmp_path / "large", batch_size=4)
    trainer, accumulated = _first_step_gradients(
        tiny_model, instance_dir, tmp_path / "acc", batch_size=2, gradient_accumulation_steps=2
    )
    _, small = _first_step_gradients(tiny_model, instance_dir, tmp_path / "small", batch_size=2)
    assert trainer.result.batch == "4 images per optimizer step (2 per pass x 2 accumulated pass(es) x 1 process(es))"
    for stage in (1, 2, 3):  # same images, noise and timesteps; the per-layer regularizer sums over the batch
        assert len(accumulated[stage]) == len(large[stage]) > 0
        for got, want in zip(accumulated[stage], large[stage]):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), stage
        assert any(not torch.allclose(g, w, rtol=1e-4, atol=1e-7) for g, w in zip(small[stage], large[stage]))


def test_accumulation_keeps_the_min_snr_weights_and_noise_offset_of_one_larger_batch(
    tiny_model, instance_dir, tmp_path
):
    """Min-SNR's per-sample weights follow each pass's own samples, and the noise offset is drawn once for the whole
    step, so accumulated passes still train like one larger batch."""
    options = dict(snr_gamma=0.5, noise_offset=0.1)
    _, large = _first_step_gradients(tiny_model, instance_dir, tmp_path / "large", batch_size=4, **options)
    _, accumulated = _first_step_gradients(
        tiny_model, instance_dir, tmp_path / "acc", batch_size=2, gradient_accumulation_steps=2, **options
    )
    _, plain = _first_step_gradients(tiny_model, instance_dir, tmp_path / "plain", batch_size=4)
    for stage in (1, 2, 3):
        for got, want in zip(accumulated[stage], large[stage]):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), stage
        assert any(not torch.allclose(g, w, rtol=1e-4, atol=1e-7) for g, w in zip(plain[stage], large[stage]))


def test_sigkill_then_resume_with_accumulation_is_bit_identical(tiny_model, instance_dir, tmp_path):
    """Killed between the two passes of an accumulated step, resumed to an uninterrupted run's adapter, bit for bit
    (only the killed run needs a process of its own; the reference and the resume run here)."""
    extra = ("--checkpointing-steps", "1", "--gradient-accumulation-steps", "2")
    reference = tmp_path / "reference"
    assert main(_train_args(tiny_model, instance_dir, reference, *extra)) == 0
    out = tmp_path / "out"
    args = _train_args(tiny_model, instance_dir, out, *extra)
    # the 7th loss is stage 2, step 2, first of its two passes
    killed = subprocess.run(
        [sys.executable, str(TESTS / "fault_injection.py"), "loss", "7", "--", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert main([*args, "--resume"]) == 0
    got, want = _adapter(out), _adapter(reference)
    for name, tensors in want.items():
        assert got[name].keys() == tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(got[name][key], value), (name, key)
