# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Single-file base models (one .safetensors in the original SD layout, as A1111/ComfyUI keep them): train,
generate and export with `--model FILE --model-config CONFIG`, through diffusers' `from_single_file`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from safetensors.torch import load_file

from attndb_peft.base_model import BaseModelError, check_base_model
from attndb_peft.cli import main
from attndb_peft.export import EMBEDDING_NAME, KOHYA_NAME, LORA_NAME
from attndb_peft.inference import load_pipeline
from attndb_peft.testing import build_tiny_pipeline, save_tiny_single_file
from attndb_peft.trainer import Trainer


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    return save_tiny_single_file(tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def test_the_single_file_loads_the_same_weights_with_diffusers(single_file, tiny_model):
    pipe, _ = load_pipeline(str(single_file), device="cpu", model_config=str(tiny_model))
    reference = build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_training_on_a_single_file_equals_training_on_the_folder(
    single_file, tiny_model, instance_dir, trained, tmp_path
):
    out = tmp_path / "out"
    config = make_config(single_file, instance_dir, out, model_config=str(tiny_model))
    Trainer(config).run()
    for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME):
        got, want = load_file(str(out / name)), load_file(str(trained.output_dir / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    # generate takes the file too; with only --adapter, the run's model and model config are used
    assert main(["generate", "--adapter", str(out), "--prompt", "a photo of a {}", "--steps", "2", "--output",
                 str(tmp_path / "gen"), "--height", "32", "--width", "32", "--quiet"]) == 0  # fmt: skip
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_single_file_problems_are_one_line(single_file, tiny_model, tmp_path, capsys):
    with pytest.raises(BaseModelError, match="a single-file checkpoint needs the diffusers config.*`model_config`"):
        check_base_model(str(single_file))
    with pytest.raises(BaseModelError, match="`model_config` .*: no such folder or file"):
        check_base_model(str(single_file), model_config=str(tmp_path / "missing"))
    with pytest.raises(BaseModelError, match="`model_config` .*only used with a single .safetensors file"):
        check_base_model(str(tiny_model), model_config=str(tiny_model))
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    with pytest.raises(BaseModelError, match=r"pickle checkpoints \(.ckpt\) are not loaded"):
        check_base_model(str(tmp_path / "old.ckpt"))
    out = tmp_path / "out"
    argv = ["train", "--model", str(single_file), "--images", str(tmp_path), "--category", "dog", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs the diffusers config of its architecture; pass --model-config" in err and not out.exists()
