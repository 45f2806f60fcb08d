# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/world_pretrain_sweep.py --tiny: one variant pretrained, scored and personalised end to end in seconds,
its summary written with every promised field, and a finished variant skipped when the script runs again."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_tiny_sweep_writes_its_summary_and_skips_finished_variants(tmp_path, capsys):
    sweep = load_benchmark("world_pretrain_sweep")
    argv = ["--tiny", "--only", "joint_plain", "--device", "cpu", "--out", str(tmp_path)]
    summary = sweep.main(argv)
    assert summary == json.loads((tmp_path / "sweep.json").read_text())
    assert summary["device"] == "cpu" and summary["torch"]
    variant = summary["variants"]["joint_plain"]
    assert variant["finished"] is True
    # the variant's own settings, with --tiny's sizes on top
    assert variant["settings"]["object_loss_weight"] == 0.0 and variant["settings"]["train_text_encoder"] is True
    assert variant["settings"]["steps"] == 4
    for part in ("held_out", "train"):
        assert set(variant[part]) == set(sweep.KEYS)
    assert set(variant["personalization"]) == {"context_ok", "present", "identity_ok"}
    assert (tmp_path / "joint_plain" / "pipeline" / "model_index.json").is_file()
    capsys.readouterr()
    assert sweep.main(argv) == summary
    assert "joint_plain: done before, skipped" in capsys.readouterr().out
