# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The world's checkpoint scorer: found through its entry point for a world concept's folder only, and right on
the world's own ground truth."""

from __future__ import annotations

import numpy as np
from PIL import Image

from attndb_peft.config import AttnDBConfig
from attndb_peft.scoring import find_scorer
from attndb_peft.world import scenes as W
from attndb_peft.world.scorers import parse_caption
from attndb_peft.world.scoring import WorldScorer, world_scorer


def _config(folder, **values) -> AttnDBConfig:
    return AttnDBConfig(**{"model": "m", "images": str(folder), "category": "ball", "output": str(folder / "out"),
                           **values})


def test_the_world_scorer_is_found_for_a_world_concept_only(tmp_path):
    W.concept_folder(3, tmp_path / "photos")
    world = find_scorer(_config(tmp_path / "photos", score_checkpoints=True), "cpu")  # through the entry point
    assert isinstance(world, WorldScorer) and world.concept == W.make_concept(3)
    (tmp_path / "plain").mkdir()
    assert world_scorer(_config(tmp_path / "plain"), "cpu") is None
    (tmp_path / "plain" / W.CONCEPT_FILE).write_text("{not json", encoding="utf-8")
    assert world_scorer(_config(tmp_path / "plain"), "cpu") is None


def test_the_world_scorer_scores_ground_truth_right(tmp_path):
    concept = W.make_concept(3)
    config = _config(tmp_path, category=concept.category, token="<v>")
    scorer = WorldScorer(concept)
    rng = np.random.default_rng(0)
    prompts = scorer.default_prompts(config)
    images = []
    for _, prompt in prompts:
        scene, _ = parse_caption(prompt.replace("{}", f"<v> {concept.category}"), "<v>")
        images.append([Image.fromarray(W.render(scene, rng, concept=concept)[0]) for _ in range(3)])
    scores = scorer.score(prompts, images, config)
    for (_, prompt), s in zip(prompts, scores):
        assert s["presence"] == 1.0 and s["text_alignment"] == 1.0, prompt
        assert s["identity"] >= 2 / 3, prompt  # the concept beats the distractors on its own renders
    # the category's plain object on the training prompt: the prompt is followed, the concept is not there
    scene, _ = parse_caption(f"a photo of a {concept.category}")
    plain = [[Image.fromarray(W.render(scene, rng)[0]) for _ in range(3)]]
    assert scorer.score(prompts[:1], plain, config)[0]["identity"] == 0.0
