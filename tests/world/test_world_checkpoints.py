# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/world_checkpoints.py: at the smallest settings, `--tune` trains AttnDB with scored checkpoints through
the trainer, evaluates every margin's choice and the stage ends, picks the margin by its documented criterion and
reuses its per-run file when run again; the report's arithmetic is checked on hand-made runs."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

TINY = ["--steps-scale", "0.02", "--images", "1", "--score-images", "1", "--inference-steps", "2",
        "--checkpoints", "2", "--concepts", "900", "--margins", "0,1"]


@pytest.fixture(scope="module")
def wc():
    return load_benchmark("world_checkpoints")


def _values(identity_ok, alignment):
    return {"identity_ok": identity_ok, "text_alignment": alignment, "identity_ok_new_prompts": identity_ok,
            "identity_ok_training_prompt": 1.0, "context_new_prompts": 0.8, "presence_new_prompts": 0.9}


def _run(concept, chosen_by_margin, evaluated, method="attndb"):
    curve = [{"checkpoint": f"stage3-step{k}", "step": k, "training": {"identity": 0.5, "text_alignment": 0.5},
              "new": {"identity": 0.1 * k, "text_alignment": 1 - 0.1 * k}} for k in (0, 1, 2)]
    return {"method": method, "concept": concept, "curve": curve, "selected": chosen_by_margin,
            "evaluated": evaluated, "stage_ends": {}, "vae_ceiling": 0.9, "train_seconds": 1.0,
            "scoring_seconds": 1.0}


def test_tuning_picks_the_margin_whose_choices_score_best_ties_to_the_smaller(wc):
    evaluated = {"stage3-step1": _values(0.2, 0.9), "stage3-step2": _values(0.4, 0.6)}
    runs = [_run(900, {"0.0": "stage3-step2", "1.0": "stage3-step1"}, evaluated),
            _run(901, {"0.0": "stage3-step2", "1.0": "stage3-step2"}, evaluated)]
    tuned = wc.tune(runs, [0.0, 1.0])
    assert tuned["scores"] == {"0.0": pytest.approx(0.5), "1.0": pytest.approx((0.55 + 0.5) / 2)}
    assert tuned["margin"] == 1.0
    equal = [_run(900, {"0.0": "stage3-step1", "1.0": "stage3-step1"}, evaluated)]
    assert wc.tune(equal, [0.0, 1.0])["margin"] == 0.0


def test_summary_pairs_selection_with_the_final_step_per_concept(wc):
    evaluated = {"stage3-step1": _values(0.2, 0.9), "stage3-step2": _values(0.4, 0.6)}
    runs = [_run(c, {"0.25": "stage3-step1"}, evaluated) for c in (0, 1, 2)]
    summary = wc.summarize(runs, ["attndb"], 0.25)["attndb"]
    assert summary["final"]["identity_ok_new_prompts"]["mean"] == pytest.approx(0.4)
    assert summary["selected"]["identity_ok_new_prompts"]["mean"] == pytest.approx(0.2)
    assert summary["selected_minus_final"]["text_alignment"]["mean"] == pytest.approx(0.3)
    assert [p["identity_new"]["mean"] for p in summary["curve"]] == pytest.approx([0.0, 0.1, 0.2])
    # the goal: context and presence >= 0.75 and beating the distractors in >= 30 % of new-prompt pictures
    assert summary["goal_met_final"] == [True] * 3 and summary["goal_met_selected"] == [False] * 3
    assert wc._goal(_values(0.9, 1.0), ceiling=0.5) is None  # not asked where the VAE cannot keep the concept


@pytest.mark.slow
def test_tune_trains_scores_and_resumes(wc, tmp_path):
    out = tmp_path / "wc"
    assert wc.main(["--tune", *TINY, "--output", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["tuning"]["scores"]) == {"0.0", "1.0"} and report["tuning"]["margin"] in (0.0, 1.0)
    run = json.loads((out / "runs" / "attndb-900.json").read_text())
    assert [c["step"] for c in run["curve"]] == [0, 2, 4]  # 4 stage-3 steps, every 2nd scored, and the start
    assert set(run["evaluated"]) == {"stage3-step4", *run["selected"].values()}
    assert set(run["stage_ends"]) == {"stage 1", "stage 2", "stage 3"}
    assert run["stage_ends"]["stage 3"]["attention_share"] is not None
    assert 0 <= run["vae_ceiling"] <= 1 and (out / "curves.png").is_file()
    assert not (out / "work").exists() or not any((out / "work").iterdir())
    modified = (out / "runs" / "attndb-900.json").stat().st_mtime_ns
    assert wc.main(["--tune", *TINY, "--output", str(out)]) == 0
    assert (out / "runs" / "attndb-900.json").stat().st_mtime_ns == modified  # reused, not retrained
