# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The trainer's side of scored checkpoints (`score_checkpoints`, `select`): when to score, logging the scores,
the choice at the end. What a score is, the book of scores and the rule live in `attndb_peft.scoring`."""

from __future__ import annotations

import logging

from ..config import AttnDBConfig
from ..reporting import SampleSource, global_step, sample_settings, sampling_pipeline
from ..scoring import ScoreBook, find_scorer, scored_stage, select_checkpoint

__all__ = ["ScoredCheckpoints"]

logger = logging.getLogger(__name__)


class ScoredCheckpoints:
    """A run's checkpoint scores. Only the main process scores (`book` is None elsewhere, and with
    `score_checkpoints` off); every process calls the methods, which keep the processes in step.

    Args:
        config (`AttnDBConfig`): the run's settings.
        accelerator: the run's `Accelerator` (trackers, the barrier).
        book (`ScoreBook`, *optional*): the scores, on the main process of a scored run.
    """

    def __init__(self, config: AttnDBConfig, accelerator, book: ScoreBook | None = None) -> None:
        self.config, self.accelerator, self.book = config, accelerator, book
        self.stage = scored_stage(config)

    @classmethod
    def start(cls, config: AttnDBConfig, accelerator, device, resume_at: tuple[int, int] | None):
        """Load the scorer now (a scoring model that cannot load stops the run before anything is written) and
        open the book, continuing it when resuming at `(stage, step)`."""
        book = None
        if config.score_checkpoints and accelerator.is_main_process:
            book = ScoreBook.open(config, find_scorer(config, device), resume_at)
        return cls(config, accelerator, book)

    def covers(self, stage: int) -> bool:
        """Whether `stage`'s checkpoints are scored."""
        return self.config.score_checkpoints and stage == self.stage

    def score(self, source: SampleSource, stage: int, step: int) -> None:
        """Draw and score the score prompts with the models as they are at `step`, log the scores."""
        if self.book is not None:
            with sampling_pipeline(source) as pipe:
                record = self.book.score(pipe, self.config, stage, step, sample_settings(self.config))
            logger.info("Scores of stage %d step %d: %s", stage, step, ScoreBook.line(record))
            self.accelerator.log(self.book.tracker_values(record), step=global_step(self.config, stage, step))
        self.accelerator.wait_for_everyone()

    def choose(self) -> dict | None:
        """With `select` auto, the record of the checkpoint `scoring.select_checkpoint` picks (main process)."""
        if self.book is None or self.config.select != "auto":
            return None
        chosen = select_checkpoint(self.book.records, self.config.select_margin)
        if chosen is not None:
            logger.info("Selected %s (select auto, margin %g): %s", chosen["checkpoint"], self.config.select_margin,
                        ScoreBook.line(chosen))
        return chosen

    def is_last(self, record: dict) -> bool:
        """Whether `record` is the end of training (the models already hold it)."""
        return (record["stage"], record["step"]) == (self.stage, self.config.stages[self.stage - 1].steps)

    def finish(self, chosen: dict | None) -> dict:
        """Write the book with the choice, release the scorer; returns what the export records."""
        if self.book is None:
            return {}
        margin = self.config.select_margin if chosen is not None else None
        self.book.write(chosen, margin)
        self.book.scorer.close()
        return self.book.report(chosen, margin)
