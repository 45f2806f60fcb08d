# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The memory estimator on the joint-attention families (SD3/3.5, Flux.1): on the tiny pipelines built in code its
meta-device count against the same step on real CPU tensors and against a real `Trainer` step, what each counted
stage trains against the trainer's stages, the token's row in T5's spare rows, and the released architectures'
configs against the installed classes' constructors and the published parameter counts."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import make_config, one_thread

from attndb_peft.config import AttnDBConfig
from attndb_peft.estimator.accounting import CudaAutocast, count_step
from attndb_peft.estimator.architectures import ARCHITECTURES, architecture_for
from attndb_peft.estimator.run_model import (
    Phase,
    _prompt_ids,
    build_models,
    count_phase,
    read_model_configs,
    token_ids,
)
from attndb_peft.families import FLUX, SD3
from attndb_peft.testing import TINY_RESOLUTION
from attndb_peft.testing_mmdit import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

SAVERS = {"sd3": save_tiny_sd3_pipeline, "flux": save_tiny_flux_pipeline}
MMDIT = ("sd35-medium", "sd35-large", "flux-dev", "flux-schnell")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # tiny models: a second thread only waits (see conftest.one_thread)
        yield


@pytest.fixture(scope="module", params=sorted(SAVERS))
def tiny_mmdit(request, tmp_path_factory):
    """A tiny SD3 or Flux.1 pipeline folder (`save_tiny_*_pipeline`)."""
    return SAVERS[request.param](tmp_path_factory.mktemp(request.param) / "model")


def _run_config(model, **overrides):
    configs = read_model_configs(str(model))
    settings = dict(resolution=TINY_RESOLUTION, batch_size=2, gradient_accumulation_steps=2, validation_prompts=())
    config = AttnDBConfig(model=str(model), images="-", category="dog", output="-", **{**settings, **overrides})
    return configs, config.for_model(configs.family, TINY_RESOLUTION)


def test_the_family_and_its_configs_are_read_from_the_folder(tiny_mmdit):
    configs = read_model_configs(str(tiny_mmdit))
    assert configs.family in (SD3, FLUX)
    assert configs.denoiser["_class_name"] == configs.family.denoiser_class and configs.unet is configs.denoiser
    assert [type(c).__name__ for c in configs.text_encoders][-1] == "T5Config"
    # T5's matrix has spare rows past its tokenizer: the token takes the first one, the matrix keeps its size
    t5 = configs.text_encoders[-1]
    assert configs.tokenizer_lengths[-1] < t5.vocab_size and token_ids(configs)[-1] == configs.tokenizer_lengths[-1]
    models = build_models(configs, torch.float32)
    assert models.text_encoders[-1].get_input_embeddings().num_embeddings == t5.vocab_size
    clip = models.text_encoders[0].get_input_embeddings().num_embeddings
    assert clip == configs.text_encoders[0].vocab_size + 1  # CLIP's vocabulary fills its matrix: one more row
    lengths = [ids.shape[-1] for ids in _prompt_ids(models)]
    assert lengths == ([77, 77, 256] if configs.family is SD3 else [77, 512])


def test_meta_count_equals_real_cpu_count(tiny_mmdit):
    """The same phases counted on meta (shapes only) and on real CPU tensors give the same bytes and FLOPs, the
    joint-attention capture included (its log-sum-exp by the CPU's flash kernel on both). bf16 autocast under
    gradient checkpointing, the families' defaults (float32 without checkpointing: tests/unit/test_estimator.py)."""
    precision = torch.bfloat16
    configs, config = _run_config(tiny_mmdit, gradient_checkpointing=True)
    counts = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        models = build_models(configs, precision, device)
        phases = [Phase("latents")] + [Phase("stage", s) for s in (1, 2, 3)] + [Phase("samples")]
        counts[device] = [
            count_phase(models, config, phase, images=4, target="cpu", autocast_dtype=precision) for phase in phases
        ]
    for meta, cpu in zip(counts["meta"], counts["cpu"]):
        assert meta.peak == cpu.peak
        assert meta.flops == cpu.flops
    assert all(c.flops > 0 and c.peak["attention_capture"] > 0 for c in counts["meta"][1:4])


def _trainable(denoiser, splice) -> dict:
    named = [*denoiser.named_parameters(), *(("splice." + n, p) for n, p in splice.named_parameters())]
    return {n: (tuple(p.shape), p.dtype) for n, p in named if p.requires_grad}


def test_estimator_matches_a_trainer_step(tiny_mmdit, instance_dir, tmp_path):
    """Each counted stage trains exactly the parameters of the real `Trainer`'s stage (the family's stage-2 and
    stage-3 LoRA targets, the token vector in every text encoder), and a stage-2 step of the trainer on the CPU,
    counted with the same counter, holds what the estimator's rebuilt step of the same settings counts (the
    trainer's small extras aside: its RNG, schedule and ids)."""
    from attndb_peft.trainer import Trainer

    config = make_config(tiny_mmdit, instance_dir, tmp_path / "out", mixed_precision="no")
    trainer = Trainer(config)
    trainer.prepare()
    counted = build_models(read_model_configs(str(tiny_mmdit)), torch.float32, "meta")
    assert counted.family is trainer.family
    models = trainer.models
    predicted = {}
    for stage in (1, 2, 3):
        trainer.build_stage(stage)
        predicted[stage] = count_phase(
            counted, trainer.config, Phase("stage", stage), images=4, target="cpu", autocast_dtype=None, flops=False
        )
        assert _trainable(counted.denoiser, counted.splice) == _trainable(models.denoiser, trainer.splice)
        if stage == 2:
            trainer.make_optimizer(2)
            with trainer.stage_loop(2) as step:

                def run():
                    with CudaAutocast(None, target="cpu"):  # the CPU's SDPA, as the estimator models it
                        step(0)

                real = count_step(
                    run,
                    [models.denoiser, models.vae, *models.text_encoders, trainer.splice],
                    [trainer.optimizer],
                    device="cpu",
                    extra=[trainer.latents.mean, trainer.latents.std],
                    flops=False,
                )
    assert predicted[2].peak["weights"] == real.peak["weights"]
    assert predicted[2].peak["optimizer"] == real.peak["optimizer"]
    assert predicted[2].total == pytest.approx(real.total, rel=0.02)


def test_architecture_keys_are_constructor_arguments():
    """Every key of the shipped configs is an argument of the class it builds (none silently ignored)."""
    import diffusers
    from transformers import CLIPTextConfig, T5Config

    def arguments(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}

    for arch in ARCHITECTURES.values():
        assert set(arch.denoiser) <= arguments(getattr(diffusers, arch.family.denoiser_class)), arch.name
        assert set(arch.vae) <= arguments(diffusers.AutoencoderKL), arch.name
        for cls, kw in zip(arch.family.text_encoder_classes, arch.text_encoders):
            assert set(kw) <= arguments(T5Config if cls == "T5EncoderModel" else CLIPTextConfig), arch.name


@pytest.mark.parametrize(
    "name, family, denoiser_parameters",
    [
        ("sd35-medium", SD3, 2_243_171_520),
        ("sd35-large", SD3, 8_056_627_520),
        ("flux-dev", FLUX, 11_901_408_320),
        ("flux-schnell", FLUX, 11_891_178_560),  # no guidance embedding
    ],
)
def test_mmdit_architectures_are_the_released_models(name, family, denoiser_parameters):
    """The transformers built from the shipped configs have the released models' parameter counts (FLUX.1's
    11.90 B, SD3.5 Large's 8.06 B), T5-XXL's encoder its 4.76 B, and the families' defaults apply (1024 px)."""
    arch = ARCHITECTURES[name]
    configs = arch.configs()
    models = build_models(configs, torch.bfloat16, "meta")
    assert arch.family is family and configs.resolution == 1024
    assert sum(p.numel() for p in models.denoiser.parameters()) == denoiser_parameters
    t5 = models.text_encoders[-1]
    # the token takes T5's row 32 100, one of its 28 spare ones: 4 762 310 656 parameters, as released
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert token_ids(configs)[-1] == 32100
    assert architecture_for(arch.hub_ids[0].upper()) is arch
    assert models.vae.config.latent_channels == 16


def test_released_mmdit_stage_counts_on_meta():
    """A stage of a released transformer (SD3.5 Medium: its MMDiT-X blocks' second, text-free attention is not
    captured) counts on meta in seconds, with the family's settings: batch 1 x 4, checkpointing, rank 16, 1024
    px; every weight counted once (T5's tied embedding matrices share one storage)."""
    configs = ARCHITECTURES["sd35-medium"].configs()
    config = AttnDBConfig(model="sd35-medium", images="-", category="dog", output="-", validation_prompts=())
    config = config.for_model(configs.family, configs.resolution)
    assert (config.batch_size, config.gradient_accumulation_steps, config.stage2.rank) == (1, 4, 16)
    assert config.gradient_checkpointing and config.resolution == 1024
    models = build_models(configs, torch.bfloat16)
    one_pass = dataclasses.replace(config, gradient_accumulation_steps=1)  # the peak of 4 is that of 2; 1 is faster
    count = count_phase(models, one_pass, Phase("stage", 2), flops=False)
    unique = {id(t): t for m in models.modules for t in (*m.parameters(), *m.buffers())}.values()
    weights = sum(t.numel() * t.element_size() for t in unique)
    assert count.peak["weights"] == weights
    assert count.peak["gradients"] > 0 and count.peak["attention_capture"] > 0
