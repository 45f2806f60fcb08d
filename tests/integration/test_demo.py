# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb demo --random-weights` runs the whole flow offline (tiny random model) and says where everything is
(the world demo, the default, is tested in test_world_demo.py)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attndb_peft.cli import main
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, KOHYA_NAME, LORA_NAME, MODEL_CARD_NAME


def test_demo_runs_end_to_end_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: everything is built or written locally
    out = tmp_path / "attndb-demo"
    assert main(["demo", "--output", str(out), "--steps", "2,2,2", "--random-weights", "--quiet"]) == 0
    printed = capsys.readouterr().out

    assert (out / "base-model" / "model_index.json").is_file()
    assert len(list((out / "instance-images").glob("*.png"))) == 4
    adapter = out / "adapter"
    for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME, MODEL_CARD_NAME):
        assert (adapter / name).is_file(), name
    info = json.loads((adapter / CONFIG_NAME).read_text())
    assert info["token"] == "<attndb-toy>" and info["settings"]["stage3"]["steps"] == 2
    samples = adapter / "samples"
    for stage in (1, 2, 3):
        assert (samples / f"stage{stage}-step2.png").is_file()
        assert (samples / f"stage{stage}-attention.png").is_file()
    assert "samples/final-00.png" in (adapter / MODEL_CARD_NAME).read_text()
    # the adapter loaded back with pipe.load_attndb drew these
    grid = Image.open(out / "reloaded" / "samples.png")
    assert grid.width == 2 * (128 + 4) + 4
    attention = json.loads((out / "reloaded" / "attention.json").read_text())
    assert attention["prompt"] == "a photo of a <attndb-toy> toy in the jungle"
    assert [t["text"] for t in attention["tokens"]][4:6] == ["<attndb-toy>", "toy"]
    assert Image.open(out / "reloaded" / "attention.png").width == (1 + 9) * (128 + 4) + 4

    for path in (out / "base-model", adapter, adapter / "samples", out / "reloaded" / "attention.png"):
        assert str(path) in printed
    assert "attndb generate" in printed and "attndb inspect" in printed


def test_a_new_demo_replaces_an_earlier_one_but_nothing_else(tmp_path):
    from attndb_peft.demo import _prepare
    from attndb_peft.inference import UsageError

    out = tmp_path / "demo"
    _prepare(out)
    (out / "adapter").mkdir()
    (out / "adapter" / "stale.txt").write_text("from the first run")
    _prepare(out)
    assert not (out / "adapter").exists() and (out / ".attndb-demo").is_file()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"not ours")
    with pytest.raises(UsageError, match="not empty"):
        _prepare(tmp_path / "photos")
    assert (tmp_path / "photos" / "me.jpg").read_bytes() == b"not ours"


def test_sdxl_demo_runs_offline_and_needs_random_weights(tmp_path, capsys):
    out = tmp_path / "demo-xl"
    argv = ["demo", "--output", str(out), "--steps", "1,1,1", "--random-weights", "--family", "sdxl", "--quiet"]
    assert main(argv) == 0
    assert json.loads((out / "base-model" / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLPipeline"
    )
    assert json.loads((out / "adapter" / CONFIG_NAME).read_text())["family"] == "sdxl"
    attention = json.loads((out / "reloaded" / "attention.json").read_text())
    assert [t["text"] for t in attention["tokens"]][4:6] == ["<attndb-toy>", "toy"]
    assert main(["demo", "--output", str(tmp_path / "world-xl"), "--family", "sdxl", "--quiet"]) == 2
    assert "--random-weights" in capsys.readouterr().err
