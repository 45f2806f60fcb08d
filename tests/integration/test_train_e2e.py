# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""End to end: `attndb train` on the tiny pipeline: the adapter folder's files, the combined LoRA, fp16 and
`--stage3 full` exports loaded with stock diffusers, resuming, gradient checkpointing, v-prediction, the CLI in a
subprocess. That the exported files loaded with stock diffusers reproduce the trained in-memory model is tested for
every family in test_family_contracts.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_LRS, fresh_pipeline, generate, make_config
from safetensors import safe_open
from safetensors.torch import load_file

from attndb_peft.cli import build_parser, config_from_args, main
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, KOHYA_NAME, LORA_NAME, MODEL_CARD_NAME
from attndb_peft.testing import TINY_RESOLUTION
from attndb_peft.trainer import Trainer


def _stock_load(pipe, folder):
    pipe.load_textual_inversion(str(folder / EMBEDDING_NAME))
    pipe.load_lora_weights(str(folder), weight_name=LORA_NAME, adapter_name="concept")
    return pipe


@pytest.fixture(scope="module")
def cli_run(tiny_model, instance_dir, tmp_path_factory):
    """A run configured through the CLI's own parser (the same path `attndb train` takes)."""
    out = tmp_path_factory.mktemp("e2e") / "out"
    args = build_parser().parse_args(
        [
            "train",
            "--model",
            str(tiny_model),
            "--images",
            str(instance_dir),
            "--category",
            "dog",
            "--output",
            str(out),
            "--resolution",
            str(TINY_RESOLUTION),
            "--batch-size",
            "2",
            "--steps",
            "3,3,3",
            "--learning-rates",
            ",".join(map(str, TINY_LRS)),
            "--save-dtype",
            "fp32",
            "--seed",
            "7",
        ]
    )
    config = config_from_args(args)
    config.validation_prompts = ()
    trainer = Trainer(config)
    trainer.run()
    return trainer


def test_output_folder_has_the_contract_files(cli_run):
    out = cli_run.output_dir
    for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME, MODEL_CARD_NAME):
        assert (out / name).is_file(), name
    emb = load_file(str(out / EMBEDDING_NAME))
    assert list(emb) == ["<attndb-dog>"] and emb["<attndb-dog>"].shape == (32,)  # 1-D: every client reads it
    lora = load_file(str(out / LORA_NAME))
    assert lora and all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in lora)
    assert any(".attn2." in k for k in lora) and any(".attn1." in k for k in lora)
    info = json.loads((out / CONFIG_NAME).read_text())
    assert info["token"] == "<attndb-dog>" and info["category"] == "dog"
    assert info["base_model"] == str(cli_run.config.model)
    assert info["settings"]["stage1"]["steps"] == 3 and info["settings"]["seed"] == 7
    assert {"torch", "diffusers", "peft", "transformers"} <= set(info["versions"])
    with safe_open(str(out / LORA_NAME), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] > 0  # diffusers' adapter metadata
    assert meta["attndb_token"] == "<attndb-dog>"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["stage1-step3", "stage2-step3", "stage3-step3"]


def test_combined_lora_equals_stage2_plus_stage3(cli_run, tiny_model):
    """The exported single LoRA gives the same U-Net outputs as the two trained adapters applied together."""
    from diffusers import UNet2DConditionModel

    from attndb_peft.stages import ADAPTER_STAGE2, ADAPTER_STAGE3

    assert set(cli_run.unet.active_adapters()) == {ADAPTER_STAGE2, ADAPTER_STAGE3}
    fresh = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    fresh.load_lora_adapter(str(cli_run.output_dir / LORA_NAME), prefix="unet", adapter_name="combined")
    g = torch.Generator().manual_seed(0)
    x, t, states = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = cli_run.unet(x, t, states).sample
        got = fresh(x, t, states).sample
        base = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")(x, t, states).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-4
    # the stage-2-only LoRA alone is not enough: stage 3 contributes
    cli_run.unet.set_adapters([ADAPTER_STAGE2])
    with torch.no_grad():
        stage2_only = cli_run.unet(x, t, states).sample
    cli_run.unet.set_adapters([ADAPTER_STAGE2, ADAPTER_STAGE3])
    assert (stage2_only - want).abs().max() > 1e-5


def test_default_fp16_export_is_close(tiny_model, instance_dir, tmp_path):
    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path / "out", save_dtype="fp16"))
    trainer.run()
    assert {v.dtype for v in load_file(str(tmp_path / "out" / LORA_NAME)).values()} == {torch.float16}
    prompt = "a photo of a <attndb-dog> dog"
    expected = generate(trainer.pipeline(), prompt)
    got = generate(_stock_load(fresh_pipeline(tiny_model), tmp_path / "out"), prompt)
    assert abs(got - expected).max() < 2e-2


def test_stage3_full_exports_an_svd_lora(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    trainer = Trainer(make_config(tiny_model, instance_dir, out, stage3_mode="full", full_export_rank=4))
    trainer.run()
    info = json.loads((out / CONFIG_NAME).read_text())
    retained = info["report"]["full_export_retained"]
    assert 0 < retained <= 1
    assert "energy" in (out / MODEL_CARD_NAME).read_text()
    lora = load_file(str(out / LORA_NAME))
    ranks = {v.shape[0] for k, v in lora.items() if ".lora_A." in k}
    assert max(ranks) <= 4
    # the LoRA loads with stock diffusers and moves the base model towards the fine-tuned U-Net (the last
    # checkpoint keeps it) ...
    pipe = _stock_load(fresh_pipeline(tiny_model), out)
    tuned_unet = copy.deepcopy(trainer.unet)
    tuned_weights = load_file(str(out / "checkpoints" / "stage3-step3" / "weights.safetensors"))
    tuned_unet.load_state_dict({k.removeprefix("unet_full."): v for k, v in tuned_weights.items() if "_full." in k})
    g = torch.Generator().manual_seed(1)
    x, t, states = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        tuned = tuned_unet(x, t, states).sample
        in_memory = trainer.unet(x, t, states).sample
        loaded = pipe.unet(x, t, states).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, states).sample
    assert (loaded - tuned).norm() < (base - tuned).norm()
    # ... and the final samples and the model card's pictures come from exactly what was exported:
    # the in-memory U-Net is base + the exported LoRA, not the fine-tuned U-Net the rank-4 LoRA only approximates
    assert (in_memory - tuned).abs().max() > 1e-3
    torch.testing.assert_close(in_memory, loaded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage3_mode", ["lora", "full"])
def test_resume_from_a_stage_checkpoint_gives_the_same_adapter(tiny_model, instance_dir, tmp_path, stage3_mode):
    """Delete everything after a mid-stage checkpoint, resume: the adapter is bit-identical."""
    import shutil

    out = tmp_path / "out"
    settings = dict(checkpointing_steps=2, stage3_mode=stage3_mode)
    Trainer(make_config(tiny_model, instance_dir, out, **settings)).run()
    reference = {name: load_file(str(out / name)) for name in (EMBEDDING_NAME, LORA_NAME)}
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["stage1-step2", "stage1-step3", "stage2-step2", "stage2-step3", "stage3-step2", "stage3-step3"]
    kill_points = ("stage1-step2", "stage2-step3", "stage3-step2") if stage3_mode == "lora" else ("stage3-step2",)
    for kept_until in kill_points:
        for p in sorted((out / "checkpoints").iterdir()):
            if p.name > kept_until:
                shutil.rmtree(p)
        for name in (EMBEDDING_NAME, LORA_NAME):
            (out / name).unlink()
        Trainer(make_config(tiny_model, instance_dir, out, resume=True, **settings)).run()
        for name, tensors in reference.items():
            resumed = load_file(str(out / name))
            assert resumed.keys() == tensors.keys()
            for k in tensors:
                assert torch.equal(resumed[k], tensors[k]), (kept_until, name, k)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model, instance_dir, tmp_path):
    """Recomputing the forward pass re-captures the attention maps without duplicating them."""
    runs = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        Trainer(make_config(tiny_model, instance_dir, out, gradient_checkpointing=flag)).run()
        runs[flag] = load_file(str(out / LORA_NAME))
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-5, atol=1e-6)


def test_v_prediction_model_trains(instance_dir, tmp_path):
    from attndb_peft.testing import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "v-model", prediction_type="v_prediction")
    trainer = Trainer(make_config(model, instance_dir, tmp_path / "out", steps=(1, 1, 1)))
    trainer.run()
    assert trainer.noise_scheduler.config.prediction_type == "v_prediction"
    assert (tmp_path / "out" / LORA_NAME).is_file()


def test_cli_subprocess_trains_and_exits_zero(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attndb_peft",
            "train",
            "--model",
            str(tiny_model),
            "--images",
            str(instance_dir),
            "--category",
            "dog",
            "--output",
            str(out),
            "--resolution",
            "32",
            "--batch-size",
            "1",
            "--steps",
            "1,1,1",
            "--validation-prompts",  # none: sample grids are covered by test_reporting.py
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / LORA_NAME).is_file() and proc.stdout.strip().endswith(str(out))
    # a second run into the same folder is refused with exit code 2 and touches nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    args = ["train", "--model", str(tiny_model), "--images", str(instance_dir), "--category", "dog"]
    assert main([*args, "--output", str(out), "--resolution", "32"]) == 2  # (the exit code path: the run above)
    err = capsys.readouterr().err
    assert "--output" in err and "--overwrite" in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("targets", ["attn2", "unet"])
def test_stage3_targets_choose_the_layers_of_stage_3s_lora(tiny_model, instance_dir, tmp_path, targets):
    """`attn2`: stage 3's LoRA covers the cross-attention only (the combined LoRA then covers just what stage 2
    does); `unet`: also the ResNet convolutions and time projections and the resamplers (kohya's LoCon). Either
    loads with stock diffusers to the pixels of the models it was trained in."""
    out = tmp_path / targets
    trainer = Trainer(make_config(tiny_model, instance_dir, out, stage3_targets=targets, steps=(1, 1, 2)))
    trainer.run()
    modules = {k.split(".lora_")[0].removeprefix("unet.") for k in load_file(str(out / LORA_NAME))}
    if targets == "attn2":
        assert modules and all(".attn2." in m for m in modules)
    else:
        assert any(m.endswith(("resnets.0.conv1", "resnets.0.conv2")) for m in modules)
        assert any(m.endswith("time_emb_proj") for m in modules) and any("samplers.0.conv" in m for m in modules)
        assert any(".attn1." in m or ".ff." in m for m in modules)
        kohya = load_file(str(out / KOHYA_NAME))
        assert any("resnets_0_conv1.lora_down" in k for k in kohya)
    assert json.loads((out / CONFIG_NAME).read_text())["settings"]["stage3_targets"] == targets
    prompt = "a photo of a <attndb-dog> dog"
    torch.testing.assert_close(
        generate(_stock_load(fresh_pipeline(tiny_model), out), prompt), generate(trainer.pipeline(), prompt),
        rtol=0, atol=1e-5,
    )
