# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The world's checkpoint scorer: a training run on a world concept (`attndb world concept`'s folder, with its
`concept.json`) scores its checkpoints with the world's exact pixel scorers instead of CLIP.

Registered as the `world` entry point of `attndb_peft.scorers` (pyproject.toml), so `attndb_peft.scoring` finds it
without the core importing the world. Per score prompt:

- `identity`: the share of pictures in which the concept beats every distractor concept of its category
  (`scorers.score_image`'s `identity_ok`, the validated identity measure; chance is about 11 %);
- `text_alignment`: per picture, the share of what the caption asks that it shows (style, context and colour
  where named, and an object of the category at all), averaged;
- also `context` and `presence` (shares) and `identity_score` (1 - the concept's pattern distance, mean).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..scoring import TRAINING_GROUP, CheckpointScorer
from .scenes import CONCEPT_FILE, Concept, make_concept, picture_array
from .scorers import parse_caption, score_image

__all__ = ["WORLD_SCORE_PROMPTS", "WorldScorer", "world_scorer"]

#: The world's score prompts (world captions; `{}` = `[V] category`): the training prompt, two contexts, a style,
#: a colour. World evaluations (`benchmarks/world_quality.py`) draw their own prompt set at other seeds.
WORLD_SCORE_PROMPTS: tuple[tuple[str, str], ...] = (
    (TRAINING_GROUP, "a photo of a {}"),
    ("context", "a photo of a {} on the beach"),
    ("context", "a photo of a {} in the snow"),
    ("style", "a painting of a {}"),
    ("colour", "a photo of a red {}"),
)
_ASKED = ("style_ok", "context_ok", "colour_ok", "present")


class WorldScorer(CheckpointScorer):
    """Scores world pictures of `concept` (module docstring)."""

    name = "world"
    descriptions = {
        "identity": "identity (share beating the distractors)",
        "text_alignment": "text alignment (share of style, context, colour, object right)",
    }

    def __init__(self, concept: Concept) -> None:
        self.concept = concept

    def default_prompts(self, config):
        return list(WORLD_SCORE_PROMPTS)

    def score(self, prompts, images, config):
        out = []
        for (_, prompt), pictures in zip(prompts, images):
            scene, _ = parse_caption(prompt.replace("{}", f"{config.token} {config.category}"), config.token)
            records = [score_image(picture_array(p), scene, self.concept) for p in pictures]

            def share(key: str, rows=records) -> float | None:
                values = [float(r[key]) for r in rows if r.get(key) is not None]
                return float(np.mean(values)) if values else None

            asked = [np.mean([float(r[k]) for k in _ASKED if r.get(k) is not None]) for r in records]
            out.append({
                "identity": share("identity_ok"),
                "text_alignment": float(np.mean(asked)),
                "context": share("context_ok"),
                "presence": share("present"),
                "identity_score": share("identity"),
            })
        return out


def world_scorer(config, device) -> WorldScorer | None:
    """The `attndb_peft.scorers` factory: a `WorldScorer` when the run's images are a world concept's folder (a
    readable `concept.json` of a valid concept), else None."""
    path = Path(config.images) / CONCEPT_FILE
    if not path.is_file():
        return None
    try:
        concept = Concept.from_dict(json.loads(path.read_text(encoding="utf-8")))
        make_concept(concept.seed)
    except (ValueError, KeyError, TypeError):
        return None
    return WorldScorer(concept)
