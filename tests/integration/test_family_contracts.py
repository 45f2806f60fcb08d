# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The contracts every model family keeps, written once and run on the tiny SD, SDXL, SD3 and Flux pipelines with
one trained run each: the exported folder loaded with stock diffusers gives the trained in-memory model's
pixels, `load_attndb` gives the stock pixels, the kohya copy loads to the same pixels (SD, SDXL: diffusers reads
it; the SD3/Flux copy is ComfyUI's and diffusers reads only the PEFT file), a foreign LoRA stays active beside the
concept and two concepts coexist, and unloading restores the base model bit for bit.

Family-specific checks live in their family's file (SDXL pooling, LDM key names, single files: test_sdxl.py;
the SD embedding's shape and kohya key names: test_export.py; SD3 and Flux: test_mmdit.py); where one belongs to
a contract it is a branch of that contract's test here (SDXL stock loading without the pooling fix)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_models,
    assert_same_pixels,
    fresh_pipeline,
    fresh_sdxl_pipeline,
    generate,
    model_state,
    one_thread,
)
from safetensors.torch import load_file

import attndb_peft
from attndb_peft.adapter_format import EMBEDDING_NAME, KOHYA_NAME, LORA_NAME
from attndb_peft.families import family_of_model, family_of_pipeline
from attndb_peft.loading import loaded_concepts

TOKEN = "<attndb-dog>"
PROMPT = f"a photo of a {TOKEN} dog on the beach"
PLAIN = "a photo of a dog on the beach"


@dataclass
class Family:
    """One model family's tiny base model, its trained run and how stock diffusers loads its adapter."""

    name: str
    model: Path
    run: object  # the finished run; `run.pipeline()` is the trained in-memory model
    style_lora: Path  # a foreign LoRA for this family's U-Net
    steps: int  # denoising steps per picture
    fresh_pipeline: Callable
    _pipes: dict = field(default_factory=dict)
    _images: dict = field(default_factory=dict)

    @property
    def adapter(self) -> Path:
        return self.run.output_dir

    def fresh(self):
        return self.fresh_pipeline(self.model)

    def generate(self, pipe, prompt):
        return generate(pipe, prompt, steps=self.steps)

    def pipeline(self, kind: str):
        """A pipeline several contracts draw with, built once and never changed: the trained in-memory model
        (`trained`), a fresh pipeline with the adapter loaded by stock diffusers (`stock`), the base model
        (`base`)."""
        if kind not in self._pipes:
            if kind == "trained":
                pipe = self.run.pipeline()
                pipe.set_progress_bar_config(disable=True)
            else:
                pipe = self.stock_load(self.fresh()) if kind == "stock" else self.fresh()
            self._pipes[kind] = pipe
        return self._pipes[kind]

    def image(self, kind: str, prompt: str):
        """`pipeline(kind)`'s pictures of `prompt`, drawn once."""
        if (kind, prompt) not in self._images:
            self._images[kind, prompt] = self.generate(self.pipeline(kind), prompt)
        return self._images[kind, prompt]

    def stock_load(self, pipe, weight_name=LORA_NAME, adapter_name="concept", pooling_fix=True):
        """What the README tells stock-diffusers users: SD, `load_textual_inversion` on the file; SDXL, end-of-text
        pooling and one `load_textual_inversion` per encoder; SD3 and Flux (no textual-inversion loader), end-of-text
        pooling and the token's row written into each encoder. Then `load_lora_weights`."""
        folder = self.adapter
        if self.name == "sd":
            pipe.load_textual_inversion(str(folder / EMBEDDING_NAME))
        elif self.name in ("sd3", "flux"):
            from attndb_peft.families import pool_at_end_of_text

            family = family_of_pipeline(pipe)
            embedding = load_file(str(folder / EMBEDDING_NAME))
            for key, (tokenizer, encoder) in zip(family.embedding_keys, text_pairs(pipe)):
                if "CLIP" in type(encoder).__name__ and pooling_fix:
                    pool_at_end_of_text(encoder, tokenizer.eos_token_id)
                tokenizer.add_tokens(TOKEN)
                row = tokenizer.convert_tokens_to_ids(TOKEN)
                if row >= encoder.get_input_embeddings().num_embeddings:
                    encoder.resize_token_embeddings(row + 1)
                encoder.get_input_embeddings().weight.data[row] = embedding[key][0]
        else:
            from attndb_peft.families import pool_at_end_of_text

            if pooling_fix:
                pool_at_end_of_text(pipe.text_encoder_2, pipe.tokenizer_2.eos_token_id)
            embedding = load_file(str(folder / EMBEDDING_NAME))
            for key, (tokenizer, encoder) in zip(("clip_l", "clip_g"), text_pairs(pipe)):
                pipe.load_textual_inversion(embedding[key], token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
        return pipe

    def with_style(self, weight=0.6):
        """A fresh pipeline with the foreign LoRA loaded by stock diffusers as `style`, at `weight`."""
        pipe = self.fresh()
        pipe.load_lora_weights(str(self.style_lora), adapter_name="style")
        pipe.set_adapters(["style"], [weight])
        return pipe


def text_pairs(pipe) -> list:
    """Every (tokenizer, text encoder) pair of the pipeline: one for SD, two for SDXL and Flux, three for SD3."""
    return family_of_pipeline(pipe).components(pipe)


#: The pipeline components that can hold LoRA layers, in any family.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _scalings(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        (component, name, adapter): scale
        for component in LORA_COMPONENTS
        if getattr(pipe, component, None) is not None
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(module, BaseTunerLayer)
        for adapter, scale in module.scaling.items()
    }


def _state(pipe):
    """The loader's bookkeeping and every text encoder's vocabulary and embedding matrix."""
    state = {
        "adapters": pipe.get_list_adapters(),
        "active": pipe.get_active_adapters(),
        "scalings": _scalings(pipe),
        "concepts": loaded_concepts(pipe),
    }
    for i, (tokenizer, encoder) in enumerate(text_pairs(pipe)):
        state[f"vocab{i}"] = dict(tokenizer.get_vocab())
        state[f"vocab_size{i}"] = encoder.config.vocab_size
        state[f"embeddings{i}"] = encoder.get_input_embeddings().weight.detach().clone()
    return state


def _assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key.startswith("embeddings"):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


def _foreign_lora(model, folder):
    """A foreign LoRA made with PEFT (random, non-zero B) and saved with the family's diffusers writer."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = family_of_model(model)
    denoiser = getattr(diffusers, family.denoiser_class).from_pretrained(str(model), subfolder=family.denoiser)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)
    denoiser.add_adapter(config, adapter_name="style")
    layers = {f"{family.denoiser}_lora_layers": get_peft_model_state_dict(denoiser, adapter_name="style")}
    getattr(diffusers, family.pipeline_class).save_lora_weights(folder, **layers)
    return folder


def _joint_family(name, tmp_path_factory, images):
    """A tiny SD3 or Flux base model and a run of all three stages on it (2 steps each, no samples)."""
    from conftest import make_config

    from attndb_peft.testing_mmdit import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
    from attndb_peft.trainer import Trainer

    save = save_tiny_sd3_pipeline if name == "sd3" else save_tiny_flux_pipeline
    root = tmp_path_factory.mktemp(f"{name}-run")
    model = save(root / "model")
    trainer = Trainer(make_config(model, images, root / "out", steps=(2, 2, 2), validation_prompts=()))
    trainer.run()
    return model, trainer


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def family(request, tmp_path_factory, instance_dir):
    """SD (the session's `trained` run, 3 denoising steps), SDXL (`sdxl_run`, 2 steps), SD3 or Flux (a run of
    their own, 2 steps); all but SD on one thread (see `conftest.one_thread`)."""
    style = tmp_path_factory.mktemp(f"{request.param}-style")
    if request.param == "sd":
        model, run = request.getfixturevalue("tiny_model"), request.getfixturevalue("trained")
        _foreign_lora(model, style)
        yield Family("sd", model, run, style, steps=3, fresh_pipeline=fresh_pipeline)
        return
    with one_thread():
        if request.param == "sdxl":
            model, run = request.getfixturevalue("tiny_sdxl"), request.getfixturevalue("sdxl_run")
            fresh = fresh_sdxl_pipeline
        else:
            model, run = _joint_family(request.param, tmp_path_factory, instance_dir)
            fresh = _fresh_any
        _foreign_lora(model, style)
        yield Family(request.param, model, run, style, steps=2, fresh_pipeline=fresh)


def _fresh_any(model):
    """The pipeline class a saved folder names, loaded with `from_pretrained`, progress bar off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- 1. stock diffusers
def test_stock_diffusers_reproduces_the_trained_model(family):
    stock = family.image("stock", PROMPT)
    assert_same_pixels(stock, family.image("trained", PROMPT))
    # ... and differs from the base model, with and without the token
    assert abs(family.image("base", PROMPT) - stock).max() > 1e-3
    assert abs(family.image("base", PLAIN) - family.image("stock", PLAIN)).max() > 1e-3
    if family.name == "sdxl":  # stock diffusers without the pooling fix pools at the concept token: other pictures
        unfixed = family.stock_load(family.fresh(), pooling_fix=False)
        assert abs(family.generate(unfixed, PROMPT) - family.image("trained", PROMPT)).max() > 1e-4


# ------------------------------------------------------------------------------------------- 2. load_attndb, 5. unload
def test_load_attndb_gives_the_stock_diffusers_pixels_and_unload_restores_the_base_model(family):
    pipe = family.fresh()
    token = pipe.load_attndb(str(family.adapter))
    assert token == TOKEN
    assert pipe.get_active_adapters() == ["attndb-dog"] and loaded_concepts(pipe) == {"attndb-dog": token}
    got = family.generate(pipe, PROMPT)
    assert_same_pixels(got, family.image("stock", PROMPT))
    assert_same_pixels(got, family.image("trained", PROMPT))
    assert abs(got - family.image("base", PROMPT)).max() > 1e-3  # it did change something
    # (weight=, the LoRA strength as set_adapters sets it: in the mixing test below)

    # 5. unload restores the base model: the token gone from every tokenizer, every embedding matrix back to its
    # size, no adapter or LoRA layer left, every weight bit-identical to a fresh pipeline's, the same pixels
    assert pipe.unload_attndb() == token
    fresh = family.pipeline("base")
    for (tokenizer, encoder), (_, base_encoder) in zip(text_pairs(pipe), text_pairs(fresh), strict=True):
        assert token not in tokenizer.get_vocab()
        rows = encoder.get_input_embeddings().num_embeddings
        assert len(tokenizer) == len(fresh_tokenizer := next(t for t, e in text_pairs(fresh) if e is base_encoder))
        assert rows == base_encoder.get_input_embeddings().num_embeddings >= len(fresh_tokenizer)  # T5: spare rows
    assert not any(pipe.get_list_adapters().values()) and pipe.get_active_adapters() == []
    assert loaded_concepts(pipe) == {}
    for name in LORA_COMPONENTS:  # no LoRA layers left behind, not even empty ones
        if getattr(fresh, name, None) is not None:
            got, want = getattr(pipe, name).modules(), getattr(fresh, name).modules()
            assert [type(m) for m in got] == [type(m) for m in want], name
    assert_same_models(pipe, fresh)
    assert_same_pixels(family.generate(pipe, PLAIN), family.image("base", PLAIN))


# ---------------------------------------------------------------------------------------------- 3. kohya copy
def test_kohya_copy_loads_to_the_same_pixels(family):
    if family.name in ("sd3", "flux"):
        pytest.skip("the SD3/Flux kohya copy is ComfyUI's (lora_transformer_ keys); diffusers reads the PEFT file")
    kohya = family.generate(family.stock_load(family.fresh(), weight_name=KOHYA_NAME), PROMPT)
    peft = family.image("stock", PROMPT)
    assert abs(kohya - peft).max() < 1e-6
    # ... and the LoRA is not a no-op (the stage-2 attention modules have twice the rank of the others, the case a
    # per-module kohya alpha would get wrong in diffusers)
    assert abs(peft - family.image("base", PROMPT)).max() > 1e-3


# ---------------------------------------------------------------------------------------------- 4. mixing
def test_a_foreign_lora_stays_active_the_weights_mix_and_two_concepts_coexist(family):
    pipe = family.with_style(0.6)
    style_only = family.generate(pipe, PLAIN)
    base_state = _state(pipe)
    style_models = model_state(pipe)

    token = attndb_peft.load_attndb(pipe, family.adapter, weight=0.8)
    assert token == TOKEN and pipe.get_active_adapters() == ["style", "attndb-dog"]
    scalings = _scalings(pipe)
    assert {k: v for k, v in scalings.items() if k[2] == "style"} == base_state["scalings"]  # weight kept
    assert {v for k, v in scalings.items() if k[2] == "attndb-dog"} == {0.8}  # alpha = rank: scaling = weight
    assert abs(family.generate(pipe, PLAIN) - style_only).max() > 1e-3
    # weight= is the LoRA strength as set_adapters would set it: the pixels of stock diffusers loading both
    stock = family.stock_load(family.with_style(0.6))
    stock.set_adapters(["style", "concept"], [0.6, 0.8])
    mixed = family.generate(pipe, PROMPT)
    assert abs(mixed - family.generate(stock, PROMPT)).max() < 1e-6

    pipe.set_adapters(["style", "attndb-dog"], [0.6, 0.0])  # concept LoRA off: the style alone
    assert abs(family.generate(pipe, PLAIN) - style_only).max() < 1e-6
    concept_only = family.fresh()
    assert attndb_peft.load_attndb(concept_only, family.adapter, weight=0.8) == token
    alone = family.generate(concept_only, PROMPT)
    pipe.set_adapters(["style", "attndb-dog"], [0.0, 0.8])  # style off: the concept alone
    assert abs(family.generate(pipe, PROMPT) - alone).max() < 1e-6
    pipe.set_adapters(["style", "attndb-dog"], [0.6, 0.8])

    # a second concept (the same files under another token and adapter name)
    second = pipe.load_attndb(family.adapter, token="<dog-b>", adapter_name="dog-b", weight=0.8)
    assert second == "<dog-b>" and loaded_concepts(pipe) == {"attndb-dog": token, "dog-b": second}
    assert pipe.get_active_adapters() == ["style", "attndb-dog", "dog-b"]
    assert all(token in t.get_vocab() and second in t.get_vocab() for t, _ in text_pairs(pipe))
    # unloading one leaves the other: it draws as the first did beside the style
    assert pipe.unload_attndb("attndb-dog") == token
    assert pipe.get_active_adapters() == ["style", "dog-b"] and loaded_concepts(pipe) == {"dog-b": second}
    assert all(token not in t.get_vocab() and second in t.get_vocab() for t, _ in text_pairs(pipe))
    assert_same_pixels(family.generate(pipe, PROMPT.replace(TOKEN, second)), mixed)

    assert pipe.unload_attndb("dog-b") == second
    assert pipe.get_active_adapters() == ["style"]
    _assert_same_state(base_state, _state(pipe))
    assert_same_models(pipe, style_models)
    assert_same_pixels(family.generate(pipe, PLAIN), style_only)  # the style-only images again
