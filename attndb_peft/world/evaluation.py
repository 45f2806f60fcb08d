# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""How well the world's base model composes: generate captions it never saw and score the pixels.

`evaluate_personalization(base)` asks the other thing a base model is for: after a short attndb run on a world
concept, does a prompt with the concept still get its context?

`evaluate_base(pipe)` draws every held-out caption of `scenes.split_scenes` (and as many training captions, for
comparison) at the world's default sampler and reports, per caption set, the share of pictures whose context,
style, category and colour the scorers find right, with 95 % intervals, and where the category goes wrong
(`summarize_base`).
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import train
from . import scenes as W
from .model import load_world_pipeline, world_config, write_base
from .scorers import score_image, summarize

__all__ = [
    "WORLD_GUIDANCE",
    "WORLD_INFERENCE_STEPS",
    "evaluate_base",
    "evaluate_personalization",
    "generate",
    "summarize_base",
    "wilson_interval",
]

#: The world's default sampler: DDIM (trailing timesteps, from the model's scheduler), 25 steps, guidance 5.
WORLD_INFERENCE_STEPS = 25
WORLD_GUIDANCE = 5.0


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int = WORLD_INFERENCE_STEPS,
    guidance: float = WORLD_GUIDANCE,
    batch_size: int = 32,
) -> list[np.ndarray]:
    """One uint8 `[32, 32, 3]` picture per prompt; prompt `i` uses the generator seeded `seed + i`."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        generators = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images = pipe(
            chunk,
            height=W.SIZE,
            width=W.SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images
        out.extend(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share `successes / n` (95 % at the default `z`); (0, 1) when `n` is 0.

    With 90 pictures a share near 80 % is known to about +-8 points, so two base models that differ by a few
    points are not told apart by one evaluation.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize_base(records: list[dict], scenes: list[W.Scene]) -> dict:
    """Shares of `score_image` records (one per picture, `scenes[i]` the caption of `records[i]`) whose context,
    style, colour and category are right, each with its count and 95 % Wilson interval, and where the category
    goes wrong: per asked category and per style, how many are right and what the scorer read instead.

    Returns:
        `dict`: `{"images": n, "context": share, "context_n": n, ..., "category": share, "category_n": n,
        "intervals": {"context": [low, high], ...}, "category_by_asked": {...}, "category_by_style": {...}}`;
        a share is None when no picture asks for it (colour is asked only where the caption names one).
    """
    if len(records) != len(scenes):
        raise ValueError(f"{len(records)} records for {len(scenes)} scenes: expected one record per scene")
    result: dict = {"images": len(records)}
    intervals = {}
    # category right = `present`: an object of the caption's category was found
    checks = (("context", "context_ok"), ("style", "style_ok"), ("colour", "colour_ok"), ("category", "present"))
    for name, key in checks:
        values = [bool(r[key]) for r in records if r.get(key) is not None]
        result[name] = round(float(np.mean(values)), 4) if values else None
        result[f"{name}_n"] = len(values)
        intervals[name] = [round(v, 4) for v in wilson_interval(sum(values), len(values))] if values else None
    result["intervals"] = intervals
    # the category is what the base model fails at; where (which category, which style) and as what, so a run's
    # own evaluation says it without a separate script
    for field, of in (("category_by_asked", lambda s: s.category), ("category_by_style", lambda s: s.style)):
        groups: dict[str, list[dict]] = {}
        for r, s in zip(records, scenes):
            groups.setdefault(of(s), []).append(r)
        result[field] = {
            name: {
                "right": sum(bool(r["present"]) for r in group),
                "n": len(group),
                "read_as": dict(sorted(Counter(str(r["category"]) for r in group).items())),
            }
            for name, group in sorted(groups.items())
        }
    return result


def _score_set(pipe, scenes: list[W.Scene], seeds: tuple[int, ...], steps: int, guidance: float) -> dict:
    records = []
    prompts = [W.caption(s) for s in scenes]
    for seed in seeds:
        images = generate(pipe, prompts, seed=1000 * seed, steps=steps, guidance=guidance)
        records.extend(score_image(img, scene) for img, scene in zip(images, scenes))
    return summarize_base(records, scenes * len(seeds))


def evaluate_base(
    pipe,
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int = WORLD_INFERENCE_STEPS,
    guidance: float = WORLD_GUIDANCE,
    num_held_out: int = 30,
) -> dict:
    """Scores of the base model on held-out and (as many) training captions, `len(seeds)` pictures each."""
    train, held = W.split_scenes(num_held_out, seed=1)
    rng = np.random.default_rng(7)
    train_sample = [train[i] for i in rng.choice(len(train), size=len(held), replace=False)]
    return {
        "sampler": {"steps": steps, "guidance": guidance, "seeds": list(seeds)},
        "held_out": _score_set(pipe, held, seeds, steps, guidance),
        "train": _score_set(pipe, train_sample, seeds, steps, guidance),
    }


def evaluate_personalization(
    base,
    concept_seed: int = 11,
    steps: tuple[int, int, int] = (30, 40, 80),
    seeds: tuple[int, ...] = (0, 100, 200),
) -> dict:
    """Train attndb (the world recipe at `steps`) on concept `concept_seed` on the base model folder `base`, then
    draw the concept in every context (`a photo of a [V] <category> <context>`, one picture per seed) and score it.

    Returns:
        `dict`: `scorers.summarize` of the pictures (context_ok, present, identity, ...), `len(CONTEXTS) * len(seeds)`.
    """
    concept = W.make_concept(concept_seed)
    with tempfile.TemporaryDirectory(prefix="attndb-personalization-") as tmp:
        tmp = Path(tmp)
        folder = write_base(tmp / "base", source=base)
        W.concept_folder(concept_seed, tmp / "photos")
        config = world_config(
            model=str(folder), images=str(tmp / "photos"), category=concept.category, output=str(tmp / "out"),
            validation_prompts=(),
        ).with_stage_values(steps=steps)
        train(config)
        pipe = load_world_pipeline(folder)
        token = pipe.load_attndb(str(tmp / "out"))
        scenes = [W.Scene(concept.category, None, ctx) for ctx in W.CONTEXTS]
        prompts = [W.caption(s, token) for s in scenes]
        images = [img for seed in seeds for img in generate(pipe, prompts, seed=seed)]
    return summarize([score_image(img, s, concept) for img, s in zip(images, scenes * len(seeds))])
