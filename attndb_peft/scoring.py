# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Scored checkpoints and automatic selection (`score_checkpoints`, `select`).

While the last stage that trains runs (stage 3 in the method), each of its checkpoints (its start, every
`checkpointing_steps` and its end) draws a small fixed prompt set at fixed seeds with the models being trained and
scores the pictures: **identity** against the instance photos and **text alignment** against the prompt with the
token removed. The scores go to `OUT/scores/` (`scores.json`, `scores.md`, `scores.png`: identity against text
alignment, one point per checkpoint, the training prompt and the new prompts apart; a grid per checkpoint) and to
the trackers. With `select="auto"`, `select_checkpoint`'s rule picks the checkpoint the adapter is written from;
every checkpoint's scores and the choice are recorded in `attndb_config.json` and the model card.

Who scores: a `CheckpointScorer`. The default, `ClipScorer`, uses `attndb evaluate`'s metrics (CLIP-I, CLIP-T
without the token, optional DINO). Other scorers register a factory under the entry-point group
`attndb_peft.scorers` (or with `register_scorer`); a factory returns a scorer for the runs it knows and None for
the rest. The toy world registers one this way (`attndb_peft.world.scoring`), so a run on a world concept is scored
by the world's exact pixel scorers without the core importing the world.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoints as ckpt
from .config import AttnDBConfig
from .errors import UsageError, first_line
from .evaluate import (
    ClipEmbedder,
    DinoEmbedder,
    identity_similarity,
    load_reference_images,
    split_group,
    text_alignment,
)
from .inference import expand_prompt, generate_images
from .visualize import curve_plot, image_grid

__all__ = [
    "DEFAULT_SCORE_PROMPTS",
    "ENTRY_POINT_GROUP",
    "SCORES_DIR",
    "SCORES_FILE",
    "TRAINING_GROUP",
    "CheckpointScorer",
    "ClipScorer",
    "ScoreBook",
    "find_scorer",
    "register_scorer",
    "score_prompts",
    "scored_stage",
    "select_checkpoint",
]

logger = logging.getLogger(__name__)

SCORES_DIR = "scores"
SCORES_FILE = "scores.json"
#: Entry-point group of scorer factories: `factory(config, device) -> CheckpointScorer | None`.
ENTRY_POINT_GROUP = "attndb_peft.scorers"
#: The group of the training prompt; every other group counts as new prompts.
TRAINING_GROUP = "training"
#: The default score prompts as (group, prompt): the training prompt, two new contexts, a style, an attribute.
DEFAULT_SCORE_PROMPTS: tuple[tuple[str, str], ...] = (
    (TRAINING_GROUP, "a photo of a {}"),
    ("context", "a photo of a {} on the beach"),
    ("context", "a photo of a {} in the snow"),
    ("style", "a watercolor painting of a {}"),
    ("attribute", "a photo of a red {}"),
)
#: The two axes every scorer reports per prompt (in [0, 1] or cosine similarities); the rule selects on them.
AXES = ("identity", "text_alignment")


class CheckpointScorer:
    """Scores the pictures of one checkpoint. Subclasses set `name` and implement `score`.

    The scorer is built once before training (load its models then, so a missing one stops the run before it
    starts) on the training device, and `close`d after the run.
    """

    name = "base"
    #: What each axis measures, for the table, the plot and the card.
    descriptions = {"identity": "identity", "text_alignment": "text alignment"}

    def default_prompts(self, config: AttnDBConfig) -> list[tuple[str, str]]:
        """The prompt set used when `score_prompts` is empty, as `(group, prompt)` pairs (`{}` = the concept)."""
        return list(DEFAULT_SCORE_PROMPTS)

    def score(self, prompts: Sequence[tuple[str, str]], images: Sequence[Sequence], config: AttnDBConfig) -> list:
        """One dict per prompt with at least `identity` and `text_alignment` (floats, or None where the prompt
        cannot be scored for one); `images[i]` are prompt `i`'s PIL pictures."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the scoring models."""


class ClipScorer(CheckpointScorer):
    """`attndb evaluate`'s metrics: identity is the mean CLIP image-image cosine similarity to the instance photos,
    text alignment the CLIP image-text similarity to the prompt without the token; with `score_dino`, also
    `dino_identity`.

    Raises:
        UsageError: the CLIP (or DINO) model cannot be loaded, naming the setting.
    """

    name = "clip"
    descriptions = {"identity": "identity (CLIP-I)", "text_alignment": "text alignment (CLIP-T, token removed)"}

    def __init__(self, config: AttnDBConfig, device: torch.device | str) -> None:
        device = str(device)
        self.clip = ClipEmbedder(config.score_clip, device, setting="score_clip")
        self.dino = DinoEmbedder(config.score_dino, device, setting="score_dino") if config.score_dino else None
        references = load_reference_images(config.images)
        self.references = self.clip.images(references)
        self.dino_references = self.dino.images(references) if self.dino else None

    def score(self, prompts, images, config):
        texts = self.clip.texts([expand_prompt(p, None, config.category) for _, p in prompts])
        out = []
        for i, pictures in enumerate(images):
            embedded = self.clip.images(list(pictures))
            record = {
                "identity": identity_similarity(embedded, self.references),
                "text_alignment": text_alignment(embedded, texts[i : i + 1].expand(len(pictures), -1)),
            }
            if self.dino is not None:
                record["dino_identity"] = identity_similarity(self.dino.images(list(pictures)), self.dino_references)
            out.append(record)
        return out

    def close(self) -> None:
        self.clip = self.dino = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_FACTORIES: list[Callable[[AttnDBConfig, torch.device], CheckpointScorer | None]] = []


def register_scorer(factory: Callable[[AttnDBConfig, torch.device], CheckpointScorer | None]) -> None:
    """Add a scorer factory, asked before the entry points' and the CLIP default."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)


def find_scorer(config: AttnDBConfig, device: torch.device | str) -> CheckpointScorer:
    """The scorer of the run: the first registered or entry-point factory that returns one, else `ClipScorer`.

    Raises:
        UsageError: a scoring model cannot be loaded (one line naming the setting), or a factory failed.
    """
    factories = list(_FACTORIES)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            factories.append(point.load())
        except Exception as exc:  # a broken plugin names itself instead of a traceback
            raise UsageError(f"scorer plugin {point.name} ({point.value}) cannot be loaded: {first_line(exc)}.") \
                from None
    for factory in factories:
        scorer = factory(config, device)
        if scorer is not None:
            return scorer
    return ClipScorer(config, device)


def score_prompts(config: AttnDBConfig, scorer: CheckpointScorer) -> list[tuple[str, str]]:
    """The run's score prompts as `(group, prompt)`: `score_prompts` (`group: prompt` lines) or the scorer's set."""
    if not config.score_prompts:
        return scorer.default_prompts(config)
    return [split_group(p, default="new") for p in config.score_prompts]


def scored_stage(config: AttnDBConfig) -> int:
    """The stage whose checkpoints are scored: the last one that trains (3 for the method, 1 for Textual
    Inversion)."""
    return max((i for i, s in enumerate(config.stages, 1) if s.steps > 0), default=3)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(float(np.mean(values)), 6) if values else None


def _summary(per_prompt: list[dict], groups: list[str]) -> dict:
    """Means of every score over the training prompt, over the new prompts, and per group."""
    keys = list(dict.fromkeys(k for r in per_prompt for k in r))

    def means(rows: list[dict]) -> dict:
        return {k: _mean([r.get(k) for r in rows]) for k in keys} if rows else {}

    training = [r for r, g in zip(per_prompt, groups) if g == TRAINING_GROUP]
    new = [r for r, g in zip(per_prompt, groups) if g != TRAINING_GROUP]
    by_group = {g: means([r for r, h in zip(per_prompt, groups) if h == g]) for g in dict.fromkeys(groups)}
    return {"training": means(training), "new": means(new), "groups": by_group}


def select_checkpoint(records: Sequence[dict], margin: float) -> dict | None:
    """The documented selection rule: among the scored checkpoints after the stage's start (step > 0), those
    whose new-prompt identity is within `margin` x (highest - lowest) of the highest; of them, the one with the
    highest new-prompt text alignment (ties: the higher identity, then the later step). A run whose prompts are
    all training prompts is judged on those. Returns None when no checkpoint has both scores.

    Why this shape: more training tends to raise identity and can lower text alignment (the concept takes over
    the prompt); the rule keeps nearly the most identity the run reached and, within that, the picture that follows the
    prompt best. The margin is a share of the run's own spread, so it means the same for CLIP cosines and for
    the world's shares."""

    def axes(r: dict) -> tuple:
        part = r["new"] if r["new"].get("identity") is not None else r["training"]
        return part.get("identity"), part.get("text_alignment")

    candidates = [r for r in records if r["step"] > 0 and None not in axes(r)]
    if not candidates:
        return None
    identities = [axes(r)[0] for r in candidates]
    floor = max(identities) - margin * (max(identities) - min(identities)) - 1e-12
    eligible = [r for r in candidates if axes(r)[0] >= floor]
    return max(eligible, key=lambda r: (axes(r)[1], axes(r)[0], r["step"]))


@dataclasses.dataclass
class ScoreBook:
    """The scores of one run, kept in `OUT/scores/` (rewritten after every checkpoint, so a resumed run continues
    it): one record per scored checkpoint."""

    folder: Path
    scorer: CheckpointScorer
    prompts: list[tuple[str, str]]
    images: int
    records: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # time spent scoring (drawing and scoring), this process
    fresh: bool = True  # a new run: what an earlier run left in the folder goes at the first write

    @classmethod
    def open(cls, config: AttnDBConfig, scorer: CheckpointScorer, resume_at: tuple[int, int] | None) -> ScoreBook:
        """The run's book; resuming at `(stage, step)`, the records up to it are kept when they were scored the
        same way (scorer, prompts, images), and the book starts over otherwise."""
        book = cls(Path(config.output) / SCORES_DIR, scorer, score_prompts(config, scorer), config.score_images)
        path = book.folder / SCORES_FILE
        if resume_at is not None and path.is_file():
            old = ckpt.read_json(path)
            if old.get("how") == book.how:
                book.records = [r for r in old["checkpoints"] if (r["stage"], r["step"]) <= tuple(resume_at)]
                book.seconds, book.fresh = float(old.get("seconds", 0.0)), False
            else:
                logger.warning("%s was scored another way (scorer, prompts or images changed): scoring starts over.",
                               path)
        return book

    @property
    def axes(self) -> dict[str, str]:
        """What the two axes measure, as the scorer describes them."""
        return {a: self.scorer.descriptions[a] for a in AXES}

    @property
    def how(self) -> dict:
        return {"scorer": self.scorer.name, "prompts": [list(p) for p in self.prompts], "images": self.images}

    def score(self, pipe, config: AttnDBConfig, stage: int, step: int, settings: dict) -> dict:
        """Draw the prompts with `pipe` (`generate_images` with `settings`, `self.images` seeds), score, record,
        write the files; returns the record."""
        started = time.perf_counter()
        full = [expand_prompt(p, config.token, config.category) for _, p in self.prompts]
        images = [generate_images(pipe, prompt, self.images, **settings) for prompt in full]
        per_prompt = self.scorer.score(self.prompts, images, config)
        groups = [g for g, _ in self.prompts]
        seconds = time.perf_counter() - started
        self.seconds += seconds
        record = {
            "stage": stage,
            "step": step,
            "checkpoint": ckpt.checkpoint_name(stage, step),
            **_summary(per_prompt, groups),
            "prompts": [{"group": g, "prompt": p, **r} for (g, p), r in zip(self.prompts, per_prompt)],
            "seconds": round(seconds, 3),
        }
        self.records = [r for r in self.records if (r["stage"], r["step"]) != (stage, step)] + [record]
        labels = [
            f"[{g}] {prompt}  " + ", ".join(f"{k} {r[k]:.3f}" for k in AXES if r.get(k) is not None)
            for (g, _), prompt, r in zip(self.prompts, full, per_prompt)
        ]
        title = f"stage {stage} step {step}: " + self.line(record)
        self.write()
        image_grid(images, row_labels=labels, title=title).save(self.folder / f"stage{stage}-step{step}.png")
        return record

    @staticmethod
    def line(record: dict) -> str:
        """`identity 0.61 / 0.42, text alignment 0.27 / 0.30 (training prompt / new prompts)`."""
        parts = []
        for axis in AXES:
            values = [record[part].get(axis) for part in ("training", "new")]
            parts.append(f"{axis.replace('_', ' ')} " + " / ".join("-" if v is None else f"{v:.3f}" for v in values))
        return ", ".join(parts) + " (training prompt / new prompts)"

    def tracker_values(self, record: dict) -> dict[str, float]:
        """The record's scores for `Accelerator.log`, e.g. `score/new/identity`."""
        return {
            f"score/{part}/{k}": v for part in ("training", "new") for k, v in record[part].items() if v is not None
        }

    def write(self, selected: dict | None = None, margin: float | None = None) -> None:
        """`scores.json`, `scores.md` and `scores.png` (with the selected checkpoint marked, when given)."""
        if self.fresh:  # by now the output folder's checks (overwrite) have passed
            shutil.rmtree(self.folder, ignore_errors=True)
            self.fresh = False
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            "how": self.how,
            "axes": self.axes,
            "seconds": round(self.seconds, 3),
            "checkpoints": self.records,
        }
        if selected is not None:
            data["selected"] = {"checkpoint": selected["checkpoint"], "rule": "auto", "margin": margin}
        ckpt.write_json_atomic(self.folder / SCORES_FILE, data)
        (self.folder / "scores.md").write_text(self.table(selected), encoding="utf-8")
        series = []
        for part, label in (("training", "training prompt"), ("new", "new prompts")):
            points = [(r[part].get("text_alignment"), r[part].get("identity"), str(r["step"])) for r in self.records]
            points = [p for p in points if None not in p[:2]]
            if points:
                series.append((label, points))
        if series:
            marked = None
            if selected is not None and selected["new"].get("identity") is not None:
                marked = (selected["new"]["text_alignment"], selected["new"]["identity"])
            curve_plot(
                series, self.folder / "scores.png", x_label=self.scorer.descriptions["text_alignment"],
                y_label=self.scorer.descriptions["identity"],
                title=f"scored checkpoints of stage {self.records[0]['stage']} (labels: step)", marked=marked,
            )

    def table(self, selected: dict | None = None) -> str:
        """The markdown table of every record: step, both axes for the training prompt and the new prompts."""
        head = "| checkpoint | identity, training prompt | identity, new | text alignment, training | " \
               "text alignment, new | seconds |\n|---|---|---|---|---|---|\n"

        def cell(value):
            return "-" if value is None else f"{value:.4f}"

        rows = []
        for r in self.records:
            mark = " (selected)" if selected is not None and r["checkpoint"] == selected["checkpoint"] else ""
            values = [r[part].get(axis) for axis in AXES for part in ("training", "new")]
            rows.append(f"| {r['checkpoint']}{mark} | " + " | ".join(map(cell, values)) + f" | {r['seconds']:.1f} |")
        axes = "; ".join(f"{a}: {d}" for a, d in self.scorer.descriptions.items())
        return f"Scorer `{self.scorer.name}` ({axes}); {self.images} image(s) per prompt.\n\n" + head + \
            "\n".join(rows) + "\n"

    def report(self, selected: dict | None, margin: float | None) -> dict[str, Any]:
        """What `attndb_config.json` and the model card record: every checkpoint's summary and the choice."""
        return {
            "checkpoint_scores": {
                "scorer": self.scorer.name,
                "axes": self.axes,
                "images_per_prompt": self.images,
                "prompts": [list(p) for p in self.prompts],
                "seconds": round(self.seconds, 1),
                "checkpoints": [
                    {"checkpoint": r["checkpoint"], "training": r["training"], "new": r["new"]} for r in self.records
                ],
                "selected": None if selected is None else selected["checkpoint"],
                "rule": None if selected is None else f"auto (margin {margin:g})",
            }
        }
