# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The paths a plain CPU run does not take, exercised on the CPU: `--compile` (dynamo with a counting
backend), the `auto` precision choice (monkeypatched CUDA device queries), the full fine-tune's SVD export and
fp16 attention scores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_config

from attndb_peft.attention import AttentionStore, CrossAttnCaptureProcessor
from attndb_peft.stages import lora_from_delta
from attndb_peft.trainer import Trainer, TrainingDiverged
from attndb_peft.training.runtime import resolve_mixed_precision as _resolve_mixed_precision


def _counting_backend(graphs: list):
    """A dynamo backend that records every graph it is given and runs it eagerly."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


# -- --compile ----------------------------------------------------------------------------------------------
def test_capture_processor_compiles_once():
    """The capture builds its index tensor up front: creating it on the first call changed the processor between
    the first and second forward, so every stage compiled twice (and hit dynamo's recompile limit sooner)."""
    from diffusers.models.attention_processor import Attention

    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    store = AttentionStore()
    attn.set_processor(CrossAttnCaptureProcessor(store, "layer", [1, 2], output="explicit", device="cpu"))
    graphs: list = []
    compiled = torch.compile(attn, backend=_counting_backend(graphs))
    hidden = torch.randn(2, 16, 32, requires_grad=True)
    context = torch.randn(2, 77, 16)
    for _ in range(3):
        store.clear()
        compiled(hidden, encoder_hidden_states=context).sum().backward()
    assert len(graphs) == 1
    assert store.maps["layer"].shape == (2, 2, 16, 2)


def test_validation_samples_run_eagerly_under_compile(trained, tmp_path, monkeypatch):
    """Sampling (eval mode, no grad, another batch size) adds no compiled graph: before, each validation added
    graphs until dynamo's limit of 8 stopped compiling the training step (stage 3 ran eagerly)."""
    from attndb_peft.reporting import write_validation_samples

    config = dataclasses.replace(
        trained.config,
        compile=True,
        validation_prompts=("a photo of {}",),
        validation_inference_steps=2,
        validation_images=1,
    )
    monkeypatch.setattr(trained, "config", config)
    monkeypatch.setattr(trained, "output_dir", tmp_path)
    torch._dynamo.reset()
    graphs: list = []
    trained.unet.compile(backend=_counting_backend(graphs))
    try:
        written = write_validation_samples(trained.sampling(), 3, 1, stage_end=False)
    finally:
        trained.unet._compiled_call_impl = None  # what nn.Module.compile set; the fixture is shared
    assert [p.name for p in written] == ["stage3-step1.png"]
    assert graphs == []


def test_compile_with_gradient_checkpointing_is_refused(tiny_model, instance_dir, tmp_path):
    """Measured on the tiny U-Net: with both, stage 1's first step compiled 17 graphs and hit dynamo's recompile
    limit (the checkpointed blocks recompile per signature), so the low-memory run with --compile ran eagerly."""
    from attndb_peft.config import ConfigError

    with pytest.raises(ConfigError, match="`compile` and `gradient_checkpointing` cannot be combined.*Drop `compile`"):
        make_config(tiny_model, instance_dir, tmp_path / "out", compile=True, gradient_checkpointing=True)
    make_config(tiny_model, instance_dir, tmp_path / "out", compile=True)  # each alone is fine


# -- mixed_precision="auto" ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "capability, expected",
    [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")],
)
def test_auto_precision_wants_native_bf16(monkeypatch, capability, expected):
    """P100/V100/T4 report bf16 as supported (emulated, far slower than fp16): they get fp16."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert _resolve_mixed_precision("auto", torch.device("cuda", 1)) == expected
    assert asked == [torch.device("cuda", 1)]  # the process's own GPU, not GPU 0
    assert _resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert _resolve_mixed_precision("fp16", torch.device("cuda", 1)) == "fp16"


def test_prepare_probes_the_device_accelerate_gave_the_process(tiny_model, instance_dir, tmp_path, monkeypatch):
    import attndb_peft.training.runtime as runtime_module

    asked = []

    def spy(requested, device=None):
        asked.append(device)
        return _resolve_mixed_precision(requested, device)

    monkeypatch.setattr(runtime_module, "resolve_mixed_precision", spy)
    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path / "out"))
    trainer.prepare()
    assert asked == [trainer.accelerator.device]
    assert trainer.accelerator.mixed_precision == "no"


# -- --stage3 full export -----------------------------------------------------------------------------------
def test_svd_export_factorizes_tall_matrices(monkeypatch):
    """A wide delta (a 3x3 conv's [out, in * 9]) is factorized through its transpose: LAPACK takes several times
    longer on the wide orientation (benchmarks/bench_export.py). Same factors up to sign, same energy."""
    shapes = []
    svd = torch.linalg.svd

    def spy(matrix, *args, **kwargs):
        shapes.append(tuple(matrix.shape))
        return svd(matrix, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 16, 3, 3, generator=g)
    monkeypatch.setattr(torch.linalg, "svd", spy)
    factors, retained = lora_from_delta(delta, 8)
    assert shapes == [(144, 24)]
    monkeypatch.setattr(torch.linalg, "svd", svd)
    s = torch.linalg.svdvals(delta.reshape(24, -1).double())
    assert retained == pytest.approx(float(s[:8].square().sum() / s.square().sum()), rel=1e-5)
    err = (factors.delta() - delta).double().square().sum()
    assert float(err) == pytest.approx(float(s[8:].square().sum()), rel=1e-3)


def test_randomized_svd_export_reports_the_energy_it_keeps():
    """`method="randomized"`: the reported share is exactly what the factors keep (a projection), it is close to
    the optimum on a decaying spectrum, it does not touch the global RNG and it is deterministic."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 120, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(900, 120, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, 120, dtype=torch.float64)
    delta = ((u * s) @ v.T).float()
    state = torch.random.get_rng_state()
    factors, retained = lora_from_delta(delta, 16, method="randomized")
    assert torch.equal(torch.random.get_rng_state(), state)
    again, _ = lora_from_delta(delta, 16, method="randomized")
    assert torch.equal(again.down, factors.down) and torch.equal(again.up, factors.up)
    kept = 1 - float((factors.delta() - delta).double().square().sum() / delta.double().square().sum())
    assert retained == pytest.approx(kept, abs=1e-5)
    optimum = float(s[:16].square().sum() / s.square().sum())
    assert optimum * 0.999 <= retained <= optimum * (1 + 1e-5)
    with pytest.raises(ValueError, match="method='qr'"):
        lora_from_delta(delta, 16, method="qr")


# -- several processes --------------------------------------------------------------------------------------
def _data_parallel_worker(rank: int, port: int, model: str, images: str, out: str, results: str) -> None:
    """One of two gloo processes: prepare a tiny stage-3-full run, then time nothing but count the collectives
    of one optimizer step of stage 2 (attn2 LoRA) and stage 3 (full U-Net) with the torch profiler."""
    import json
    import os

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    init_kwargs = {}
    init_process_group = torch.distributed.init_process_group

    def spy(*args, **kwargs):
        init_kwargs.update(kwargs)
        return init_process_group(*args, **kwargs)

    torch.distributed.init_process_group = spy
    trainer = Trainer(make_config(model, images, out, stage3_mode="full", checkpointing_steps=0))
    trainer.prepare()
    trainer.build_stage(1)
    report = {"num_processes": trainer.accelerator.num_processes, "timeout_s": init_kwargs["timeout"].seconds}
    for stage in (2, 3):
        trainer.build_stage(stage)
        trainer.make_optimizer(stage)
        with trainer.stage_loop(stage) as step:
            step(0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                step(1)
        names = [e.name for e in profile.events()]
        report[f"stage{stage}"] = {
            "all_reduce": sum(name == "gloo:all_reduce" for name in names),
            "params": len(trainer.params),
            "checksum": float(sum(p.detach().double().sum() for p in trainer.params)),
        }
    try:  # a non-finite step on rank 1 only: both processes stop
        trainer._check_finite(torch.tensor(rank == 0), 2, 2)
        report["stopped"] = False
    except TrainingDiverged:
        report["stopped"] = True
    torch.distributed.barrier()
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def test_two_processes_bucket_the_gradient_sync(tiny_model, instance_dir, tmp_path):
    """Stages 2-3 average gradients through DDP's buckets (a handful of collectives per step, overlapped with
    the backward pass), not one blocking all-reduce per parameter: 2 gloo processes, collectives counted. A
    non-finite step on one process stops both."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, str(tiny_model), str(instance_dir), str(tmp_path / "out"), str(tmp_path))
    mp.spawn(_data_parallel_worker, args=args, nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["num_processes"] == 2
        assert report["timeout_s"] == 3600  # PROCESS_GROUP_TIMEOUT, not NCCL's 10 minutes
        for stage in ("stage2", "stage3"):
            assert report[stage]["params"] > 50  # 56 LoRA tensors in stage 2, 286 U-Net tensors in stage 3
            # one all-reduce per parameter before (56 and 286); the tiny model's gradients fit a few DDP buckets
            assert 1 <= report[stage]["all_reduce"] <= 3, report
    assert [report["stopped"] for report in reports] == [True, True]
    for stage in ("stage2", "stage3"):  # averaged gradients: both processes hold the same weights
        assert reports[0][stage]["checksum"] == pytest.approx(reports[1][stage]["checksum"], rel=1e-6)


# -- fp16 attention scores ----------------------------------------------------------------------------------
def test_captured_scores_do_not_overflow_under_fp16_autocast():
    """q.k^T past fp16's range (what `upcast_attention` models such as SD 2.1-768 produce): the kept maps are
    computed in float32 and stay finite and equal to the float32 ones; computed in fp16 they were NaN."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16).eval()
    hidden = torch.randn(1, 16, 32) * 150
    context = torch.randn(1, 77, 16) * 150
    maps = {}
    for dtype in (torch.float32, torch.float16):
        store = AttentionStore()
        attn.set_processor(CrossAttnCaptureProcessor(store, "layer", [1, 2], output="explicit"))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
            q, k = attn.to_q(hidden), attn.to_k(context)
            attn(hidden, encoder_hidden_states=context)
        maps[dtype] = store.maps["layer"]
    per_head = q.float().view(1, 16, 2, 16).transpose(1, 2) @ k.float().view(1, 77, 2, 16).permute(0, 2, 3, 1)
    assert q.dtype == torch.float16 and per_head.abs().max() > 65504  # q.k^T in fp16 overflows
    assert torch.isfinite(maps[torch.float16]).all()
    torch.testing.assert_close(maps[torch.float16], maps[torch.float32], rtol=0, atol=2e-2)


# -- input checks for models and prompts the tiny defaults don't reach ----------------------------------------
def _model_with_unet_config(tiny_model, tmp_path, **changes):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    path = model / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return model


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"in_channels": 9}, "its U-Net takes 9 input channels"),
    ],
)
def test_untrainable_unets_are_refused_before_anything_is_written(
    tiny_model, instance_dir, tmp_path, changes, message
):
    from attndb_peft.trainer import InputError

    model = _model_with_unet_config(tiny_model, tmp_path, **changes)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"`model` {model}: {message}"):
        Trainer(make_config(model, instance_dir, out)).run()
    assert not out.exists()


def test_a_prompt_past_77_tokens_is_refused_before_anything_is_written(tiny_model, instance_dir, tmp_path):
    from attndb_peft.trainer import InputError

    out = tmp_path / "out"
    config = dataclasses.replace(make_config(tiny_model, instance_dir, out), category=" ".join(["dog"] * 80))
    with pytest.raises(InputError, match="`category` .* is 87 tokens long, more than the text encoder's 77"):
        Trainer(config).run()
    assert not out.exists()


def test_plain_letter_tokens_get_a_warning(tiny_model, instance_dir, tmp_path):
    from attndb_peft.trainer import check_inputs, load_tokenizer

    config = make_config(tiny_model, instance_dir, tmp_path / "out", token="zwx")
    tokenizer = load_tokenizer(config)
    assert any("`token` 'zwx' is plain letters" in w for w in check_inputs(config, tokenizer))
    tokenizer.add_tokens("zwx")  # what training does; then 'zwxy' holds the concept token too
    assert tokenizer.convert_tokens_to_ids("zwx") in tokenizer("a zwxy dog").input_ids
    config = make_config(tiny_model, instance_dir, tmp_path / "out")
    assert not any("plain letters" in w for w in check_inputs(config, load_tokenizer(config)))


def test_a_resolution_other_than_the_models_gets_a_warning(tiny_model, instance_dir, tmp_path, caplog):
    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path / "out", resolution=48))
    with caplog.at_level("WARNING", logger="attndb_peft"):
        trainer.prepare()
    assert "`resolution` 48" in caplog.text and "generates at 32 px" in caplog.text


def test_the_default_resolution_and_ranks_are_the_base_models(tiny_model, instance_dir, tmp_path, caplog):
    """`resolution=None` is read from the saved U-Net and VAE configs before the checks (no weights loaded), so
    the run, its warnings and attndb_config.json all use it."""
    import json
    from pathlib import Path

    from attndb_peft.families import native_resolution

    unet = json.loads((Path(tiny_model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(tiny_model) / "vae" / "config.json").read_text())
    expected = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path / "out", resolution=None))
    with caplog.at_level("INFO", logger="attndb_peft"):
        trainer.prepare()
    assert trainer.config.resolution == expected and trainer.config.to_dict()["resolution"] == expected
    assert (trainer.config.stage2.rank, trainer.config.stage3.rank) == (32, 32)  # the SD family's LoRA rank
    assert f"Resolution: {expected} px, the base model's own" in caplog.text and "generates at" not in caplog.text
    assert trainer.latents.mean.shape[-1] == expected // 2 ** (len(vae["block_out_channels"]) - 1)
    # the released models' configs: SD 1.5 / 2.1-base, SD 2.1, SDXL base (VAE of 4 blocks in all)
    four_blocks = {"block_out_channels": [128, 256, 512, 512]}
    assert [native_resolution({"sample_size": s}, four_blocks) for s in (64, 96, 128)] == [512, 768, 1024]
    assert native_resolution({"sample_size": 128}) == 1024


# -- fp16 loss scaling --------------------------------------------------------------------------------------
def test_steps_the_fp16_scaler_skips_are_counted_and_reported(tiny_model, instance_dir, tmp_path, caplog):
    """A loss scaler (accelerate makes one for fp16 on a GPU; here a CPU GradScaler) skips every step whose
    gradients overflow: the divergence check cannot see that, so the run counts them and warns past 10 %."""
    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path / "out", steps=(0, 4, 0)))
    trainer.prepare()
    trainer.runtime.mixed_precision = "fp16"  # overflowing fp16 gradients: the scaler's job, not the divergence check
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.build_stage(1)
    trainer.build_stage(2)
    trainer.make_optimizer(2)
    trainer.params[0].register_hook(lambda grad: grad * float("inf"))  # an overflow in every step
    before = [p.detach().clone() for p in trainer.params]
    with caplog.at_level("WARNING", logger="attndb_peft"):
        trainer.run_stage(2, 0)
    assert int(trainer.skipped_steps) == 4
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))  # nothing was trained
    assert caplog.text.count("the fp16 loss scaler skipped") == 1
    assert "skipped 1 of the first 1 steps" in caplog.text


# -- --stage3 full checkpoints: streamed shard by shard ----------------------------------------------------------
def test_large_checkpoint_files_are_written_and_read_shard_by_shard(tmp_path, monkeypatch):
    """Only one shard at a time is copied to the host (what `save_file` is handed), and the shards read back
    to the same tensors on the asked device; a missing shard is a CheckpointError naming the file."""
    from attndb_peft import checkpoints as ckpt

    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(6)}  # 16 kB each
    handed = []
    real_save = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda shard, path: (handed.append(dict(shard)), real_save(shard, path)))
    path = tmp_path / "weights.safetensors"
    ckpt.save_tensors(path, tensors, max_shard_size=40_000)
    assert len(handed) == 3 and all(sum(v.numel() * 4 for v in s.values()) <= 40_000 for s in handed)
    assert not path.exists() and (tmp_path / "weights.safetensors.index.json").is_file()
    back = ckpt.load_tensors(path, device="cpu")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    # a small state stays one plain file, as before
    ckpt.save_tensors(tmp_path / "small.safetensors", {"a": torch.ones(3)})
    assert ckpt.load_tensors(tmp_path / "small.safetensors")["a"].tolist() == [1, 1, 1]
    next(tmp_path.glob("weights-00002-of-00003.safetensors")).unlink()
    with pytest.raises(ckpt.CheckpointError, match="weights.safetensors"):
        ckpt.load_tensors(path)


def test_full_mode_resume_from_sharded_checkpoints_is_bit_identical(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                    caplog):
    import shutil

    from safetensors.torch import load_file

    from attndb_peft import checkpoints as ckpt
    from attndb_peft.export import LORA_NAME

    monkeypatch.setattr(ckpt, "SHARD_SIZE", 200_000)
    settings = dict(checkpointing_steps=1, stage3_mode="full", steps=(1, 1, 3))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="attndb_peft"):
        Trainer(make_config(tiny_model, instance_dir, out, **settings)).run()
    assert "`checkpoints_total_limit` 2" in caplog.text  # 3 full checkpoints, none pruned: the disk use is stated
    step2 = out / "checkpoints" / "stage3-step2"
    assert len(list(step2.glob("weights-*-of-*.safetensors"))) > 1
    assert len(list(step2.glob("optimizer-*-of-*.safetensors"))) > 1
    reference = load_file(str(out / LORA_NAME))
    shutil.rmtree(out / "checkpoints" / "stage3-step3")
    (out / LORA_NAME).unlink()
    Trainer(make_config(tiny_model, instance_dir, out, resume=True, **settings)).run()
    resumed = load_file(str(out / LORA_NAME))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
