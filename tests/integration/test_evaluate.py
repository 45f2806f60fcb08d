# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb evaluate`: the metrics equal an independent computation with the same tiny random CLIP / DINO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attndb_peft.cli import main
from attndb_peft.evaluate import (
    EVALUATION_PROMPTS,
    ClipEmbedder,
    DinoEmbedder,
    evaluate_concept,
    evaluation_prompts,
    identity_similarity,
    load_reference_images,
    read_prompts_file,
    text_alignment,
)
from attndb_peft.inference import AdapterInfo, UsageError


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A random ViT with an image processor, standing in for facebook/dino-vits16."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-dino")
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_embeddings(clip_path, dino_path, generated, references, texts):
    """Embeddings through transformers' own public API (get_image_features / get_text_features, the processor
    called as a whole, DINO's CLS token), not through attndb_peft's embedder."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_path), CLIPProcessor.from_pretrained(clip_path)

    def features(out):
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()  # transformers 4 / 5

    with torch.no_grad():
        gen = features(model.get_image_features(**processor(images=generated, return_tensors="pt")))
        ref = features(model.get_image_features(**processor(images=references, return_tensors="pt")))
        txt = features(model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt")))
        dino, dino_processor = AutoModel.from_pretrained(dino_path), AutoImageProcessor.from_pretrained(dino_path)
        dino_gen = dino(**dino_processor(images=generated, return_tensors="pt")).last_hidden_state[:, 0].numpy()
        dino_ref = dino(**dino_processor(images=references, return_tensors="pt")).last_hidden_state[:, 0].numpy()
    return gen, ref, txt, dino_gen, dino_ref


def test_builtin_prompt_set_covers_the_four_edit_types():
    prompts = evaluation_prompts()
    assert len(prompts) == 24
    assert set(EVALUATION_PROMPTS) == {"background", "interaction", "color", "style"}
    assert all(len(group) >= 5 for group in EVALUATION_PROMPTS.values())
    assert all(p.count("{}") == 1 for _, p in prompts)
    assert len({p for _, p in prompts}) == 24


def test_read_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\nstyle: a pencil sketch of a {}\na {} on the moon\nnote: see {} here\n")
    assert read_prompts_file(path) == [
        ("style", "a pencil sketch of a {}"),
        ("custom", "a {} on the moon"),
        ("note", "see {} here"),
    ]
    with pytest.raises(UsageError, match="no such file"):
        read_prompts_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UsageError, match="no prompts"):
        read_prompts_file(tmp_path / "empty.txt")


def test_similarities_are_mean_normalized_dot_products():
    rng = np.random.default_rng(0)
    a, b, t = rng.normal(size=(5, 8)), rng.normal(size=(3, 8)) * 7, rng.normal(size=(5, 8))
    assert identity_similarity(torch.tensor(a), torch.tensor(b)) == pytest.approx(
        (_unit(a) @ _unit(b).T).mean(), abs=1e-6
    )
    assert text_alignment(torch.tensor(a), torch.tensor(t)) == pytest.approx(
        (_unit(a) * _unit(t)).sum(-1).mean(), abs=1e-6
    )


def test_embedders_refuse_missing_models_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="`clip`") as info:
        ClipEmbedder(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="`dino`"):
        DinoEmbedder(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="`images`"):  # data.py's message; `attndb evaluate` shows --images
        load_reference_images(tmp_path / "no-images")


def test_evaluate_numbers_equal_an_independent_computation(trained, instance_dir, tiny_clip, tiny_dino, tmp_path):
    pipe = trained.pipeline()
    pipe.set_progress_bar_config(disable=True)
    info = AdapterInfo(source="in-memory", token="<attndb-dog>", category="dog")
    prompts = [("background", "a photo of a {} in the jungle"), ("style", "a watercolor painting of a {}")]
    references = load_reference_images(instance_dir)
    result = evaluate_concept(
        pipe,
        info,
        references,
        tmp_path,
        ClipEmbedder(str(tiny_clip)),
        DinoEmbedder(str(tiny_dino)),
        prompts=prompts,
        num_images=2,
        steps=2,
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["identity"] == pytest.approx(result["identity"])
    assert (tmp_path / "grid.png").is_file()
    assert [r["generated_with"] for r in saved["prompts"]] == [
        "a photo of a <attndb-dog> dog in the jungle",
        "a watercolor painting of a <attndb-dog> dog",
    ]
    texts = [r["scored_against"] for r in saved["prompts"]]
    assert texts == ["a photo of a dog in the jungle", "a watercolor painting of a dog"]  # the prompt without [V]

    generated = [Image.open(tmp_path / f).convert("RGB") for r in saved["prompts"] for f in r["files"]]
    gen, ref, txt, dino_gen, dino_ref = _reference_embeddings(tiny_clip, tiny_dino, generated, references, texts)
    identity = (_unit(gen) @ _unit(ref).T).mean()
    per_image_text = np.repeat(_unit(txt), 2, axis=0)
    alignment = (_unit(gen) * per_image_text).sum(-1).mean()
    dino = (_unit(dino_gen) @ _unit(dino_ref).T).mean()
    assert saved["identity"] == pytest.approx(identity, abs=1e-5)
    assert saved["text_alignment"] == pytest.approx(alignment, abs=1e-5)
    assert saved["dino_identity"] == pytest.approx(dino, abs=1e-5)
    for p, record in enumerate(saved["prompts"]):
        rows = slice(2 * p, 2 * p + 2)
        assert record["identity"] == pytest.approx((_unit(gen[rows]) @ _unit(ref).T).mean(), abs=1e-5)
        assert record["text_alignment"] == pytest.approx((_unit(gen[rows]) @ _unit(txt[p])).mean(), abs=1e-5)
    assert saved["groups"]["style"]["identity"] == pytest.approx(saved["prompts"][1]["identity"])


def test_evaluate_command_writes_metrics_grid_and_images(trained, instance_dir, tiny_clip, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("color: a photo of a purple {}\na {} in the snow\n")
    out = tmp_path / "eval"
    argv = ["evaluate", "--adapter", str(trained.output_dir), "--images", str(instance_dir), "--clip", str(tiny_clip)]
    assert main([*argv, "--prompts", str(prompts), "--num-images", "2", "--steps", "2", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"color", "custom"} and "dino_identity" not in metrics
    assert -1 <= metrics["identity"] <= 1 and -1 <= metrics["text_alignment"] <= 1
    assert metrics["adapter"] == str(trained.output_dir) and metrics["clip"] == str(tiny_clip)
    assert [r["scored_against"] for r in metrics["prompts"]] == ["a photo of a purple dog", "a dog in the snow"]
    assert len(list((out / "images").glob("*.png"))) == 4 and (out / "grid.png").is_file()
    # the numbers are those of evaluate_concept's own embeddings of the saved images
    clip = ClipEmbedder(str(tiny_clip))
    generated = [Image.open(out / f).convert("RGB") for r in metrics["prompts"] for f in r["files"]]
    expected = identity_similarity(clip.images(generated), clip.images(load_reference_images(instance_dir)))
    assert metrics["identity"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_loads_the_model_without_its_safety_checker(tmp_path):
    # SD 1.x ships a safety checker: a false positive returns a black picture, which must not enter the metrics
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from attndb_peft.inference import load_pipeline
    from attndb_peft.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    tiny = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=32)
    )
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(tmp_path / "sd1-like")
    kept, _ = load_pipeline(str(tmp_path / "sd1-like"), device="cpu")
    assert isinstance(kept.safety_checker, StableDiffusionSafetyChecker)  # generate keeps the model's own
    half, _ = load_pipeline(str(tmp_path / "sd1-like"), device="cpu", dtype="fp16")
    assert half.safety_checker.dtype == half.unet.dtype == torch.float16  # it checks the fp16 pictures as they are
    dropped, _ = load_pipeline(str(tmp_path / "sd1-like"), device="cpu", safety_checker=False)
    assert dropped.safety_checker is None
