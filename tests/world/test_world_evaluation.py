# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The base-model evaluation's summary: shares, their 95 % intervals and where the category goes wrong."""

from __future__ import annotations

import pytest

from attndb_peft.world import scenes as W
from attndb_peft.world.evaluation import summarize_base, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson score)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_the_published_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_of_no_sample_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _record(category, present, context_ok=True, style_ok=True, colour_ok=None):
    return {"category": category, "present": present, "context_ok": context_ok, "style_ok": style_ok,
            "colour_ok": colour_ok}


def test_summarize_base_counts_shares_and_where_the_category_goes_wrong():
    scenes = [
        W.Scene("box", "red", "grass", "photo"),
        W.Scene("box", None, "snow", "painting"),
        W.Scene("ball", "blue", None, "sketch"),
        W.Scene("cone", None, "night", "photo"),
    ]
    records = [
        _record("ball", False, colour_ok=True),
        _record(None, False, context_ok=False),
        _record("ball", True, context_ok=None, colour_ok=None),
        _record("cone", True, style_ok=False),
    ]
    s = summarize_base(records, scenes)
    assert s["images"] == 4
    assert (s["category"], s["category_n"]) == (0.5, 4)
    assert (s["context"], s["context_n"]) == (pytest.approx(2 / 3, abs=1e-4), 3)  # the sketch has no context
    assert (s["style"], s["colour"], s["colour_n"]) == (0.75, 1.0, 1)
    assert s["intervals"]["category"] == pytest.approx(wilson_interval(2, 4), abs=1e-4)
    assert s["category_by_asked"] == {
        "ball": {"right": 1, "n": 1, "read_as": {"ball": 1}},
        "box": {"right": 0, "n": 2, "read_as": {"None": 1, "ball": 1}},
        "cone": {"right": 1, "n": 1, "read_as": {"cone": 1}},
    }
    assert {k: (v["right"], v["n"]) for k, v in s["category_by_style"].items()} == {
        "painting": (0, 1), "photo": (1, 2), "sketch": (1, 1)}


def test_summarize_base_leaves_out_what_no_caption_asks_and_refuses_a_mismatch():
    s = summarize_base([_record("box", True)], [W.Scene("box", None, "grass", "photo")])
    assert s["colour"] is None and s["colour_n"] == 0 and s["intervals"]["colour"] is None
    with pytest.raises(ValueError, match="one record per scene"):
        summarize_base([_record("box", True)], [])
