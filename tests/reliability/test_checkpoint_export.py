# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Any checkpoint exports as an adapter (`attndb export`), and a finished run can be extended with more stage-3
steps (`attndb train --resume` with a larger stage-3 step count)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import fresh_pipeline, generate
from test_reliability import _adapter, _train_args

from attndb_peft.cli import main
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, LORA_NAME


def _assert_same(got, want):
    for name, tensors in want.items():
        assert got[name].keys() == tensors.keys(), name
        for key, value in tensors.items():
            assert torch.equal(got[name][key], value), (name, key)


@pytest.fixture(scope="module")
def run(tiny_model, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(_train_args(tiny_model, instance_dir, out, "--checkpointing-steps", "1")) == 0
    return out


def test_the_last_checkpoint_exports_the_runs_own_adapter(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "stage3-step2"), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in run.iterdir() if p.is_file())
    _assert_same(_adapter(out), _adapter(run))
    info = json.loads((out / CONFIG_NAME).read_text())
    assert info["report"]["checkpoint"] == "stage3-step2" and info["settings"]["stage3"]["steps"] == 2


def test_an_earlier_checkpoint_exports_a_loadable_adapter_of_that_step(run, tiny_model, tmp_path):
    out = tmp_path / "step1"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "stage3-step1"), "--output", str(out)]) == 0
    info = json.loads((out / CONFIG_NAME).read_text())
    assert [info["settings"][f"stage{s}"]["steps"] for s in (1, 2, 3)] == [2, 2, 1]
    early, final = _adapter(out), _adapter(run)
    assert early[LORA_NAME].keys() == final[LORA_NAME].keys()
    assert torch.equal(early[EMBEDDING_NAME]["<attndb-dog>"], final[EMBEDDING_NAME]["<attndb-dog>"])  # stage 1 done
    assert any(not torch.equal(early[LORA_NAME][k], final[LORA_NAME][k]) for k in final[LORA_NAME])
    pipe = fresh_pipeline(tiny_model)
    token = pipe.load_attndb(str(out))
    assert generate(pipe, f"a photo of a {token} dog").shape == (1, 32, 32, 3)

    stage2 = tmp_path / "stage2"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "stage2-step2"), "--output", str(stage2)]) == 0
    modules = {k.split(".lora_")[0] for k in _adapter(stage2)[LORA_NAME]}
    assert modules and all(".attn2." in m for m in modules)  # stage 2 trains the attn2 LoRA only
    fresh_pipeline(tiny_model).load_attndb(str(stage2))


def test_export_refuses_bad_input_and_writes_nothing(run, tmp_path, capsys):
    cases = [
        (run, "not a complete checkpoint (no state.json)"),
        (run / "checkpoints" / "stage1-step2", "a stage-1 checkpoint holds only the token embedding"),
    ]
    for checkpoint, message in cases:
        assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    checkpoint = run / "checkpoints" / "stage3-step2"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "full")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_a_finished_run_extended_with_more_stage3_steps_equals_the_longer_run(run, tiny_model, instance_dir, tmp_path):
    longer = tmp_path / "longer"
    assert main(_train_args(tiny_model, instance_dir, longer, "--checkpointing-steps", "1", steps="2,2,4")) == 0
    out = tmp_path / "out"
    shutil.copytree(run, out)  # a finished run (2,2,2)
    info = json.loads((out / CONFIG_NAME).read_text())
    info["settings"]["output"] = str(out)
    (out / CONFIG_NAME).write_text(json.dumps(info))
    # extend: the run's own config, more stage-3 steps, --resume from its last checkpoint
    config = str(out / CONFIG_NAME)
    assert main(["train", "--config", config, "--resume", "--steps", "2,2,4", "--quiet"]) == 0
    _assert_same(_adapter(out), _adapter(longer))
    assert json.loads((out / CONFIG_NAME).read_text())["settings"]["stage3"]["steps"] == 4


def test_resume_refuses_fewer_stage3_steps_than_the_checkpoint(run, tmp_path, capsys):
    assert main(["train", "--config", str(run / CONFIG_NAME), "--resume", "--steps", "2,2,1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "stage-3 step 2, beyond the 1 stage-3 steps" in err and "attndb export --checkpoint" in err
