# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/record_hashes.py, the behaviour check of refactors: what it treats as the same and as different.
(Its seeded runs take a minute; here its hashing runs on files written in the test.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import load_benchmark
from safetensors.torch import save_file

record_hashes = load_benchmark("record_hashes")


def _write_run(folder: Path, tensors: dict, metadata: dict, config: dict) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    save_file(tensors, str(folder / "weights.safetensors"), metadata=metadata)
    (folder / "attndb_config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text(f"trained in {config.get('seconds')} s")  # the card: set aside
    (folder / "logs").mkdir()
    (folder / "logs" / "events").write_text(str(config.get("seconds")))
    return folder


def test_the_same_run_in_other_folders_at_other_times_hashes_the_same(tmp_path):
    a = torch.arange(6.0).reshape(2, 3)
    b = torch.ones(4, dtype=torch.float16)
    modules = ["up.attn2.to_q", "down.attn1.to_k", "mid.ff.net.2"]
    runs = []
    for name, order, seconds in (("one", modules, 12.5), ("two", modules[::-1], 99.0)):
        root = tmp_path / name
        tensors = {"b": b, "a": a} if name == "one" else {"a": a, "b": b}
        peft = json.dumps({"unet.target_modules": order, "unet.r": 4})
        metadata = {"attndb_base_model": str(root / "model"), "lora_adapter_metadata": peft, "attndb_version": name}
        config = {"model": str(root / "model"), "seconds": seconds, "settings": {"seed": 0}}
        runs.append(record_hashes.hash_folder(_write_run(root / "run", tensors, metadata, config), root))
    assert runs[0] == runs[1]
    assert sorted(runs[0]) == ["attndb_config.json", "weights.safetensors"]
    assert record_hashes.compare({"r": runs[0]}, {"r": runs[1]}) == []


def test_a_changed_weight_setting_or_file_is_named(tmp_path):
    config = {"model": "m", "settings": {"seed": 0}}
    before = record_hashes.hash_folder(_write_run(tmp_path / "a", {"w": torch.zeros(3)}, {}, config), tmp_path)
    changed_weight = record_hashes.hash_folder(
        _write_run(tmp_path / "b", {"w": torch.tensor([0.0, 0.0, 1e-7])}, {}, config), tmp_path
    )
    changed_setting = record_hashes.hash_folder(
        _write_run(tmp_path / "c", {"w": torch.zeros(3)}, {}, {**config, "settings": {"seed": 1}}), tmp_path
    )
    assert changed_weight["weights.safetensors"] != before["weights.safetensors"]
    assert changed_setting["attndb_config.json"] != before["attndb_config.json"]
    extra = {**before, "new.json": "0"}
    del extra["weights.safetensors"]
    assert record_hashes.compare({"r": before}, {"r": extra}) == [
        "r/new.json: new",
        "r/weights.safetensors: missing now",
    ]
