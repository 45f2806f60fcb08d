# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What is particular to SDXL, on the tiny SDXL pipeline built in code (two text encoders, `text_time` U-Net) and
the session's trained tiny SDXL run (`sdxl_run`, conftest.py): family detection, pooling at end-of-text, the
adapter files (clip_l/clip_g embedding, kohya LDM names), Hub loading and pushing, refusals, single files, the CLI.
What holds for every family (stock diffusers and `load_attndb` reproduce the in-memory model's pixels, the kohya
copy loads to the same pixels, mixing with a foreign LoRA, two concepts, unload) is in test_family_contracts.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import fresh_sdxl_pipeline, make_config, one_thread
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import attndb_peft
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, KOHYA_NAME, LORA_NAME
from attndb_peft.families import SD, SDXL, family_of_model, family_of_pipeline, pool_at_end_of_text
from attndb_peft.loading import AdapterError
from attndb_peft.testing import TINY_SDXL_WIDTHS, build_tiny_sdxl_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny SDXL's operations are too small to gain from a second thread, and on a shared 2-core machine two
    threads made them 10-20x slower (threads waiting on each other; measured 0.8 s vs 8-15 s per generation)."""
    with one_thread():
        yield


# ---------------------------------------------------------------------------------------------- family
def test_family_is_detected_from_the_model(tiny_sdxl, tiny_model):
    assert family_of_model(tiny_sdxl) is SDXL and family_of_model(tiny_model) is SD
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    # without model_index.json the U-Net config tells (addition_embed_type == "text_time")
    (tiny_sdxl / "model_index.json").rename(tiny_sdxl / "index.bak")
    try:
        assert family_of_model(tiny_sdxl) is SDXL
    finally:
        (tiny_sdxl / "index.bak").rename(tiny_sdxl / "model_index.json")
    assert family_of_pipeline(build_tiny_sdxl_pipeline()) is SDXL


def test_pooling_moves_from_the_new_token_to_end_of_text():
    """text_encoder_2's legacy eos_token_id 2 pools at argmax(ids): the added token's (highest) id wins."""
    pipe = build_tiny_sdxl_pipeline()
    tokenizer, encoder = pipe.tokenizer_2, pipe.text_encoder_2
    base_ids = tokenizer("a photo of a dog", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base_before = encoder(base_ids).text_embeds
    tokenizer.add_tokens("<new>")
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer("a photo of a <new> dog", padding="max_length", return_tensors="pt").input_ids
    new_position = ids[0].tolist().index(tokenizer.convert_tokens_to_ids("<new>"))
    eos_position = ids[0].tolist().index(tokenizer.eos_token_id)

    def pooled_at(position):
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
            return encoder.text_projection(out.last_hidden_state[:, position])  # already final-layer-normed

    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).text_embeds, pooled_at(new_position))
        pool_at_end_of_text(encoder, tokenizer.eos_token_id)
        torch.testing.assert_close(encoder(ids).text_embeds, pooled_at(eos_position))
        # prompts without added tokens pool where they did
        torch.testing.assert_close(encoder(base_ids).text_embeds, base_before)


# ---------------------------------------------------------------------------------------------- training, files
def test_sdxl_adapter_files(sdxl_run, tiny_sdxl):
    out = sdxl_run.output_dir
    embedding = load_file(str(out / EMBEDDING_NAME))
    assert {k: list(v.shape) for k, v in embedding.items()} == {
        "clip_l": [1, TINY_SDXL_WIDTHS[0]],
        "clip_g": [1, TINY_SDXL_WIDTHS[1]],
    }
    # each vector trained away from its own encoder's category init
    base = fresh_sdxl_pipeline(tiny_sdxl)
    for key, (tokenizer, encoder) in zip(("clip_l", "clip_g"), SDXL.components(base)):
        ids = tokenizer("dog", add_special_tokens=False).input_ids
        init = encoder.get_input_embeddings().weight[ids].float().mean(0)
        assert (embedding[key][0] - init).abs().max() > 1e-4, key
    kohya = load_file(str(out / KOHYA_NAME))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_q" in modules
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q" in modules
    assert all(
        m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
        for m in modules
    )
    with safe_open(str(out / KOHYA_NAME), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    info = json.loads((out / CONFIG_NAME).read_text())
    assert info["family"] == "sdxl" and info["embedding_dims"] == list(TINY_SDXL_WIDTHS)
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and 'embedding["clip_g"]' in card


def test_hub_id_loads_from_the_cache_and_a_checkpoint_exports(sdxl_run, tiny_sdxl, tmp_path, monkeypatch):
    """A Hub repo id resolves offline from the cache; `export_checkpoint` rebuilds the SDXL adapter from the last
    stage-3 checkpoint (both token vectors restored)."""
    from huggingface_hub import constants
    from test_loading import _lay_out_hub_cache

    from attndb_peft.trainer import export_checkpoint

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "attndb-test/dog-xl", sdxl_run.output_dir, "0123456789abcdef0123456789abcdef01234567")
    pipe = fresh_sdxl_pipeline(tiny_sdxl)
    assert pipe.load_attndb("attndb-test/dog-xl", cache_dir=cache) == "<attndb-dog>"
    assert all("<attndb-dog>" in t.get_vocab() for t in (pipe.tokenizer, pipe.tokenizer_2))

    exported = tmp_path / "from-checkpoint"
    export_checkpoint(sdxl_run.output_dir / "checkpoints" / "stage3-step2", exported)
    for name in (EMBEDDING_NAME, LORA_NAME):
        want, got = load_file(str(sdxl_run.output_dir / name)), load_file(str(exported / name))
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name


def test_push_to_hub_uploads_the_sdxl_adapter_with_an_sdxl_card(sdxl_run, monkeypatch):
    """`push_to_hub` (network calls intercepted as in test_hub): the SDXL folder's files go up unchanged, and the
    card's usage snippet loads the concept into an SDXL pipeline."""
    from test_hub import COMMIT_URL, FakeHub

    from attndb_peft.export import MODEL_CARD_NAME
    from attndb_peft.hub import push_to_hub

    hub = FakeHub(monkeypatch)
    assert push_to_hub(sdxl_run.output_dir, "me/my-dog-xl", token="hf_write") == COMMIT_URL
    (commit,) = hub.commits
    for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME, CONFIG_NAME):
        assert commit["files"][name] == (sdxl_run.output_dir / name).read_bytes(), name
    card = commit["files"][MODEL_CARD_NAME].decode()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and 'pipe.load_attndb("me/my-dog-xl")' in card
    assert "stable-diffusion-xl" in card  # the Hub tag


def test_load_attndb_is_registered_on_sdxl_pipelines():
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    assert not issubclass(StableDiffusionXLLoraLoaderMixin, StableDiffusionLoraLoaderMixin)  # why both are patched

    assert StableDiffusionXLLoraLoaderMixin.load_attndb is attndb_peft.load_attndb
    for cls in (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline):
        assert cls.load_attndb is attndb_peft.load_attndb and cls.unload_attndb is attndb_peft.unload_attndb


def test_an_sd_embedding_is_refused_by_an_sdxl_pipeline_unchanged(sdxl_run, tiny_sdxl, tmp_path):
    folder = tmp_path / "sd-like"
    shutil.copytree(sdxl_run.output_dir, folder, ignore=shutil.ignore_patterns("checkpoints", "samples", "logs"))
    embedding = load_file(str(folder / EMBEDDING_NAME))
    save_file({"<attndb-dog>": embedding["clip_l"].clone()}, str(folder / EMBEDDING_NAME))
    pipe = fresh_sdxl_pipeline(tiny_sdxl)
    sizes = [len(pipe.tokenizer), len(pipe.tokenizer_2)]
    with pytest.raises(AdapterError, match="clip_l"):
        pipe.load_attndb(folder)
    assert [len(pipe.tokenizer), len(pipe.tokenizer_2)] == sizes and pipe.get_list_adapters() == {}


def test_full_stage3_on_sdxl_is_warned_about(tiny_sdxl, tmp_path):
    from attndb_peft.testing import make_instance_images
    from attndb_peft.trainer import check_inputs

    make_instance_images(tmp_path / "images", num_images=1, size=48)
    config = make_config(tiny_sdxl, tmp_path / "images", tmp_path / "out")
    assert not any("SDXL" in w for w in check_inputs(config))
    full = make_config(tiny_sdxl, tmp_path / "images", tmp_path / "out", stage3_mode="full")
    assert any("`stage3_mode` full on an SDXL U-Net" in w for w in check_inputs(full))


# ---------------------------------------------------------------------------------------------- single files
def test_an_sdxl_single_file_trains_like_its_folder_and_generates(sdxl_run, tiny_sdxl, tmp_path):
    """An SDXL checkpoint in Stability's single-file layout (what A1111/ComfyUI users hold), with its diffusers
    config: diffusers' `from_single_file` gives the folder's weights bit for bit, training on it writes the files
    training on the folder writes, and `generate` takes it.

    "The files" up to float rounding: the weights are identical, but `from_pretrained` leaves some of them at
    addresses that are not 64-byte aligned and CPU matmul kernels then sum in another order (1e-7 differences,
    measured on the time embedding's first layer), which Adam's first steps amplify where a gradient is near zero
    (about 1 % in a few LoRA entries after 2 steps, 6e-4 of a tensor's norm at most)."""
    from attndb_peft.cli import main
    from attndb_peft.inference import load_pipeline
    from attndb_peft.testing import save_tiny_single_file
    from attndb_peft.trainer import Trainer

    single = save_tiny_single_file(tmp_path / "tiny-sdxl.safetensors", sdxl=True)
    pipe, _ = load_pipeline(str(single), device="cpu", model_config=str(tiny_sdxl))
    assert family_of_pipeline(pipe) is SDXL and type(pipe).__name__ == "StableDiffusionXLPipeline"
    reference = build_tiny_sdxl_pipeline()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name

    config = dataclasses.replace(
        sdxl_run.config, model=str(single), model_config=str(tiny_sdxl), output=str(tmp_path / "out")
    )
    Trainer(config).run()
    for name, tolerance in ((EMBEDDING_NAME, 1e-5), (LORA_NAME, 5e-3), (KOHYA_NAME, 5e-3)):
        got, want = load_file(str(tmp_path / "out" / name)), load_file(str(sdxl_run.output_dir / name))
        assert got.keys() == want.keys(), name
        for key in want:  # relative to the tensor's norm (see above); a different model would be off by ~100 %
            difference = (got[key].float() - want[key].float()).norm() / want[key].float().norm().clamp_min(1e-12)
            assert difference < tolerance, (name, key, float(difference))
    assert main(["generate", "--adapter", str(tmp_path / "out"), "--prompt", "a photo of a {}", "--steps", "2",
                 "--output", str(tmp_path / "gen"), "--height", "32", "--width", "32", "--quiet"]) == 0  # fmt: skip
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_trains_resumes_generates_inspects_and_evaluates_an_sdxl_model(tiny_sdxl, tiny_clip, tmp_path, capsys):
    """`attndb train --model <SDXL folder>` (the family comes from the model, and with it the resolution and the
    LoRA ranks), a finished run extended with `--resume`, then generate, inspect and evaluate."""
    from PIL import Image

    from attndb_peft.cli import main
    from attndb_peft.families import native_resolution
    from attndb_peft.testing import make_instance_images

    images = tmp_path / "images"
    make_instance_images(images, num_images=2, size=48)
    out = tmp_path / "out"
    train = ["train", "--model", str(tiny_sdxl), "--images", str(images), "--category", "dog", "--output", str(out)]
    settings = ["--batch-size", "1", "--gradient-accumulation-steps", "1", "--checkpointing-steps", "1", "--quiet"]
    assert main([*train, *settings, "--steps", "1,1,1"]) == 0
    recorded = json.loads((out / "attndb_config.json").read_text())["settings"]
    configs = [json.loads((tiny_sdxl / part / "config.json").read_text()) for part in ("unet", "vae")]
    assert recorded["resolution"] == native_resolution(*configs)  # no --resolution: the model's own
    assert recorded["stage2"]["rank"] == recorded["stage3"]["rank"] == SDXL.default_lora_rank == 16
    assert recorded["gradient_checkpointing"] is True  # SDXL's memory default (the batch is set above, for speed)
    one_step = load_file(str(out / LORA_NAME))
    assert main([*train, *settings, "--steps", "1,1,2", "--resume"]) == 0  # one more stage-3 step
    assert json.loads((out / "attndb_config.json").read_text())["settings"]["stage3"]["steps"] == 2
    two_steps = load_file(str(out / LORA_NAME))
    assert one_step.keys() == two_steps.keys() and any(not torch.equal(one_step[k], two_steps[k]) for k in one_step)
    assert set(load_file(str(out / EMBEDDING_NAME))) == {"clip_l", "clip_g"}
    assert (out / "samples" / "stage3-attention.png").is_file()  # validation samples drawn by the SDXL pipeline
    common = ["--adapter", str(out), "--prompt", "a photo of a {} on the beach", "--steps", "2", "--quiet"]
    assert main(["generate", *common, "--height", "32", "--width", "32", "--output", str(tmp_path / "gen")]) == 0
    assert Image.open(next((tmp_path / "gen").glob("*.png"))).size == (32, 32)
    assert main(["inspect", *common, "--output", str(tmp_path / "attn.png")]) == 0
    record = json.loads((tmp_path / "attn.json").read_text())
    assert "<attndb-dog>" in [t["text"] for t in record["tokens"]]
    assert all(0 < t["mean_attention"] < 1 for t in record["tokens"])
    capsys.readouterr()
    evaluation = tmp_path / "eval"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {} in the snow\nstyle: a painting of a {}\n")
    argv = ["evaluate", "--adapter", str(out), "--images", str(images), "--clip", str(tiny_clip), "--num-images", "1",
            "--prompts", str(prompts),
            "--steps", "2", "--height", "32", "--width", "32", "--output", str(evaluation), "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert -1 <= metrics["identity"] <= 1 and -1 <= metrics["text_alignment"] <= 1
    assert [r["scored_against"] for r in metrics["prompts"]] == ["a photo of a dog in the snow", "a painting of a dog"]
