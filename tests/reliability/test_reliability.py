# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Reliability: bad input refused before anything is written, odd images train, SIGKILL + resume is
bit-identical, the divergence guard, out-of-memory advice, checkpoint pruning, a 2-process CPU run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_pipeline, generate, make_config, one_thread
from PIL import Image
from safetensors.torch import load_file

from attndb_peft.checkpoints import list_checkpoints
from attndb_peft.cli import main
from attndb_peft.export import EMBEDDING_NAME, KOHYA_NAME, LORA_NAME
from attndb_peft.trainer import Trainer

TESTS = Path(__file__).parent
# The subprocesses use this process's thread count (conftest sets it): float sums, and so the bit-identical
# comparisons with runs made in this process, depend on it, and torch's default (one thread a core) differs by machine.
THREADS = str(torch.get_num_threads())
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": THREADS}
ENV["MKL_NUM_THREADS"] = THREADS


def _train_args(model, images, out, *extra, steps="2,2,2"):
    # no sample grids (--validation-prompts with none): test_reporting.py covers them
    return [
        "train", "--model", str(model), "--images", str(images), "--category", "dog", "--output", str(out),
        "--resolution", "32", "--batch-size", "2", "--steps", steps, "--learning-rates", "5e-2,1e-2,1e-2",
        "--save-dtype", "fp32", "--quiet", "--validation-prompts", *extra,
    ]  # fmt: skip


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


# -- bad input -------------------------------------------------------------------------------------------
def test_every_input_problem_is_listed_and_nothing_is_written(tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "good.png")
    Image.new("RGB", (12, 12)).save(images / "tiny.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "notes.txt").write_text("captions are ignored")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    before = _tree(out)
    code = main(_train_args(tiny_model, images, out, "--token", "dog"))
    err = capsys.readouterr().err
    assert code == 2
    for expected in (
        "broken.jpg",
        "cannot be decoded",
        "tiny.png",
        "half the training resolution",
        "--token 'dog'",
        "already exists",
        "--output",
        "not empty",
        "--resume",
        "--overwrite",
    ):
        assert expected in err, expected
    assert "notes.txt" not in err and "Traceback" not in err
    assert _tree(out) == before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", ["--images", "no such folder"]),
        ("empty", ["--images", "no images found"]),
        ("category", ["--category", "tokenizes to nothing"]),
        ("token_in_vocab", ["--token '<|endoftext|>'", "already exists"]),
        ("resume_nothing", ["--resume", "no complete checkpoint"]),
    ],
)
def test_single_input_problems_exit_2(tiny_model, instance_dir, tmp_path, capsys, case, expected):
    images, out, extra = instance_dir, tmp_path / "out", []
    args = None
    if case == "missing":
        images = tmp_path / "nope"
    elif case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
        (images / ".DS_Store").write_bytes(b"\0")
    elif case == "token_in_vocab":
        extra = ["--token", "<|endoftext|>"]
    elif case == "resume_nothing":
        extra = ["--resume"]
    args = _train_args(tiny_model, images, out, *extra)
    if case == "category":
        args[args.index("dog")] = "   "
    assert main(args) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not out.exists()


def test_config_file_errors_name_the_file(tiny_model, instance_dir, tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("stage2:\n  steps: 10\n  learnin_rate: 1e-4\n")
    assert main(_train_args(tiny_model, instance_dir, tmp_path / "out", "--config", str(bad))) == 2
    err = capsys.readouterr().err
    assert "learnin_rate" in err and "stage2" in err
    assert main(_train_args(tiny_model, instance_dir, tmp_path / "out", "--config", str(tmp_path / "no.yaml"))) == 2
    assert "no.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- odd but valid images ---------------------------------------------------------------------------------
def test_odd_image_formats_train(tiny_model, tmp_path):
    images = tmp_path / "odd"
    images.mkdir()
    base = Image.new("RGB", (48, 40), (220, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    base.transpose(Image.Transpose.ROTATE_90).save(images / "exif.jpg", exif=exif)
    base.convert("RGBA").save(images / "rgba.png")
    base.convert("LA").save(images / "la.png")
    base.convert("P").save(images / "p.png")
    Image.fromarray((torch.rand(40, 48) * 65535).to(torch.int32).numpy().astype("uint16")).save(images / "g16.png")
    base.convert("CMYK").save(images / "cmyk.tiff")
    base.save(images / "w.webp")
    out = tmp_path / "out"
    trainer = Trainer(make_config(tiny_model, images, out, steps=(1, 1, 1)))
    trainer.run()
    assert trainer.num_images == 7 and (out / LORA_NAME).is_file()


# -- SIGKILL and resume -----------------------------------------------------------------------------------
def _adapter(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(out / name)) for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME)}


@pytest.fixture(scope="module")
def reference_adapter(tiny_model, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert main(_train_args(tiny_model, instance_dir, out, "--checkpointing-steps", "1")) == 0
    return _adapter(out)


@pytest.mark.parametrize(
    "point, count",
    [
        ("loss", 2),  # inside stage 1, step 2 (stage1-step1 is the newest checkpoint)
        ("commit", 2),  # while writing stage1-step2: files written, folder not yet renamed
        ("export", 2),  # half-way through replacing the adapter files
        # (inside stage 3: test_a_joint_attention_run_killed_in_stage_3_resumes_bit_identically)
    ],
)
def test_sigkill_then_resume_is_bit_identical(tiny_model, instance_dir, tmp_path, reference_adapter, point, count):
    out = tmp_path / "out"
    args = _train_args(tiny_model, instance_dir, out, "--checkpointing-steps", "1")
    killed = subprocess.run(
        [sys.executable, str(TESTS / "fault_injection.py"), point, str(count), "--", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert not any(
        p.name.startswith("stage") and not (p / "state.json").exists() for p in (out / "checkpoints").iterdir()
    )
    assert main([*args, "--resume"]) == 0  # in this process, as the reference was: one subprocess a test
    got = _adapter(out)
    for name, tensors in reference_adapter.items():
        assert got[name].keys() == tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(got[name][key], value), (point, count, name, key)
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / ".export-tmp").exists()


@pytest.mark.slow
def test_a_joint_attention_run_killed_in_stage_3_resumes_bit_identically(instance_dir, tmp_path):
    """Flux (the joint-attention family with the most to restore: T5's token vector in a spare row, the CLIP one,
    the single-stream blocks' LoRA; SD3 checkpoints the same way): killed inside stage 3 (step 2, stage3-step1 the
    newest checkpoint), resumed to the adapter of an uninterrupted run, bit for bit."""
    from attndb_peft.testing_mmdit import save_tiny_flux_pipeline

    model = save_tiny_flux_pipeline(tmp_path / "model")
    reference, out = tmp_path / "reference", tmp_path / "out"
    args = _train_args(model, instance_dir, out, "--checkpointing-steps", "1")
    with one_thread():  # the tiny transformers run faster on one thread; the killed run uses one as well
        assert main(_train_args(model, instance_dir, reference, "--checkpointing-steps", "1")) == 0
    env = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = [sys.executable, str(TESTS / "fault_injection.py"), "loss", "6", "--", *args]
    done = subprocess.run(killed, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    with one_thread():
        assert main([*args, "--resume"]) == 0
    got, want = _adapter(out), _adapter(reference)
    for name, tensors in want.items():
        assert got[name].keys() == tensors.keys()
        assert all(torch.equal(got[name][k], v) for k, v in tensors.items()), name


def test_resume_refuses_changed_settings(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_train_args(tiny_model, instance_dir, out, steps="1,0,0")) == 0
    assert main(_train_args(tiny_model, instance_dir, out, "--resume", "--seed", "5", steps="1,0,0")) == 2
    assert "seed" in capsys.readouterr().err


# -- divergence, out of memory, pruning ------------------------------------------------------------------
def test_divergence_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = _train_args(tiny_model, instance_dir, out, "--log-every", "50")
    args[args.index("--learning-rates") + 1] = "5e-2,1e30,1e-2"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage 2" in err and "step 2" in err and "learning rate" in err and "1e+30" in err
    assert [(s, k) for s, k, _ in list_checkpoints(out)] == [(1, 2)]
    assert not any((out / name).exists() for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME))
    weights = load_file(str(out / "checkpoints" / "stage1-step2" / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_out_of_memory_gives_the_settings_that_help(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    original = Trainer.run_stage

    def run_stage(self, stage, start_step):
        if stage == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, stage, start_step)

    monkeypatch.setattr(Trainer, "run_stage", run_stage)
    assert main(_train_args(tiny_model, instance_dir, out)) == 1
    err = capsys.readouterr().err
    for text in ("out of memory", "--gradient-checkpointing", "--batch-size", "--resolution", "--resume"):
        assert text in err
    assert [(s, k) for s, k, _ in list_checkpoints(out)] == [(1, 2)]


def test_checkpoints_total_limit_prunes_the_oldest(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    args = _train_args(tiny_model, instance_dir, out, "--checkpointing-steps", "1", "--checkpoints-total-limit", "2")
    assert main(args) == 0
    assert [(s, k) for s, k, _ in list_checkpoints(out)] == [(3, 1), (3, 2)]


# -- multi-process ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run(tiny_model, instance_dir, tmp_path):
    """Two processes on the CPU (gloo): one writer, per-process RNG state, an adapter that loads."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), "-m", "attndb_peft",
         *_train_args(tiny_model, instance_dir, out, steps="2,2,2")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = out / "checkpoints" / "stage3-step2"
    assert (checkpoint / "rng-0.safetensors").is_file() and (checkpoint / "rng-1.safetensors").is_file()
    assert '"num_processes": 2' in (checkpoint / "state.json").read_text()
    pipe = fresh_pipeline(tiny_model)
    base = generate(pipe, "a photo of a dog")
    pipe.load_textual_inversion(str(out / EMBEDDING_NAME))
    pipe.load_lora_weights(str(out), weight_name=LORA_NAME)
    assert abs(generate(pipe, "a photo of a <attndb-dog> dog") - base).max() > 1e-3
