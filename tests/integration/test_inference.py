# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb generate` and `attndb inspect` on an adapter written by a tiny training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attndb_peft.adapter_format import CONFIG_NAME
from attndb_peft.cli import main
from attndb_peft.inference import UsageError, expand_prompt, load_pipeline, prompt_tokens, read_adapter_config


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_expand_prompt():
    assert (
        expand_prompt("a photo of a {} in the snow", "<v>", "teddy bear") == "a photo of a <v> teddy bear in the snow"
    )
    assert expand_prompt("a photo of a {}", None, "dog") == "a photo of a dog"  # text alignment's prompt
    assert expand_prompt("no placeholder", None, None) == "no placeholder"
    with pytest.raises(UsageError, match="`adapter`"):
        expand_prompt("a {}", None, None)


def test_read_adapter_config_accepts_old_files_and_names_the_argument(tmp_path):
    """An `attndb_config.json` needs only `token` and `category`: folders from before SDXL have no `family`."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"token": "<v>", "category": "dog"}))
    info = read_adapter_config(folder)
    assert (info.token, info.category, info.base_model, info.family, info.settings) == ("<v>", "dog", None, "sd", {})
    (folder / CONFIG_NAME).write_text(json.dumps({"token": "<v>"}))
    with pytest.raises(UsageError, match=r"^`adapter` .*not a valid attndb config \('category'\)"):
        read_adapter_config(folder)
    with pytest.raises(UsageError, match=r"^`adapter` .*no such folder"):
        read_adapter_config(tmp_path / "missing")


def test_generate_writes_the_images_and_settings_reproducibly(trained, tmp_path, capsys):
    adapter = trained.output_dir
    common = ["--adapter", str(adapter), "--prompt", "a photo of a {} on the beach", "--steps", "2", "--quiet"]
    assert main(["generate", *common, "--num-images", "3", "--seed", "5", "--output", str(tmp_path / "a")]) == 0
    assert main(["generate", *common, "--num-images", "2", "--seed", "5", "--output", str(tmp_path / "b")]) == 0
    assert main(["generate", *common, "--num-images", "1", "--seed", "6", "--output", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / d) for d in "abc"]  # (d is written below)

    settings = json.loads((tmp_path / "a" / "generate.json").read_text())
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(pngs) == 3 and sorted(r["file"] for r in settings["images"]) == pngs
    assert [r["seed"] for r in settings["images"]] == [5, 6, 7]
    assert {r["prompt"] for r in settings["images"]} == {"a photo of a <attndb-dog> dog on the beach"}
    assert settings["model"] == str(trained.config.model)  # the adapter's base model when --model is left out
    assert settings["token"] == "<attndb-dog>" and settings["category"] == "dog"
    assert (settings["steps"], settings["guidance"], settings["lora_scale"]) == (2, 7.5, 1.0)

    first = {r["seed"]: _png(tmp_path / "a" / r["file"]) for r in settings["images"]}
    assert main(["generate", *common, "--num-images", "3", "--seed", "5", "--output", str(tmp_path / "d")]) == 0
    for record in json.loads((tmp_path / "d" / "generate.json").read_text())["images"]:  # same settings: same pixels
        assert np.array_equal(_png(tmp_path / "d" / record["file"]), first[record["seed"]])
    again = json.loads((tmp_path / "b" / "generate.json").read_text())["images"]
    for record in again:  # fewer images: the first ones again, up to the float rounding of another batch size
        assert np.abs(_png(tmp_path / "b" / record["file"]).astype(int) - first[record["seed"]]).max() <= 2
    # image i starts from seed + i's noise whatever the batch: generated alone, seed 6 gives the same picture up to
    # float rounding of a different batch size
    other = json.loads((tmp_path / "c" / "generate.json").read_text())["images"][0]
    alone = _png(tmp_path / "c" / other["file"]).astype(int)
    assert np.abs(alone - first[6]).max() <= 2
    assert np.abs(first[5].astype(int) - first[6]).max() > 20


def test_lora_scale_changes_the_images(trained, tmp_path):
    common = ["generate", "--adapter", str(trained.output_dir), "--prompt", "a {}", "--steps", "2", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "full")]) == 0
    assert main([*common, "--lora-scale", "0", "--output", str(tmp_path / "off")]) == 0
    full, off = (next((tmp_path / d).glob("*.png")) for d in ("full", "off"))
    assert not np.array_equal(_png(full), _png(off))


def test_inspect_writes_one_map_per_prompt_token(trained, tmp_path):
    prompt = "a photo of a {} in the jungle"
    output = tmp_path / "attn.png"
    argv = [
        "inspect",
        "--adapter",
        str(trained.output_dir),
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--output",
        str(output),
    ]
    assert main([*argv, "--quiet"]) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    pipe, info = load_pipeline(None, str(trained.output_dir))  # the tokenizer with the concept's token added
    full = expand_prompt(prompt, info.token, info.category)
    ids = pipe.tokenizer(full).input_ids
    body = ids[1:-1]  # between BOS and EOS
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert [t["id"] for t in record["tokens"]] == body
    assert [t["text"] for t in record["tokens"]] == [pipe.tokenizer.decode([i]).strip() for i in body]
    assert [t["text"] for t in record["tokens"]] == [
        "a",
        "photo",
        "of",
        "a",
        "<attndb-dog>",
        "dog",
        "in",
        "the",
        "jungle",
    ]
    assert [t["position"] for t in record["tokens"]] == list(range(1, len(body) + 1))
    assert all(0 < t["mean_attention"] < 1 for t in record["tokens"])
    figure = Image.open(output)
    assert figure.width == (1 + len(body)) * (128 + 4) + 4  # the image, then one panel per token

    labels = prompt_tokens(pipe.tokenizer, "a photo of a zebra")[1]  # words outside the vocabulary split up
    assert labels == ["a", "photo", "of", "a", "z", "e", "b", "r", "a"]


def test_inspect_maps_are_restored_and_deterministic(trained, tmp_path):
    from attndb_peft.inference import token_attention_maps

    pipe, info = load_pipeline(None, str(trained.output_dir))
    before = dict(pipe.unet.attn_processors)
    prompt = expand_prompt("a photo of a {}", info.token, info.category)
    first = token_attention_maps(pipe, prompt, steps=2)
    assert dict(pipe.unet.attn_processors) == before
    second = token_attention_maps(pipe, prompt, steps=2)
    assert first.maps.shape == (6, 8, 8)  # six tokens on the 8x8 latent grid of the 32-px model
    np.testing.assert_array_equal(first.maps, second.maps)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_inspect_and_generate_refuse_bad_input(tmp_path, tiny_model, capsys):
    args = ["--model", str(tiny_model), "--prompt", "a photo of a {}", "--steps", "1"]
    assert main(["inspect", *args, "--output", str(tmp_path / "x.png")]) == 2
    assert main(["inspect", "--model", str(tiny_model), "--prompt", "a", "--output", str(tmp_path / "x.jpg")]) == 2
    assert main(["generate", *args, "--output", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attndb")]
    assert "uses '{}' but no --adapter" in err[0] and ".png" in err[1] and "--adapter" in err[2]
    assert not (tmp_path / "out").exists()
