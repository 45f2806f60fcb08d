# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb estimate` and `attndb train --dry-run`: the prediction from a model folder or a known architecture,
usage errors as one line with exit code 2, and a dry run that checks everything and writes nothing."""

from __future__ import annotations

import json

from attndb_peft.cli import main
from attndb_peft.testing import save_tiny_single_file

TINY = ["--resolution", "32", "--batch-size", "2", "--steps", "2,2,2"]


def test_estimate_a_model_folder(tiny_model, tmp_path, capsys):
    out = tmp_path / "estimate.json"
    assert main(["estimate", "--model", str(tiny_model), *TINY, "--gpu-memory", "80", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for phase in ("latents", "stage 1", "stage 2", "stage 3"):
        assert phase in text
    assert "Fits 80 GiB." in text and "RTX 4090" in text
    data = json.loads(out.read_text())
    # the sample grids of the stage ends are a phase of their own
    assert [p["name"] for p in data["phases"]] == ["latents", "stage 1", "stage 2", "stage 3", "samples"]
    assert all(p["peak_gib"]["total"] > 0 and p["tflop_per_step"] >= 0 for p in data["phases"])


def test_estimate_a_known_architecture_without_download(capsys):
    """`--model sd15` is the released architecture's configs, shipped with the package (nothing is read)."""
    args = ["estimate", "--model", "sd15", "--resolution", "64", "--batch-size", "1", "--steps", "0,1,0"]
    assert main([*args, "--validation-prompts", "--gpu", "rtx4090"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith(("latents", "stage"))]
    phases = [" ".join(row[:2]) for row in rows]
    assert "the SD 1.5 architecture" in text and "64 px" in text and phases == ["latents 0", "stage 2"]
    assert "RTX 4090" in text and "A100" not in text


def test_suggestions_print_as_flags():
    """The estimate names settings the Python way (`errors.arg`); the commands print them as train flags."""
    from attndb_peft.cli import _with_flags

    assert _with_flags("add `gradient_checkpointing` `offload_frozen` `batch_size` 2") == (
        "add --gradient-checkpointing --offload-frozen --batch-size 2"
    )


def test_estimate_an_unreadable_model_is_a_usage_error(tmp_path, capsys):
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err and "cannot read" in err


def test_dry_run_checks_and_writes_nothing(tiny_model, instance_dir, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["train", "--model", str(tiny_model), "--images", str(instance_dir), "--category", "dog", *TINY]
    assert main([*args, "--output", str(output), "--dry-run"]) == 0
    assert "stage 3" in capsys.readouterr().out
    assert not output.exists()
    # bad input: the usual message, exit 2, still nothing written
    assert main([*args[:4], str(tmp_path / "no-images"), *args[5:], "--output", str(output), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--images" in err and "Cannot start training" in err
    assert not output.exists()


def test_estimate_sdxl_and_a_single_file(tiny_sdxl, tiny_model, tmp_path, capsys):
    """Every family: the tiny SDXL (two text encoders, pooled conditioning), and a single-file checkpoint whose
    configs come from --model-config (without it: exit 2, one line naming the flag)."""
    quick = ["--resolution", "32", "--steps", "0,1,0", "--validation-prompts"]
    assert main(["estimate", "--model", str(tiny_sdxl), *quick, "--gpu", "h100"]) == 0
    text = capsys.readouterr().out
    assert "batch 2 x 4 accumulated" in text and "gradient checkpointing on" in text  # SDXL's defaults
    single = save_tiny_single_file(tmp_path / "tiny.safetensors")
    assert main(["estimate", "--model", str(single), "--model-config", str(tiny_model), *quick]) == 0
    assert "stage 2" in capsys.readouterr().out
    assert main(["estimate", "--model", str(single), *quick]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model-config" in err


def test_estimate_a_hub_id_reads_only_its_configs(tiny_model, tmp_path, monkeypatch, capsys):
    """A Hub id from the Hub cache holding nothing but the model's config files (no weights, no tokenizer)."""
    import shutil

    from huggingface_hub import constants

    repo, sha = "someone/tiny-sd", "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    for config in tiny_model.rglob("*config.json"):
        target = repo_dir / "snapshots" / sha / config.relative_to(tiny_model)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(config, target)
    assert not list(repo_dir.rglob("*.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert main(["estimate", "--model", repo, *TINY, "--validation-prompts"]) == 0
    assert f"Predicted GPU memory for {repo}" in capsys.readouterr().out


def test_estimate_a_released_mmdit_without_download(capsys):
    """`--model flux-dev`: a released Flux.1 config shipped with the package (SD3.5's are counted on meta in
    tests/unit/test_estimator_mmdit.py), counted offline at the family's defaults (1024 px, batch 1,
    checkpointing). One stage and one pass keep it to seconds."""
    quick = ["--steps", "0,1,0", "--gradient-accumulation-steps", "1", "--validation-prompts"]
    assert main(["estimate", "--model", "flux-dev", *quick]) == 0
    text = capsys.readouterr().out
    assert "the FLUX.1 [dev] architecture" in text and "1024 px, batch 1 x 1" in text and "checkpointing on" in text
    rows = {line.split()[0] + line.split()[1]: line.split() for line in text.splitlines() if line.startswith("stage")}
    assert list(rows) == ["stage2"] and float(rows["stage2"][3]) > 20  # GiB: the weights alone are above 20
    assert "has been measured on a GPU yet: a prediction only" in text
