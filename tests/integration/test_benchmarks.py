# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/bench_train.py --tiny runs on a CPU and writes every promised field. No timing thresholds: the
numbers belong to the machine; this checks that they are there and make sense."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["--tiny", "--steps", "1", "--warmup", "1", "--repeats", "1", "--load-repeats", "1", "--out", str(out)]
    assert load_benchmark("bench_train").main(args) == 0
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_path_has_its_timings(report):
    results = report["results"]
    expected = {
        "default": ("stage1", "stage2", "stage3"),
        "default_regularizer_off": ("stage1", "stage2", "stage3"),
        "full": ("stage3",),
        "lowmem": ("stage1", "stage2", "stage3"),
        "floor": ("frozen", "full", "frozen_channels_last", "full_channels_last"),
        "processor": ("sdpa_no_capture", "capture_sdpa", "capture_explicit"),
        "reference": ("stage1", "stage2", "stage3"),
    }
    for path, stages in expected.items():
        for stage in stages:
            entry = results[path][stage]
            assert _positive(entry["ms"]), (path, stage, entry)
            assert len(entry["ms_blocks"]) == 1 and _positive(entry["warmup_ms"])
            assert "peak_gib" in entry  # None on a CPU, GiB on CUDA
            if report["device"].startswith("cpu"):
                assert entry["peak_gib"] is None


def test_summary_has_totals_ratios_overhead_and_memory(report):
    summary = report["summary"]
    assert summary["recipe_steps"] == [60, 100, 500]
    for key in (
        "default",
        "stage3_full",
        "low_memory",
        "floor",
        "floor_channels_last",
        "reference",
        "regularizer_off",
    ):
        assert _positive(summary["recipe_s"][key]), key
    assert summary["recipe_s"]["compile"] is None and summary["compile_s"] is None  # only with --compile
    for key, value in summary["ratios"].items():
        assert _positive(value), key
    # the regularizer's share of a step, from the two timings it compares (timings of one-step blocks on a shared
    # CPU are noise-dominated, so the value itself is not bounded here; benchmarks/results has measured ones)
    overhead = summary["regularizer_overhead"]
    results = report["results"]
    for stage in (1, 2, 3):
        on, off = results["default"][f"stage{stage}"]["ms"], results["default_regularizer_off"][f"stage{stage}"]["ms"]
        assert overhead[f"stage{stage}"] == pytest.approx((on - off) / on, abs=1e-4), stage
    assert isinstance(overhead["recipe"], float) and overhead["recipe"] < 1
    assert set(summary["peak_gib"]) == {"default", "low_memory", "stage3_full", "reference"}


def test_adapter_size_and_load_time(report):
    from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, KOHYA_NAME, LORA_NAME, MODEL_CARD_NAME

    adapter = report["results"]["adapter"]
    assert set(adapter["file_bytes"]) == {EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME, MODEL_CARD_NAME}
    assert adapter["mb"] == pytest.approx(sum(adapter["file_bytes"].values()) / 1e6, abs=0.01)
    assert adapter["save_dtype"] == "fp16" and adapter["ranks"] == {"stage2": 32, "stage3": 32}
    assert adapter["lora_modules"] > 0 and all(_positive(n) for n in adapter["lora_params"].values())
    load = report["results"]["load"]
    assert load["device"] == "cpu" and len(load["all_s"]) == 2
    assert _positive(load["first_s"]) and _positive(load["s"])
    assert "load_attndb" in load["loader"]


def test_flops_counted_on_the_meta_device_equal_a_real_step(report):
    """The `flops` section counts on the meta device; the same U-Net run for real on the CPU under the same counter
    gives the same forward and full-step counts, and the achieved rates are the counts over the timed steps."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from attndb_peft.testing import build_tiny_pipeline

    flops = report["results"]["flops"]
    per_step = flops["gflop_per_step"]
    assert set(per_step) == {"forward", "stage1", "stage2", "stage3", "stage3_full"}
    # a training step adds a backward pass to the forward (no order among the stages: on the tiny U-Net the
    # conditioning's gradient, 77 tokens through every attn2, costs more than the 8x8 latent's weight gradients)
    assert 0 < per_step["forward"] < min(per_step[k] for k in ("stage1", "stage2", "stage3", "stage3_full"))
    unet = build_tiny_pipeline(seed=0).unet
    # explicit attention matmuls: the counter does not see inside the CPU's fused SDPA kernel (on the meta device
    # SDPA runs as its matmuls, which it counts)
    unet.set_attn_processor(AttnProcessor())
    b, size = report["batch_size"], report["resolution"] // 4  # the tiny VAE downscales by 4
    args = (torch.randn(b, 4, size, size), torch.full((b,), 500), torch.randn(b, 77, unet.config.cross_attention_dim))
    with FlopCounterMode(display=False) as counter:
        unet(*args)
    assert per_step["forward"] == pytest.approx(counter.get_total_flops() / 1e9, abs=1e-3)
    with FlopCounterMode(display=False) as counter:
        unet(*args).sample.float().pow(2).mean().backward()
    assert per_step["stage3_full"] == pytest.approx(counter.get_total_flops() / 1e9, abs=1e-3)
    ms = report["results"]["default"]["stage1"]["ms"]
    assert flops["achieved_tflop_per_s"]["stage1"] == pytest.approx(per_step["stage1"] / ms, rel=1e-3)


def test_run_description(report):
    assert report["arch"] == "tiny" and report["batch_size"] == 2 and report["resolution"] == 32
    assert report["mixed_precision"] in ("no", "fp16", "bf16")
    assert report["steps"] == report["warmup"] == report["repeats"] == 1
    assert report["device"] and report["torch"]
    if report["device"].startswith("cpu"):
        assert report["host_syncs_per_step"] is None  # counted with CUDA's sync debug mode only


def test_sdxl_family_runs_the_trainer_and_the_adapter_sections(tmp_path):
    """--family sdxl --tiny: the adapter folder of the tiny SDXL is written and loaded (the trainer sections run in
    the tiny SDXL's own tests); the sections that only know SD2.1-base are refused."""
    out = tmp_path / "bench.json"
    args = ["--tiny", "--family", "sdxl", "--only", "adapter", "--load-repeats", "0", "--out", str(out)]
    assert load_benchmark("bench_train").main(args) == 0
    report = json.loads(out.read_text())
    assert report["arch"] == "tiny-sdxl" and report["sections"] == ["adapter"]
    adapter = report["results"]["adapter"]
    assert adapter["lora_modules"] > 0 and _positive(report["results"]["load"]["first_s"])
    with pytest.raises(SystemExit):
        load_benchmark("bench_train").parse_args(["--family", "sdxl", "--only", "reference"])


def test_bench_export_times_every_method_on_the_first_weights(tmp_path):
    """benchmarks/bench_export.py in a quick mode: three SD2.1-base weight deltas, every factorization method."""
    bench_export = load_benchmark("bench_export")
    out = tmp_path / "export.json"
    assert bench_export.main(["--limit", "3", "--rank", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["weights"] == 3 and set(report["methods"]) == set(bench_export.METHODS)
    kept = {m: r["energy_kept"] for m, r in report["methods"].items()}
    assert 0 < kept["randomized"] <= kept["exact"] + 1e-3 and abs(kept["exact"] - kept["before"]) < 1e-3
