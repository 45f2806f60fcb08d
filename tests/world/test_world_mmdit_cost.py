# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/world_mmdit_cost.py at a toy size: both denoisers time a real training step (the text encoder and the
denoiser learn), the report carries every promised field, and the prediction is the stated formula."""

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


def test_the_report_and_its_prediction(tmp_path, capsys):
    cost = load_benchmark("world_mmdit_cost")
    record = tmp_path / "pretrain.json"
    record.write_text(json.dumps({"steps_done": 100, "unet_seconds": 50.0}))
    out = tmp_path / "cost.json"
    argv = ["--layers", "1", "--heads", "1", "--batch-size", "2", "--repeats", "1", "--threads", "1"]
    assert cost.main([*argv, "--pretrain-json", str(record), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"unet", "mmdit-1"} and report["batch_size"] == 2
    unet = report["results"]["unet"]["seconds_per_step"]
    assert report["recorded_unet_seconds_per_step"] == 0.5
    for name, r in report["results"].items():
        assert r["recipe_minutes_steps_only"] == pytest.approx(r["seconds_per_step"] * 60, abs=0.06)
        want = r["seconds_per_step"] * 0.5 / unet * 3600 / 60
        assert report["predicted_pretrain_minutes"][name] == pytest.approx(want, abs=0.06)
    assert "mmdit-1" in capsys.readouterr().out
    # no record, no prediction
    assert cost.main([*argv, "--pretrain-json", str(tmp_path / "none.json"), "--out", str(out)]) == 0
    assert "predicted_pretrain_minutes" not in json.loads(out.read_text())
