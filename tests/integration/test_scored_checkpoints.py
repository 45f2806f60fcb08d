# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Scored checkpoints and automatic selection through `attndb train` on the tiny SD and SDXL pipelines: every
checkpoint of the last stage is scored and recorded; `--select auto` writes the adapter of the checkpoint the rule
picks, the same files `attndb export --checkpoint` writes for it; a scoring model that cannot load stops the run
before it starts. The CLIP numbers themselves equal `attndb evaluate`'s functions on the same pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from attndb_peft import scoring
from attndb_peft.cli import main
from attndb_peft.config import AttnDBConfig
from attndb_peft.evaluate import ClipEmbedder, identity_similarity, load_reference_images, text_alignment
from attndb_peft.export import CONFIG_NAME, EMBEDDING_NAME, LORA_NAME, MODEL_CARD_NAME
from attndb_peft.testing import make_instance_images


def _args(model, images, out, *extra):
    return [
        "train", "--model", str(model), "--images", str(images), "--category", "dog", "--output", str(out),
        "--resolution", "32", "--batch-size", "2", "--steps", "1,1,3", "--learning-rates", "5e-2,1e-2,1e-2",
        "--save-dtype", "fp32", "--quiet", "--validation-prompts", "--checkpointing-steps", "1",
        "--score-checkpoints", "--score-images", "1", "--validation-inference-steps", "2", *extra,
    ]  # fmt: skip


def _adapter(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(out / name)) for name in (EMBEDDING_NAME, LORA_NAME)}


class _Scripted(scoring.CheckpointScorer):
    """A scorer whose scores follow a script, one entry per scored checkpoint in order, so the rule's choice is
    known in advance (step 2: within the margin of the best identity, with the highest text alignment)."""

    name = "scripted"
    script = [(0.0, 0.9), (0.6, 0.3), (0.7, 0.6), (0.7, 0.2)]  # (identity, text alignment) of steps 0-3

    def __init__(self):
        self.calls = 0

    def score(self, prompts, images, config):
        identity, alignment = self.script[self.calls]
        self.calls += 1
        return [{"identity": identity, "text_alignment": alignment} for _ in prompts]


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(scoring, "_FACTORIES", [lambda config, device: _Scripted()])


def test_select_auto_writes_the_chosen_checkpoint_and_records_every_score(scripted, tiny_model, instance_dir,
                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model, instance_dir, out, "--select", "auto", "--select-margin", "0.25")) == 0
    scores = json.loads((out / "scores" / "scores.json").read_text())
    assert [(r["stage"], r["step"]) for r in scores["checkpoints"]] == [(3, 0), (3, 1), (3, 2), (3, 3)]
    assert [(r["new"]["identity"], r["new"]["text_alignment"]) for r in scores["checkpoints"]] == _Scripted.script
    assert scores["selected"] == {"checkpoint": "stage3-step2", "rule": "auto", "margin": 0.25}
    for name in ("scores.md", "scores.png", "stage3-step0.png", "stage3-step3.png"):
        assert (out / "scores" / name).is_file(), name
    assert "stage3-step2 (selected)" in (out / "scores" / "scores.md").read_text()
    report = json.loads((out / CONFIG_NAME).read_text())["report"]["checkpoint_scores"]
    assert report["selected"] == "stage3-step2" and report["rule"] == "auto (margin 0.25)"
    assert [c["checkpoint"] for c in report["checkpoints"]] == [f"stage3-step{k}" for k in range(4)]
    card = (out / MODEL_CARD_NAME).read_text()
    assert "checkpoint **stage3-step2**" in card and "| stage3-step2 (selected) | 0.700 | 0.700 | 0.600 |" in card
    # the adapter is exactly what exporting that checkpoint writes, not the end of training
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "stage3-step2"), "--output", str(exported)]) == 0
    chosen, last = _adapter(out), _adapter(exported)
    assert all(torch.equal(chosen[f][k], last[f][k]) for f in chosen for k in chosen[f])
    # ... and the end of training is another adapter: step 3's weights differ from step 2's
    step2, step3 = (load_file(str(out / "checkpoints" / f"stage3-step{k}" / "weights.safetensors")) for k in (2, 3))
    assert any(not torch.equal(step2[k], step3[k]) for k in step3 if "lora" in k)


def test_scores_with_clip_equal_evaluate_on_the_same_pictures(tiny_model, instance_dir, tiny_clip, tmp_path):
    out = tmp_path / "clip"
    prompts = ["training: a photo of a {}", "a photo of a {} on the beach"]
    argv = _args(tiny_model, instance_dir, out, "--score-clip", str(tiny_clip), "--score-prompts", *prompts)
    assert main(argv) == 0
    scores = json.loads((out / "scores" / "scores.json").read_text())
    assert scores["how"]["scorer"] == "clip" and len(scores["checkpoints"]) == 4
    assert scores["how"]["prompts"] == [["training", "a photo of a {}"], ["new", "a photo of a {} on the beach"]]
    assert "selected" not in scores  # select last: the adapter is the end of training
    last = scores["checkpoints"][-1]
    assert last["training"]["identity"] == pytest.approx(last["prompts"][0]["identity"], abs=1e-6)
    assert last["new"]["text_alignment"] == pytest.approx(last["prompts"][1]["text_alignment"], abs=1e-6)
    assert all(-1 <= r[k] <= 1 for r in last["prompts"] for k in ("identity", "text_alignment"))

    # the scorer's numbers are attndb evaluate's, computed independently here on two pictures
    config = AttnDBConfig(model=str(tiny_model), images=str(instance_dir), category="dog", output=str(tmp_path / "o"),
                          score_clip=str(tiny_clip))
    scorer = scoring.ClipScorer(config, "cpu")
    pictures = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (32, 32), (20, 90, 200))]]
    got = scorer.score([("training", "a photo of a {}"), ("new", "a {} in the snow")], pictures, config)
    clip = ClipEmbedder(str(tiny_clip))
    references = clip.images(load_reference_images(instance_dir))
    texts = clip.texts(["a photo of a dog", "a dog in the snow"])
    for i, picture in enumerate(pictures):
        embedded = clip.images(picture)
        assert got[i]["identity"] == pytest.approx(identity_similarity(embedded, references), abs=1e-6)
        assert got[i]["text_alignment"] == pytest.approx(text_alignment(embedded, texts[i : i + 1]), abs=1e-6)


def test_a_scoring_model_that_cannot_load_stops_the_run_before_it_starts(tiny_model, instance_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "missing"
    assert main(_args(tiny_model, instance_dir, out, "--score-clip", str(tmp_path / "no-clip"))) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "--score-clip" in message[0] and "cannot load a CLIP model" in message[0]
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written


def test_select_auto_on_sdxl_restores_both_embeddings_and_the_lora(scripted, tiny_sdxl, tmp_path):
    images = tmp_path / "images"
    make_instance_images(images, num_images=2, size=48)
    out = tmp_path / "xl"
    argv = _args(tiny_sdxl, images, out, "--select", "auto", "--select-margin", "0.25", "--batch-size", "1",
                 "--gradient-accumulation-steps", "1")
    assert main(argv) == 0
    assert json.loads((out / CONFIG_NAME).read_text())["report"]["checkpoint_scores"]["selected"] == "stage3-step2"
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "stage3-step2"), "--output", str(exported)]) == 0
    chosen, expected = _adapter(out), _adapter(exported)
    assert set(chosen[EMBEDDING_NAME]) == {"clip_l", "clip_g"}
    assert all(torch.equal(chosen[f][k], expected[f][k]) for f in chosen for k in chosen[f])
