# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: a tiny random SD pipeline saved to disk, instance images, and a trained tiny run."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread in each pytest-xdist worker (pyproject runs one worker a core: the tiny models' operations are too small
# for a second thread, so two processes on one thread each finish the suite 1.8x sooner than one on two threads,
# measured on 2 cores); 2 in a single process (`-n 0`); ATTNDB_TEST_THREADS=1 where other jobs share the cores
# (threads waiting on each other made the tiny models 10-20x slower there)
_DEFAULT_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("ATTNDB_TEST_THREADS", _DEFAULT_THREADS)))

from attndb_peft.config import AttnDBConfig  # noqa: E402
from attndb_peft.testing import TINY_RESOLUTION, make_instance_images, save_tiny_pipeline  # noqa: E402

# Settings that make a tiny run fast and its effect visible: few steps, large learning rates, fp32 export.
TINY_SETTINGS = dict(
    resolution=TINY_RESOLUTION,
    batch_size=2,
    gradient_accumulation_steps=1,  # (SDXL's default is 4)
    save_dtype="fp32",
    log_every=1,
    validation_prompts=(),
)
TINY_STEPS = (3, 3, 3)
TINY_LRS = (5e-2, 1e-2, 1e-2)
#: The benchmark scripts (not a package): `load_benchmark` imports them by name.
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("attndb_peft").setLevel(logging.WARNING)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline written with save_pretrained (loads via from_pretrained)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    make_instance_images(folder, num_images=4, size=48)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random CLIP (32-px images) with its processor, saved like a Hub checkpoint (`attndb evaluate --clip`)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attndb_peft.testing import tiny_clip_tokenizer, tiny_text_config

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=tiny_text_config(tokenizer),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
        ),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def make_config(model: Path, images: Path, output: Path, steps=TINY_STEPS, learning_rates=TINY_LRS, **overrides):
    """An AttnDBConfig for a tiny run; `overrides` replace any setting."""
    config = AttnDBConfig(
        model=str(model), images=str(images), category="dog", output=str(output), **{**TINY_SETTINGS, **overrides}
    )
    return config.with_stage_values(steps=steps, learning_rates=learning_rates)


@pytest.fixture(scope="session")
def trained(tiny_model, instance_dir, tmp_path_factory):
    """A finished tiny run (stage 3 LoRA); the Trainer keeps its in-memory models."""
    from attndb_peft.trainer import Trainer

    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path_factory.mktemp("run") / "out"))
    trainer.run()
    return trainer


@contextlib.contextmanager
def one_thread():
    """Torch on one thread while the tiny SDXL runs: its operations are too small to gain from a second thread, and
    on a shared 2-core machine two threads made them 10-20x slower (threads waiting on each other; measured 0.8 s vs
    8-15 s per generation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline built in code (two text encoders, `text_time` U-Net), written with save_pretrained."""
    from attndb_peft.testing import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def sdxl_run(tiny_sdxl, tmp_path_factory):
    """All three stages on the tiny SDXL (2 images, 2 steps each, one thread); the Trainer keeps its in-memory
    models. Shared by test_sdxl.py and test_family_contracts.py."""
    from attndb_peft.testing import make_instance_images
    from attndb_peft.trainer import Trainer

    images = tmp_path_factory.mktemp("sdxl-images")
    make_instance_images(images, num_images=2, size=48)
    config = make_config(tiny_sdxl, images, tmp_path_factory.mktemp("sdxl-run") / "out", steps=(2, 2, 2), batch_size=1)
    trainer = Trainer(config)
    with one_thread():
        trainer.run()
    return trainer


def fresh_pipeline(model):
    """A `StableDiffusionPipeline` loaded from a saved folder with `from_pretrained`, progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_sdxl_pipeline(model):
    """A `StableDiffusionXLPipeline` loaded from a saved folder with `from_pretrained`, progress bar off."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Pixels of differently built models agree to this: CPU matmuls sum in an order that depends on the tensors'
#: memory alignment, which differs between a model that had layers injected and removed and a fresh one (seen:
#: 1.25e-06). What is exact (weights, buffers, vocabularies) is compared exactly with `assert_same_models`.
PIXEL_ATOL = 1e-5


def assert_same_pixels(got, want, atol=PIXEL_ATOL):
    """Images of two pipelines agree to `atol` (differently built models: see `PIXEL_ATOL`)."""
    difference = float(abs(got - want).max())
    assert difference <= atol, f"images differ by {difference:.3g} (> {atol:g})"


def model_state(pipe) -> dict:
    """Every parameter and buffer of the pipeline's models (copied) and every tokenizer's vocabulary. A layer
    that PEFT still wraps after its last adapter on it was deleted holds its weight as `base_layer.weight`: the
    key is named as unwrapped."""
    state = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            weights = component.state_dict().items()
            state[name] = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in weights}
        elif hasattr(component, "get_vocab"):
            state[name] = dict(component.get_vocab())
    return state


def assert_same_models(got, want):
    """Two pipelines (or `model_state` snapshots) hold bit-identical weights and buffers and equal vocabularies."""
    got = got if isinstance(got, dict) else model_state(got)
    want = want if isinstance(want, dict) else model_state(want)
    assert got.keys() == want.keys()
    for name, values in want.items():
        assert got[name].keys() == values.keys(), name
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                assert got[name][key].dtype == value.dtype and torch.equal(got[name][key], value), f"{name}.{key}"
            else:
                assert got[name][key] == value, f"{name}: {key}"


def generate(pipe, prompt, seed=0, steps=3):
    """Images of `prompt` as a numpy array, from a fixed seed at the tiny resolution."""
    with torch.no_grad():
        return pipe(
            prompt,
            num_inference_steps=steps,
            height=TINY_RESOLUTION,
            width=TINY_RESOLUTION,
            output_type="np",
            generator=torch.Generator().manual_seed(seed),
        ).images


def load_benchmark(name: str):
    """Import `benchmarks/NAME.py` afresh as module `NAME`: registered in `sys.modules` (dataclasses look their
    module up there), with `benchmarks/` on the path for the scripts that import each other."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
