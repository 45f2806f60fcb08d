# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`quantize_base int8`: the frozen denoiser's linear weights in 8 bits (torchao's int8 weight-only, through
diffusers' `TorchAoConfig`), the LoRAs trained on top in float32, as QLoRA. On the tiny Flux pipeline: the run
trains, its adapter loads with stock diffusers onto a base quantized the same way to the trained model's pixels,
and onto the unquantized base too; the estimator counts the 8-bit weights as the trainer holds them."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import assert_same_pixels, generate, make_config, one_thread

from attndb_peft.base_model import BaseModelError, quantize_denoiser
from attndb_peft.cli import main
from attndb_peft.config import AttnDBConfig, ConfigError
from attndb_peft.estimator.run_model import Phase, build_models, count_phase, read_model_configs
from attndb_peft.testing_mmdit import save_tiny_flux_pipeline
from attndb_peft.trainer import Trainer

pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402

PROMPT = "a photo of a <attndb-dog> dog on the beach"


@pytest.fixture(scope="module")
def run(instance_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    model = save_tiny_flux_pipeline(root / "model")
    with one_thread():
        trainer = Trainer(make_config(model, instance_dir, root / "out", steps=(2, 2, 2), quantize_base="int8",
                                      validation_prompts=()))  # fmt: skip
        trainer.run()
    return model, trainer


def _flux(model, quantized: bool):
    """Stock diffusers: the base pipeline, its transformer quantized while loading when `quantized`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, TorchAoConfig

    pieces = {}
    if quantized:
        pieces["transformer"] = FluxTransformer2DModel.from_pretrained(
            model, subfolder="transformer", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
            torch_dtype=torch.float32,  # as the CPU run loaded it (diffusers would pick bfloat16)
        )
    pipe = FluxPipeline.from_pretrained(model, **pieces)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_base_is_int8_and_only_the_loras_train_in_float32(run):
    _, trainer = run
    denoiser = trainer.models.denoiser
    base = [m for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    assert base and all(isinstance(m.weight, TorchAOBaseTensor) and m.weight.qdata.dtype == torch.int8 for m in base)
    lora = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and not isinstance(p, TorchAOBaseTensor) for p in lora)
    assert (trainer.output_dir / "pytorch_lora_weights.safetensors").is_file()


def test_stock_diffusers_on_a_quantized_base_reproduces_the_trained_model(run):
    model, trainer = run
    with one_thread():
        trained = trainer.pipeline()
        trained.set_progress_bar_config(disable=True)
        want = generate(trained, PROMPT, steps=2)
        stock = _flux(model, quantized=True)
        stock.load_attndb(str(trainer.output_dir))
        assert_same_pixels(generate(stock, PROMPT, steps=2), want)
        # the same adapter on the full-precision base: it loads and changes the pictures
        full = _flux(model, quantized=False)
        base = generate(full, PROMPT, steps=2)
        full.load_attndb(str(trainer.output_dir))
        assert abs(generate(full, PROMPT, steps=2) - base).max() > 1e-3


def test_the_estimator_counts_the_int8_weights(run):
    """On meta, the 8-bit weights: every quantized linear holds 1 byte a weight, a float32 scale and an int8 zero
    point per output row (formula) instead of 4 bytes a weight; the meta count equals a real CPU count of the
    quantized model."""
    model, _ = run
    configs = read_model_configs(str(model))
    config = AttnDBConfig(model=str(model), images="-", category="dog", output="-", quantize_base="int8",
                          resolution=32, batch_size=1).for_model(configs.family, 32)  # fmt: skip
    counts = {}
    for quantize in (None, "int8"):
        for device in ("meta", "cpu"):
            torch.manual_seed(0)
            models = build_models(configs, torch.float32, device, quantize=quantize)
            counts[quantize, device] = count_phase(models, config, Phase("stage", 2), images=4, target="cpu",
                                                   autocast_dtype=None, flops=False)  # fmt: skip
    assert counts["int8", "meta"].peak == counts["int8", "cpu"].peak
    linears = [m for m in build_models(configs, torch.float32).denoiser.modules() if isinstance(m, torch.nn.Linear)]
    saved = sum(m.weight.numel() * (4 - 1) - m.out_features * (4 + 1) for m in linears)
    assert counts[None, "meta"].peak["weights"] - counts["int8", "meta"].peak["weights"] == saved > 0


def test_a_full_fine_tune_cannot_quantize_its_base():
    with pytest.raises(ConfigError, match="quantize_base.*stage3_mode"):
        AttnDBConfig(model="m", images="i", category="dog", output="o", quantize_base="int8", stage3_mode="full")


def test_without_torchao_the_run_stops_before_writing_and_names_the_fix(run, tmp_path, instance_dir, monkeypatch,
                                                                        capsys):
    model, _ = run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--images", str(instance_dir), "--category", "dog", "--output", str(out),
            "--quantize-base", "int8"]  # fmt: skip
    assert main(argv) == 2
    assert "pip install torchao" in capsys.readouterr().err and not out.exists()
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # the loader's own message, past the checks
    with pytest.raises(BaseModelError, match="pip install torchao"):
        quantize_denoiser(torch.nn.Linear(2, 2), "int8")
