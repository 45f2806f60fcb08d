# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/world_quality.py: `--quick` at the smallest settings trains every main method through the trainer,
writes the promised JSON (its CIs recomputed here from the stored per-concept numbers) and resumes from its
per-run files; the methods' trainer settings, the tuning rule and the sweep's curve are checked without training."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_benchmark

# The smallest --quick that still trains every main method: 1% of the recipe's steps (>= 1 per stage; with
# 60/100/200: 1/1/2, TI 18), 1 image per prompt, 2 denoising steps.
QUICK = ["--quick", "--steps-scale", "0.01", "--images", "1", "--inference-steps", "2"]
# Student's t 0.975 quantiles from a printed table (df 1, 2, 7, 30)
T975 = {1: 12.7062, 2: 4.3027, 7: 2.3646, 30: 2.0423}


@pytest.fixture(scope="module")
def wq():
    return load_benchmark("world_quality")


@pytest.fixture(scope="module")
def quick(wq, tmp_path_factory):
    out = tmp_path_factory.mktemp("wq") / "quick"
    assert wq.main([*QUICK, "--output", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_t_quantile_matches_the_table(wq):
    for df, value in T975.items():
        assert wq.t_quantile(0.975, df) == pytest.approx(value, abs=2e-3)


def test_identity_is_split_between_the_training_prompt_and_new_prompts(wq):
    from attndb_peft.config import instance_prompt
    from attndb_peft.world import scenes as W

    scene = W.Scene("cone", wq.EVAL_PROMPTS[0][1], wq.EVAL_PROMPTS[0][2], wq.EVAL_PROMPTS[0][0])
    assert W.caption(scene, "[V]") == instance_prompt("[V]", "cone")  # the first evaluation prompt is the training one
    assert W.caption(scene, "[V]").replace("[V] cone", "[V] [category]") == wq.TRAINING_TEMPLATE
    run = {
        "prompt_templates": [wq.TRAINING_TEMPLATE, "a photo of a [V] [category] on the grass",
                             "a sketch of a [V] [category]"],
        "records": [
            {"prompt": 0, "identity_ok": True},
            {"prompt": 0, "identity_ok": False},
            {"prompt": 0, "identity_ok": True},
            {"prompt": 1, "identity_ok": False}, {"prompt": 1, "identity_ok": True},
            {"prompt": 2, "identity_ok": None},  # sketches have no identity
        ],
    }
    assert wq._prompt_split(run) == {"identity_ok_training_prompt": 2 / 3, "identity_ok_new_prompts": 0.5}
    assert wq._prompt_split({**run, "prompt_templates": run["prompt_templates"][1:] + ["x"]}) == {
        "identity_ok_training_prompt": None, "identity_ok_new_prompts": 3 / 5}


@pytest.mark.slow
def test_quick_trains_every_main_method_and_writes_the_report(wq, quick):
    out, report = quick
    assert set(report) >= {"machine", "date", "seconds", "recipe", "settings", "tuning", "methods", "table",
                           "figure", "grids", "runs", "base_model"}
    assert list(report["methods"]) == list(wq.MAIN_METHODS)
    assert report["settings"]["evaluation_concepts"] == [0, 1]
    assert not set(report["settings"]["evaluation_concepts"]) & set(report["settings"]["tuning_concepts"])
    assert report["runs"] == {"trained": 2 * len(wq.MAIN_METHODS), "reused": 0}
    for name, result in report["methods"].items():
        assert set(result["per_concept"]) == {"0", "1"}
        assert set(result["metrics"]) == {k for k, _ in wq.METRICS}
        for path in result["runs"]:
            run = json.loads((out / path).read_text())
            assert run["method"] == name and run["train_seconds"] > 0 and sum(run["steps"]) > 0
            assert len(run["records"]) == len(wq.QUICK_PROMPTS) and len(run["attention"]) == len(wq.QUICK_PROMPTS)
            assert (out / "runs" / "eval" / run["sheet"]).is_file()
        assert (out / result_grid(report, name)).is_file()
    settings = {n: r["settings"] for n, r in report["methods"].items()}
    steps = {n: r["steps"] for n, r in report["methods"].items()}
    scaled = list(wq.scaled_steps(_recipe(), 0.01))  # the recipe is read at run time
    assert steps["attndb"] == steps["attndb_full"] == scaled
    assert steps["db"] == steps["ti_db"] == [0, 0, sum(scaled)]
    assert steps["ti"] == [round(sum(scaled) * wq.TI_PAPER_STEPS / 660), 0, 0]
    assert settings["db"]["token_init"] == "random" and settings["ti_db"]["stage3_train_token"]
    assert settings["attndb_full"]["stage3_mode"] == "full" and settings["attndb"]["stage3_mode"] == "lora"
    # the embedding: DreamBooth's never trains, the others moved
    cos = {n: r["metrics"]["embedding_cosine"]["mean"] for n, r in report["methods"].items()}
    assert cos["db"] == pytest.approx(1.0, abs=1e-5) and cos["ti"] < 1.0
    assert (out / report["figure"]["file"]).is_file() and (out / "table.md").is_file()
    assert all(r["label"] in report["table"] for r in report["methods"].values())


def result_grid(report, name):
    return report["grids"][name]


@pytest.mark.slow
def test_confidence_intervals_come_from_the_per_concept_numbers(quick):
    _, report = quick
    for result in report["methods"].values():
        for key, ci in result["metrics"].items():
            values = [v[key] for v in result["per_concept"].values() if v[key] is not None]
            assert ci["n"] == len(values)
            if len(values) < 2:
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            half = T975[len(values) - 1] * sd / math.sqrt(len(values))
            assert ci["mean"] == pytest.approx(mean, abs=1e-9)
            assert ci["half_width"] == pytest.approx(half, rel=1e-3, abs=1e-9)
            assert ci["low"] == pytest.approx(mean - half, rel=1e-3, abs=1e-9)


@pytest.mark.slow
def test_resume_skips_finished_runs(wq, quick):
    out, report = quick
    files = sorted((out / "runs" / "eval").glob("*.json"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert wq.main([*QUICK, "--output", str(out), "--methods", "ti,attndb"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == {"trained": 0, "reused": 4}
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert again["methods"]["attndb"]["per_concept"] == report["methods"]["attndb"]["per_concept"]
    # a run whose file is gone trains again, the others are reused
    (out / "runs" / "eval" / "ti-1.json").unlink()
    assert wq.main([*QUICK, "--output", str(out), "--methods", "ti"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == {"trained": 1, "reused": 1}


def _recipe():
    from attndb_peft.world.model import world_config

    return world_config(model="m", images="i", category="ball", output="o")


def test_method_configs(wq):
    from attndb_peft.config import STAGE3_LEARNING_RATES

    recipe = _recipe()
    steps = [s.steps for s in recipe.stages]
    total = sum(steps)
    lrs = [s.learning_rate for s in recipe.stages]
    full_rate = lrs[2] * STAGE3_LEARNING_RATES["full"] / STAGE3_LEARNING_RATES["lora"]
    c = {name: wq.method_config(name, recipe, lr_factor=2.0) for name in wq.METHODS}
    assert [s.steps for s in c["attndb"].stages] == steps
    assert [s.learning_rate for s in c["attndb"].stages] == pytest.approx([2 * x for x in lrs])
    assert [s.steps for s in c["ti"].stages] == [round(total * wq.TI_PAPER_STEPS / 660), 0, 0]
    assert all(s.lambda_mu == 0 and s.lambda_var == 0 for n in ("ti", "db", "ti_db", "no_reg") for s in c[n].stages)
    for name in ("db", "ti_db"):
        assert [s.steps for s in c[name].stages] == [0, 0, total] and c[name].stage3_mode == "full"
        assert c[name].stage3.learning_rate == pytest.approx(2 * full_rate)
    assert c["db"].token_init == "random" and not c["db"].stage3_train_token
    assert c["ti_db"].token_init == "category" and c["ti_db"].stage3_train_token
    assert c["ti_db"].stage1.learning_rate == pytest.approx(2 * lrs[0])  # the token's rate in stage 3
    assert c["attndb_full"].stage3_mode == "full" and c["attndb_full"].stage3.learning_rate == pytest.approx(
        2 * full_rate)
    for i in (1, 2, 3):
        assert getattr(c[f"no_stage{i}"], f"stage{i}").steps == 0
        assert sum(s.steps for s in c[f"no_stage{i}"].stages) == total - steps[i - 1]
    assert c["pooled"].regularizer == "pooled" and c["attndb"].regularizer == "per_layer"
    assert c["no_reg"].stage2.steps == steps[1]
    swept = wq.method_config("attndb", recipe, stage2={"rank": 4}, stage3={"rank": 4}, stage_lr_factors=(1, 3, 3))
    assert swept.stage2.rank == swept.stage3.rank == 4
    assert [s.learning_rate for s in swept.stages] == pytest.approx([lrs[0], 3 * lrs[1], 3 * lrs[2]])


def _fake_runs(wq, monkeypatch, scores):
    """Replace training with a table: scores[(key, method)] -> (identity, text alignment)."""
    calls = []

    def fake(key, method, seed, changes, ctx, evaluation):
        calls.append((key, method, seed))
        identity, alignment = scores(key, method, seed)
        values = {"identity": identity, "identity_ok": identity, "text_alignment": alignment, "presence": 1.0}
        return {"concept": seed, "method": method, "key": key, "values": values, "learning_rates": [1, 2, 3],
                "prompt_templates": ["p"]}, False

    monkeypatch.setattr(wq, "run_one", fake)
    return calls


def test_tuning_picks_the_best_factor_on_the_tuning_concepts_only(wq, monkeypatch, tmp_path):
    best = {"attndb": 3.0, "ti": 1 / 3}
    def scores(key, method, seed):
        if method == "db":  # every factor scores the same
            return 0.5, 0.5
        return 0.5, 0.9 if key == f"tuning/x{best[method]:.4g}" else 0.5

    calls = _fake_runs(wq, monkeypatch, scores)
    ctx = {"tuning_concepts": (900, 901)}
    counts = {"trained": 0, "reused": 0}
    report = wq._tune(["ti", "no_stage2", "pooled", "db"], ctx, wq.LR_GRID, None, counts)
    assert list(report) == ["ti", "db", "attndb"]  # ablations are tuned as attndb
    assert report["attndb"]["lr_factor"] == 3.0 and report["ti"]["lr_factor"] == pytest.approx(1 / 3)
    assert report["db"]["lr_factor"] == 1.0  # a tie goes to the recipe's own rate
    assert {seed for _, _, seed in calls} == {900, 901}
    assert counts["trained"] == 3 * len(wq.LR_GRID) * 2


def test_sweep_reports_the_curve(wq, monkeypatch, tmp_path):
    _fake_runs(wq, monkeypatch, lambda key, method, seed: (0.6 if method == "attndb_full" else 0.5, 0.8))
    monkeypatch.setattr(wq, "_file_digest", lambda folder: "x")
    args = wq.parse_args(["--sweep", "--sweep-ranks", "4,8", "--sweep-rates", "1,3", "--output", str(tmp_path)])
    report = wq.run_sweep(args)
    curve = report["curve"]
    assert [(p["rank"], p["rate_factor"]) for p in curve] == [(4, 1.0), (4, 3.0), (8, 1.0), (8, 3.0), (None, 1.0)]
    assert curve[-1]["method"] == "attndb_full" and curve[-1]["identity"]["mean"] == pytest.approx(0.6)
    assert json.loads((tmp_path / "sweep.json").read_text())["curve"][0]["per_concept"].keys() == {"900", "901"}


def test_refuses_tuning_concepts_and_unknown_methods(wq):
    with pytest.raises(SystemExit):
        wq.parse_args(["--concepts", "0,900"])
    with pytest.raises(SystemExit):
        wq.parse_args(["--methods", "attndb,magic"])
    args = wq.parse_args(["--methods", "main,no_reg", "--concepts", "3-5"])
    assert args.methods == [*wq.MAIN_METHODS, "no_reg"] and args.concepts == [3, 4, 5]
