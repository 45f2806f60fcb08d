# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/world_mmdit_cost.py at a toy size: both denoisers time a real training step (the text encoder and the
denoiser learn), and the report carries every promised field."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark

from attndb_peft.world.model import build_world_pipeline


def test_a_step_trains_both_models():
    cost = load_benchmark("world_mmdit_cost")
    pipe = build_world_pipeline()
    transformer = cost.build_mmdit(1, 1, pipe.text_encoder.config.hidden_size)
    for denoiser, loss in ((pipe.unet, cost._unet_loss), (transformer, cost._mmdit_loss)):
        before = [p.detach().clone() for p in (*denoiser.parameters(), *pipe.text_encoder.parameters())]
        timed = cost.time_step(denoiser, pipe.text_encoder, loss, batch_size=2, repeats=1)
        after = [*denoiser.parameters(), *pipe.text_encoder.parameters()]
        assert timed["parameters"] == sum(p.numel() for p in denoiser.parameters())
        assert timed["seconds_per_step"] > 0 and len(timed["seconds"]) == 1 and timed["gflops_per_step"] > 0
        # AdamW moved every weight the loss reaches; the text encoder's position ids are buffers, not parameters
        assert sum(not torch.equal(a, b) for a, b in zip(after, before)) > 0.9 * len(before)


def test_the_report(tmp_path, capsys):
    cost = load_benchmark("world_mmdit_cost")
    out = tmp_path / "cost.json"
    argv = ["--layers", "1,2", "--heads", "1", "--batch-size", "2", "--repeats", "1", "--threads", "1"]
    assert cost.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"unet", "mmdit-1", "mmdit-2"} and report["batch_size"] == 2
    one, two = report["results"]["mmdit-1"], report["results"]["mmdit-2"]
    assert two["parameters"] > one["parameters"] and two["gflops_per_step"] > one["gflops_per_step"]
    for r in report["results"].values():
        assert r["recipe_minutes"] == pytest.approx(r["seconds_per_step"] * 3600 / 60, abs=0.06)
    printed = capsys.readouterr().out
    assert "mmdit-2" in printed and str(out) in printed
