# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The training options beyond the paper's recipe, on the tiny pipeline through `attndb train`: the authors' fast
recipe (`--recipe fast`), Min-SNR weighting, the noise offset and the optimizers. Each is off by default, and off
trains bit-identically to a run that never names it; on, it changes the adapter; a checkpoint resumes only with the
same value. (That the defaults also reproduce the previous release's files is `benchmarks/record_hashes.py
--check` with `--ignore-keys recipe,snr_gamma,noise_offset,optimizer`.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attndb_peft.cli import main
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, LORA_NAME
from attndb_peft.training import optimizers


def _args(model, images, out, *extra, steps="2,2,2", rates=("--learning-rates", "5e-2,1e-2,1e-2"), batch=True):
    return [
        "train", "--model", str(model), "--images", str(images), "--category", "dog", "--output", str(out),
        "--resolution", "32", *(("--batch-size", "2") if batch else ()), "--steps", steps, *rates,
        "--save-dtype", "fp32", "--quiet", "--validation-prompts", *extra,
    ]  # fmt: skip


def _adapter(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(out / name)) for name in (EMBEDDING_NAME, LORA_NAME)}


def _settings(out: Path) -> dict:
    return json.loads((out / CONFIG_NAME).read_text())["settings"]


def _same(a, b) -> bool:
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def _all_differ(a, b) -> bool:
    """Both the token (stage 1) and the LoRA (stages 2-3) came out different."""
    return all(any(not torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


@pytest.fixture(scope="module")
def default_run(tiny_model, instance_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "out"
    assert main(_args(tiny_model, instance_dir, out, "--checkpointing-steps", "1")) == 0
    return out


def test_every_option_off_trains_bit_identically(default_run, tiny_model, instance_dir, tmp_path):
    out = tmp_path / "off"
    off = ["--recipe", "paper", "--noise-offset", "0", "--optimizer", "adamw", "--checkpointing-steps", "1"]
    assert main(_args(tiny_model, instance_dir, out, *off)) == 0
    assert _same(_adapter(out), _adapter(default_run))
    # the noise generator drew nothing extra: every checkpoint's tensors (weights, optimizer, generator states)
    # are the default run's
    steps = sorted(p.name for p in (default_run / "checkpoints").iterdir())
    assert steps == sorted(p.name for p in (out / "checkpoints").iterdir()) and len(steps) == 6
    for step in steps:
        for file in sorted((default_run / "checkpoints" / step).glob("*.safetensors")):
            a, b = load_file(str(file)), load_file(str(out / "checkpoints" / step / file.name))
            assert _same({"": a}, {"": b}), (step, file.name)
    settings = _settings(default_run)
    assert (settings["recipe"], settings["snr_gamma"], settings["noise_offset"], settings["optimizer"]) == (
        "paper", None, 0.0, "adamw",
    )


@pytest.mark.parametrize(
    "flags, key, value",
    [
        (("--snr-gamma", "0.5"), "snr_gamma", 0.5),
        (("--noise-offset", "0.1"), "noise_offset", 0.1),
        (("--optimizer", "prodigy", "--learning-rates", "1.0"), "optimizer", "prodigy"),
        (("--optimizer", "adamw8bit"), "optimizer", "adamw8bit"),
    ],
    ids=["snr_gamma", "noise_offset", "prodigy", "adamw8bit"],
)
def test_each_option_changes_the_training_and_is_recorded(default_run, tiny_model, instance_dir, tmp_path, flags, key,
                                                          value):
    if value == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "on"
    assert main(_args(tiny_model, instance_dir, out, *flags)) == 0
    got, default = _adapter(out), _adapter(default_run)
    assert _all_differ(got, default)
    assert all(torch.isfinite(t).all() for tensors in got.values() for t in tensors.values())
    assert _settings(out)[key] == value


def test_min_snr_weights_the_masked_loss_too(tiny_model, tmp_path):
    from PIL import Image

    from attndb_peft.testing import make_instance_images

    images, masks = tmp_path / "images", tmp_path / "masks"
    masks.mkdir()
    for path in make_instance_images(images, num_images=2, size=48):
        mask = Image.new("L", (48, 48), 0)
        mask.paste(255, (8, 8, 40, 40))  # the subject: the middle of the photo
        mask.save(masks / f"{path.stem}.png")
    runs = {}
    for name, extra in (("plain", ()), ("snr", ("--snr-gamma", "0.5"))):
        runs[name] = tmp_path / name
        assert main(_args(tiny_model, images, runs[name], "--masks", str(masks), *extra, steps="2,0,0")) == 0
        assert _settings(runs[name])["masked_loss"] is True
    plain, snr = (load_file(str(runs[n] / EMBEDDING_NAME)) for n in ("plain", "snr"))
    assert not torch.equal(plain["<attndb-dog>"], snr["<attndb-dog>"])


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw8bit"])
def test_an_optimizers_state_resumes_exactly(tiny_model, instance_dir, tmp_path, optimizer):
    """A finished run extended with more stage-3 steps (its checkpoint's optimizer state restored) equals the
    longer run trained at once."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    extra = ("--optimizer", optimizer, "--checkpointing-steps", "1")
    longer, out = tmp_path / "longer", tmp_path / "out"
    assert main(_args(tiny_model, instance_dir, longer, *extra, steps="2,2,4")) == 0
    assert main(_args(tiny_model, instance_dir, out, *extra)) == 0
    assert main(_args(tiny_model, instance_dir, out, *extra, "--resume", steps="2,2,4")) == 0
    assert _same(_adapter(out), _adapter(longer))


def test_a_checkpoint_resumes_only_with_its_own_options(default_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(default_run, out)
    config = str(out / CONFIG_NAME)
    for flags in (("--snr-gamma", "5"), ("--noise-offset", "0.05"), ("--optimizer", "prodigy"), ("--recipe", "fast")):
        code = main(["train", "--config", config, "--output", str(out), "--resume", *flags, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and f"was written with different settings ({flags[0][2:].replace('-', '_')})" in err, err


def test_a_missing_optimizer_package_is_a_usage_error_before_anything_is_written(
    tiny_model, instance_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(optimizers.OPTIMIZER_PACKAGES, "prodigy", ("no_such_module_here", "prodigyopt", "prodigy"))
    out = tmp_path / "out"
    assert main(_args(tiny_model, instance_dir, out, "--optimizer", "prodigy")) == 2
    err = capsys.readouterr().err
    assert "--optimizer prodigy: the prodigyopt package is not installed; run pip install prodigyopt" in err
    assert not out.exists()


def test_the_fast_recipe_trains_from_the_cli_and_is_recorded(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "fast"
    # no batch or learning-rate flags: the recipe's (4 images per step; stage 3 at the LoRA's 1e-4); --steps wins
    assert main(_args(tiny_model, instance_dir, out, "--recipe", "fast", rates=(), batch=False)) == 0
    settings = _settings(out)
    assert settings["recipe"] == "fast" and (settings["batch_size"], settings["gradient_accumulation_steps"]) == (4, 1)
    assert (settings["stage3"]["steps"], settings["stage3"]["learning_rate"]) == (2, 1e-4)
    assert settings["stage1"]["learning_rate"] == 1e-3 and settings["stage2"]["learning_rate"] == 2e-4
    # the run's own attndb_config.json resumes it; the paper's recipe does not
    config = str(out / CONFIG_NAME)
    assert main(["train", "--config", config, "--resume", "--recipe", "paper", "--quiet"]) == 2
    assert "was written with different settings (recipe)" in capsys.readouterr().err


def test_the_fast_recipe_on_sdxl_keeps_two_image_passes(tiny_sdxl, tmp_path):
    from conftest import one_thread

    from attndb_peft.testing import make_instance_images

    images, out = tmp_path / "images", tmp_path / "fast-xl"
    make_instance_images(images, num_images=2, size=48)
    with one_thread():
        code = main(_args(tiny_sdxl, images, out, "--recipe", "fast", rates=(), batch=False, steps="1,1,1"))
    assert code == 0
    settings = _settings(out)
    # the recipe's 4 images per optimizer step, in the family's 2-image passes
    assert (settings["batch_size"], settings["gradient_accumulation_steps"]) == (2, 2)
    assert settings["recipe"] == "fast" and settings["stage3"]["learning_rate"] == 1e-4
