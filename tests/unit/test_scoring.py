# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The selection rule against a brute-force reading of its documentation, the score book's resume and the
settings' checks."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from attndb_peft import scoring
from attndb_peft.config import AttnDBConfig, ConfigError
from attndb_peft.scoring import ScoreBook, scored_stage, select_checkpoint


def _config(tmp_path, **values) -> AttnDBConfig:
    return AttnDBConfig(**{"model": "m", "images": str(tmp_path), "category": "ball", "output": str(tmp_path / "out"),
                           **values})


def _record(step, identity, alignment, stage=3, training=(None, None)):
    return {
        "stage": stage, "step": step, "checkpoint": f"stage{stage}-step{step}",
        "training": {"identity": training[0], "text_alignment": training[1]},
        "new": {"identity": identity, "text_alignment": alignment}, "seconds": 1.0,
    }  # fmt: skip


def _brute_force(records, margin):
    """The rule as its docstring says it, step by step, over every candidate pair."""
    candidates = [r for r in records if r["step"] > 0]
    best = max(r["new"]["identity"] for r in candidates)
    worst = min(r["new"]["identity"] for r in candidates)
    eligible = [r for r in candidates if best - r["new"]["identity"] <= margin * (best - worst) + 1e-12]
    for r in eligible:  # r wins against every other eligible one
        if all(
            (r["new"]["text_alignment"], r["new"]["identity"], r["step"])
            >= (o["new"]["text_alignment"], o["new"]["identity"], o["step"])
            for o in eligible
        ):
            return r
    raise AssertionError("no winner")


def test_selection_follows_its_documented_rule():
    rng = random.Random(0)
    for _, margin in itertools.product(range(200), (0.0, 0.1, 0.25, 0.5, 1.0)):
        records = [_record(0, rng.random(), rng.random())]
        records += [_record(k, round(rng.random(), 2), round(rng.random(), 2)) for k in range(1, rng.randint(2, 7))]
        assert select_checkpoint(records, margin) is _brute_force(records, margin)


def test_selection_cases_by_hand():
    records = [_record(0, 0.0, 0.9), _record(10, 0.5, 0.8), _record(20, 0.9, 0.5), _record(30, 1.0, 0.2)]
    assert select_checkpoint(records, 0.0)["step"] == 30  # the best identity only
    assert select_checkpoint(records, 0.25)["step"] == 20  # within 0.125 of 1.0: steps 20, 30
    assert select_checkpoint(records, 1.0)["step"] == 10  # any trained checkpoint; step 0 is never chosen
    # all prompts training prompts: judged on those; nothing scored: no choice
    only_training = [_record(k, None, None, training=(v, 1 - v)) for k, v in ((1, 0.2), (2, 0.8))]
    assert select_checkpoint(only_training, 0.0)["step"] == 2
    assert select_checkpoint([_record(0, 0.5, 0.5)], 0.5) is None


def test_scored_stage_is_the_last_stage_that_trains(tmp_path):
    assert scored_stage(_config(tmp_path)) == 3
    ti = _config(tmp_path).with_stage_values(steps=(50, 0, 0))
    assert scored_stage(ti) == 1


def test_select_and_target_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="add `score_checkpoints`"):
        _config(tmp_path, select="auto")
    with pytest.raises(ConfigError, match="drop `checkpoints_total_limit`"):
        _config(tmp_path, select="auto", score_checkpoints=True, checkpoints_total_limit=2)
    with pytest.raises(ConfigError, match="select_margin"):
        _config(tmp_path, select_margin=1.5)
    with pytest.raises(ConfigError, match="'last' or 'auto'"):
        _config(tmp_path, select="best")
    with pytest.raises(ConfigError, match="`stage3_mode` full trains every U-Net weight"):
        _config(tmp_path, stage3_mode="full", stage3_targets="unet")


class _Fixed(scoring.CheckpointScorer):
    name = "fixed"


def test_a_resumed_book_keeps_the_records_up_to_the_checkpoint(tmp_path):
    config = _config(tmp_path, score_checkpoints=True)
    book = ScoreBook.open(config, _Fixed(), None)
    book.records = [_record(k, 0.1 * k, 0.5) for k in range(4)]
    book.seconds = 12.0
    book.write()
    again = ScoreBook.open(config, _Fixed(), (3, 2))
    assert [r["step"] for r in again.records] == [0, 1, 2] and again.seconds == 12.0
    # scored another way (other prompts): the book starts over
    other = _config(tmp_path, score_checkpoints=True, score_prompts=("training: a photo of a {}",))
    assert ScoreBook.open(other, _Fixed(), (3, 2)).records == []
    assert json.loads((book.folder / "scores.json").read_text())["how"]["scorer"] == "fixed"
    # a new run (overwrite) starts a clean folder at its first write; a resumed one keeps what is there
    (book.folder / "stage3-step9.png").write_bytes(b"old")
    again.write()
    assert (book.folder / "stage3-step9.png").is_file()
    ScoreBook.open(config, _Fixed(), None).write()
    assert not (book.folder / "stage3-step9.png").exists() and (book.folder / "scores.json").is_file()


def test_the_full_checkpoint_disk_warning_does_not_suggest_pruning_under_select_auto(tmp_path, caplog):
    import torch

    from attndb_peft.training.resume import warn_full_checkpoint_disk_use

    unet = torch.nn.Linear(10, 10)
    for select, expected in (("last", "`checkpoints_total_limit` 2"), ("auto", "`select` auto keeps them all")):
        caplog.clear()
        extra = {"score_checkpoints": True} if select == "auto" else {}
        config = _config(tmp_path, stage3_mode="full", checkpointing_steps=100, select=select, **extra)
        warn_full_checkpoint_disk_use(config, unet)
        assert expected in caplog.text, select
