# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The tiny SD3 and Flux.1 pipelines built in code (testing_mmdit.py): the T5 tokenizer tokenizes as T5's does and
survives saving, each pipeline saves, reloads as its class with the same weights and generates, the same seed
builds the same weights, and `encode_prompt` gives the widths the transformers expect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_thread

from attndb_peft.testing import TINY_RESOLUTION
from attndb_peft.testing_mmdit import (
    TINY_MMDIT_LATENT_CHANNELS,
    TINY_SD3_CLIP_WIDTHS,
    TINY_T5_MAX_LENGTH,
    TINY_T5_WIDTH,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    tiny_t5_tokenizer,
)

PROMPTS = ("a photo of a dog", "teddy bear", "a Zebra on the beach, 42!", "")
FAMILIES = {
    "sd3": (build_tiny_sd3_pipeline, save_tiny_sd3_pipeline, "StableDiffusion3Pipeline"),
    "flux": (build_tiny_flux_pipeline, save_tiny_flux_pipeline, "FluxPipeline"),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


# ---------------------------------------------------------------------------------------------- T5 tokenizer
def test_t5_tokenizer_tokenizes_like_t5():
    tok = tiny_t5_tokenizer()
    assert type(tok).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == TINY_T5_MAX_LENGTH
    ids = tok("a photo of a dog").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1 and len(ids) == 6  # five words, then </s>
    assert tok.convert_ids_to_tokens(tok("dog", add_special_tokens=False).input_ids) == ["▁dog"]
    assert len(tok("teddy bear", add_special_tokens=False).input_ids) == 2
    zebra = tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False).input_ids)
    assert zebra == ["▁", "z", "e", "b", "r", "a"] and tok.unk_token_id not in tok("Zebra, 42!").input_ids
    text = "a Zebra on the beach, 42!"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    padded = tok("a dog", padding="max_length", max_length=8).input_ids
    assert padded == [*tok("a dog").input_ids, 0, 0, 0, 0, 0]


def test_t5_tokenizer_keeps_an_added_token_whole():
    tok = tiny_t5_tokenizer()
    size = len(tok)
    assert tok.add_tokens("<attndb-dog>") == 1 and len(tok) == size + 1
    new_id = tok.convert_tokens_to_ids("<attndb-dog>")
    ids = tok("a photo of a <attndb-dog> dog").input_ids
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    assert ids.count(new_id) == 1 and ids[ids.index(new_id) + 1] == dog and ids[-1] == tok.eos_token_id


def test_t5_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = tiny_t5_tokenizer()
    tok.add_tokens("<attndb-dog>")
    tok.save_pretrained(tmp_path / "tokenizer_3")
    auto = AutoTokenizer.from_pretrained(tmp_path / "tokenizer_3")
    sub = T5TokenizerFast.from_pretrained(tmp_path, subfolder="tokenizer_3")  # as pipelines load tokenizer_3
    texts = [*PROMPTS, "a photo of a <attndb-dog> dog"]
    for loaded in (auto, sub):
        assert isinstance(loaded, T5TokenizerFast) and len(loaded) == len(tok)
        assert loaded.model_max_length == TINY_T5_MAX_LENGTH and loaded.pad_token_id == 0
        for text in texts:
            assert loaded(text).input_ids == tok(text).input_ids, text
        batch = dict(padding="max_length", max_length=16, truncation=True)
        assert loaded(texts, **batch).input_ids == tok(texts, **batch).input_ids


# ---------------------------------------------------------------------------------------------- pipelines
def _state(pipe) -> dict[str, torch.Tensor]:
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_saves_reloads_and_generates(family, tmp_path):
    from diffusers import DiffusionPipeline

    build, save, class_name = FAMILIES[family]
    folder = save(tmp_path / family)
    assert save(tmp_path / "again") == tmp_path / "again"
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == class_name
    assert type(pipe.text_encoder.config).__name__ == "CLIPTextConfig"
    t5 = pipe.text_encoder_3 if family == "sd3" else pipe.text_encoder_2
    t5_tokenizer = pipe.tokenizer_3 if family == "sd3" else pipe.tokenizer_2
    assert type(t5).__name__ == "T5EncoderModel" and t5.config.vocab_size > len(t5_tokenizer)
    assert pipe.vae.config.latent_channels == TINY_MMDIT_LATENT_CHANNELS and pipe.vae.config.shift_factor
    reference = build(seed=0).transformer.state_dict()
    reloaded = pipe.transformer.state_dict()
    assert reloaded.keys() == reference.keys()
    assert all(torch.equal(reloaded[k], reference[k]) for k in reference)
    images = pipe(
        "a photo of a dog",
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_seed_builds_the_same_weights(family):
    build = FAMILIES[family][0]
    rng = torch.random.get_rng_state()
    first, second, other = _state(build(seed=0)), _state(build(seed=0)), _state(build(seed=1))
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left as it was
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["transformer.proj_out.weight"], other["transformer.proj_out.weight"])


def test_sd3_encode_prompt_pads_clip_to_the_t5_width():
    pipe = build_tiny_sd3_pipeline()
    config = pipe.transformer.config
    assert config.joint_attention_dim == TINY_T5_WIDTH > sum(TINY_SD3_CLIP_WIDTHS)
    assert config.pooled_projection_dim == sum(TINY_SD3_CLIP_WIDTHS)
    assert pipe.default_sample_size * pipe.vae_scale_factor == TINY_RESOLUTION
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a photo of a dog", None, None, do_classifier_free_guidance=True, max_sequence_length=16
        )
    assert embeds.shape == negative.shape == (1, 77 + 16, config.joint_attention_dim)
    assert pooled.shape == negative_pooled.shape == (1, config.pooled_projection_dim)
    assert torch.all(embeds[:, :77, sum(TINY_SD3_CLIP_WIDTHS) :] == 0)  # CLIP states zero-padded to T5's width
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_encode_prompt_and_guidance(guidance_embeds):
    pipe = build_tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    config = pipe.transformer.config
    assert config.guidance_embeds is guidance_embeds
    assert config.in_channels == 4 * TINY_MMDIT_LATENT_CHANNELS
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert pipe.scheduler.config.use_dynamic_shifting
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt("a photo of a dog", max_sequence_length=16)
    assert embeds.shape == (1, 16, TINY_T5_WIDTH) == (1, 16, config.joint_attention_dim)
    assert pooled.shape == (1, TINY_SD3_CLIP_WIDTHS[0]) == (1, config.pooled_projection_dim)
    assert text_ids.shape == (16, 3)
    if not guidance_embeds:  # schnell-like: runs without a guidance embedding
        images = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=2,
            height=TINY_RESOLUTION,
            width=TINY_RESOLUTION,
            guidance_scale=0.0,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3) and np.isfinite(images).all()
