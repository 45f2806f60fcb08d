# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""AttnDBConfig: defaults from the paper, YAML/JSON files, CLI precedence, validation messages."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attndb_peft.cli import build_parser, config_from_args
from attndb_peft.config import AttnDBConfig, ConfigError, StageConfig, default_token

REQUIRED = dict(model="m", images="i", category="dog", output="o")


def test_paper_defaults_and_lora_learning_rates():
    c = AttnDBConfig(**REQUIRED)
    assert (c.stage1.steps, c.stage2.steps, c.stage3.steps) == (60, 100, 500)
    assert (c.stage1.lambda_mu, c.stage1.lambda_var) == (0.1, 0.0)
    assert (c.stage2.lambda_mu, c.stage2.lambda_var) == (c.stage3.lambda_mu, c.stage3.lambda_var) == (2.0, 5.0)
    assert (c.stage1.learning_rate, c.stage2.learning_rate, c.stage3.learning_rate) == (1e-3, 2e-4, 2e-5)
    assert AttnDBConfig(**REQUIRED, stage3_mode="full").stage3.learning_rate == 2e-6
    assert c.token == "<attndb-dog>" and c.prompt == "a photo of a <attndb-dog> dog"
    # resolution and batch None: the base model's own size, the family's batch (for_model; SD: the paper's 8)
    assert c.resolution is None and c.batch_size is None and c.regularizer == "per_layer"
    assert default_token("Teddy  Bear!") == "<attndb-teddy-bear>"


def test_every_field_has_help():
    for cls in (AttnDBConfig, StageConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_yaml_file_with_nested_stages_and_cli_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: base\nimages: imgs\ncategory: teddy bear\noutput: out\nseed: 3\nstage3_mode: full\n"
        "stage2:\n  rank: 8\n  learning_rate: 1.0e-4\n"
    )
    args = build_parser().parse_args(["train", "--config", str(path), "--seed", "9", "--steps", "1,2,3"])
    c = config_from_args(args)
    assert c.seed == 9 and c.category == "teddy bear" and c.stage3_mode == "full"
    assert c.stage2.rank == 8 and c.stage2.learning_rate == 1e-4
    assert (c.stage1.steps, c.stage2.steps, c.stage3.steps) == (1, 2, 3)
    assert c.stage3.learning_rate == 2e-6  # the full fine-tune default, not the LoRA one
    args = build_parser().parse_args(["train", "--config", str(path), "--learning-rates", "1e-3,1e-4,5e-6"])
    assert config_from_args(args).stage3.learning_rate == 5e-6


def test_json_file_round_trips(tmp_path):
    c = AttnDBConfig(**REQUIRED, token="<sks>", resolution=256, validation_prompts=("a {}",))
    path = tmp_path / "c.json"
    path.write_text(c.to_json())
    again = AttnDBConfig.from_file(path)
    assert again == c
    assert json.loads(path.read_text())["stage2"]["rank"] is None  # the family's, filled in by for_model


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 64).map(lambda n: n * 8),
    st.integers(1, 32),
    st.integers(0, 2**31),
    st.sampled_from(["lora", "full"]),
    st.sampled_from(["per_layer", "pooled"]),
    st.lists(st.integers(0, 1000), min_size=3, max_size=3),
)
def test_to_dict_from_dict_round_trip(resolution, batch, seed, mode, reduction, steps):
    c = AttnDBConfig(
        **REQUIRED, resolution=resolution, batch_size=batch, seed=seed, stage3_mode=mode, regularizer=reduction
    ).with_stage_values(steps=steps)
    assert AttnDBConfig.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(resolution=500), ["resolution", "multiple of 8", "500"]),
        (dict(batch_size=0), ["batch_size"]),
        (dict(stage3_mode="half"), ["stage3_mode", "half"]),
        (dict(regularizer="mean"), ["regularizer", "per_layer"]),
        (dict(token="two words"), ["token", "spaces"]),
        (dict(resume=True, overwrite=True), ["resume", "overwrite"]),
        (dict(stage2={"steps": -1}), ["stage2", "steps"]),
        (dict(stage1={"bogus": 1}), ["stage1", "bogus"]),
        (dict(mixed_precision="fp8"), ["mixed_precision", "fp8"]),
    ],
)
def test_invalid_settings_name_the_setting(changes, words):
    with pytest.raises(ConfigError) as info:
        AttnDBConfig(**{**REQUIRED, **changes})
    for word in words:
        assert word in str(info.value)


def test_unknown_keys_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.*colour"):
        AttnDBConfig.from_dict({**REQUIRED, "colour": "red"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*YAML"):
        AttnDBConfig.from_file(bad)
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        AttnDBConfig.from_file(listy)


def test_cli_requires_the_four_inputs():
    args = build_parser().parse_args(["train", "--model", "m"])
    with pytest.raises(ConfigError, match="`images`.*`category`.*`output`"):  # main shows --images ...
        config_from_args(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--steps", "1,2"])


def test_example_yaml_lists_every_setting_at_its_default():
    import yaml

    from attndb_peft.config import AttnDBConfig

    path = __import__("pathlib").Path(__file__).parents[2] / "examples" / "config.yaml"
    data = yaml.safe_load(path.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(AttnDBConfig)}
    for stage in ("stage1", "stage2", "stage3"):
        assert set(data[stage]) | {"rank", "alpha"} == {f.name for f in dataclasses.fields(StageConfig)}
    config = AttnDBConfig.from_file(path)
    defaults = AttnDBConfig(model=config.model, images=config.images, category="dog", output=config.output)
    assert config == defaults


def test_stage_flags_reach_the_config_and_defaults_are_shown(capsys):
    base = ["train", "--model", "m", "--images", "i", "--category", "dog", "--output", "o"]
    args = build_parser().parse_args(
        [
            *base,
            "--ranks",
            "4,64",
            "--lora-alphas",
            "8",
            "--lr-schedulers",
            "constant,cosine,linear",
            "--lr-warmup-steps",
            "5",
            "--lambda-mu",
            "0,1,2",
            "--lambda-var",
            "0,3,4",
        ]
    )
    c = config_from_args(args)
    assert (c.stage2.rank, c.stage3.rank, c.stage1.rank) == (4, 64, 32)
    assert (c.stage2.alpha, c.stage3.alpha, c.stage1.alpha) == (8.0, 8.0, None)
    assert [s.lr_scheduler for s in c.stages] == ["constant", "cosine", "linear"]
    assert [s.lr_warmup_steps for s in c.stages] == [5, 5, 5]
    assert [(s.lambda_mu, s.lambda_var) for s in c.stages] == [(0, 0), (1, 3), (2, 4)]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--ranks", "1,2,3"])
    assert "expected one value, or 2 comma-separated values (stages 2,3)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="stage1: `lr_scheduler` must be one of .*got 'cosin'"):
        config_from_args(build_parser().parse_args([*base, "--lr-schedulers", "cosin"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "the model family's, 32 on SD 1.x/2.x and 16 on SDXL",
        "Default: constant,constant,constant.",
        "Default: the base model's own",
        "Default: 0.1,2.0,2.0.",
    ):
        assert shown in text


def test_a_runs_attndb_config_json_reproduces_it_bit_identically(tiny_model, instance_dir, tmp_path):
    from safetensors.torch import load_file

    from attndb_peft.cli import main

    first = tmp_path / "first"
    flags = ["--resolution", "32", "--batch-size", "2", "--steps", "2,2,3", "--learning-rates", "5e-2,1e-2,1e-2"]
    flags += ["--ranks", "4,8", "--lora-alphas", "8,4", "--lr-schedulers", "cosine", "--lr-warmup-steps", "1"]
    flags += ["--save-dtype", "fp32", "--validation-prompts", "--seed", "3", "--quiet"]
    base = ["--model", str(tiny_model), "--images", str(instance_dir), "--category", "dog"]
    assert main(["train", *base, "--output", str(first), *flags]) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "attndb_config.json"), "--output", str(again), "--quiet"]) == 0
    for name in ("attndb_embedding.safetensors", "pytorch_lora_weights.safetensors", "attndb_kohya.safetensors"):
        a, b = load_file(str(first / name)), load_file(str(again / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    settings = [json.loads((d / "attndb_config.json").read_text())["settings"] for d in (first, again)]
    assert settings[0].pop("output") == str(first) and settings[1].pop("output") == str(again)
    assert settings[0] == settings[1]
    assert settings[0]["stage2"]["rank"] == 4 and settings[0]["stage3"]["lr_scheduler"] == "cosine"


def test_for_model_fills_the_family_defaults_and_keeps_what_was_set():
    from attndb_peft.families import SD, SDXL

    c = AttnDBConfig(**REQUIRED)
    assert (c.resolution, c.stage2.rank, c.stage3.rank, c.stage1.rank) == (None, None, None, 32)
    with pytest.raises(ConfigError, match="`rank` is None"):
        c.stage2.lora_alpha  # noqa: B018  (no alpha before the family is known)
    sd, sdxl = c.for_model(SD, 512), c.for_model(SDXL, 1024)
    assert (sd.resolution, sd.stage2.rank, sd.stage3.rank, sd.stage3.lora_alpha) == (512, 32, 32, 32.0)
    assert (sdxl.resolution, sdxl.stage2.rank, sdxl.stage3.rank) == (1024, 16, 16)
    mine = c.with_stage_values(rank=(None, 8, None)).for_model(SDXL, 1024)
    assert (mine.stage2.rank, mine.stage3.rank) == (8, 16)
    assert AttnDBConfig(**REQUIRED, resolution=768).for_model(SDXL, 1024).resolution == 768
    assert AttnDBConfig.from_dict(sdxl.to_dict()) == sdxl  # attndb_config.json records the filled-in values
    # the batch and memory setting: the paper's 8 images per step on both, SDXL in 2-image passes, checkpointed
    setting = ("batch_size", "gradient_accumulation_steps", "gradient_checkpointing")
    assert [getattr(c, k) for k in setting] == [None, None, None]
    assert [getattr(sd, k) for k in setting] == [8, 1, False]
    assert [getattr(sdxl, k) for k in setting] == [2, 4, True]
    mine = AttnDBConfig(**REQUIRED, batch_size=1, gradient_checkpointing=False).for_model(SDXL, 1024)
    assert [getattr(mine, k) for k in setting] == [1, 4, False]
    assert AttnDBConfig(**REQUIRED, compile=True).for_model(SDXL, 1024).gradient_checkpointing is False


def test_resume_settings_come_from_the_field_metadata():
    """RESUME_KEYS / RESUME_DEFAULTS are read off the fields' `resume` / `resume_default` metadata; their values
    are those the trainer has always compared and filled in."""
    from attndb_peft.config import RESUME_DEFAULTS, RESUME_KEYS

    assert set(RESUME_KEYS) == {
        "model", "model_config", "revision", "variant", "category", "token", "resolution", "batch_size",
        "gradient_accumulation_steps", "seed", "stage1", "stage2", "stage3", "stage3_mode", "token_init",
        "stage3_train_token", "regularizer", "flip", "random_crops", "masked_loss", "masks", "max_grad_norm",
        "mixed_precision", "recipe", "snr_gamma", "noise_offset", "optimizer", "stage3_targets", "quantize_base",
    }
    assert len(RESUME_KEYS) == 29
    # the settings added later: what a checkpoint written before them trained with
    assert RESUME_DEFAULTS == {"gradient_accumulation_steps": 1, "model_config": None, "masked_loss": False,
                               "masks": None, "recipe": "paper", "snr_gamma": None, "noise_offset": 0.0,
                               "optimizer": "adamw", "stage3_targets": "transformer", "quantize_base": None}
    assert set(RESUME_DEFAULTS) <= set(RESUME_KEYS)


def test_every_setting_with_a_flag_has_a_help_group():
    from attndb_peft.cli_args import TRAIN_GROUPS

    for f in dataclasses.fields(AttnDBConfig):
        if f.metadata.get("flag", "") is not None:
            assert f.metadata.get("group") in TRAIN_GROUPS, f.name
    for f in dataclasses.fields(StageConfig):
        if f.metadata.get("flag", "") is not None:
            assert set(f.metadata["stages"]) <= {1, 2, 3}, f.name


# -- recipe ----------------------------------------------------------------------------------------------------
def _resolved(config, family):
    c = config.for_model(family, 512)
    return c.stage3.steps, c.stage3.learning_rate, c.batch_size, c.gradient_accumulation_steps


def test_the_fast_recipe_resolves_stage3_and_the_batch_per_mode_and_family():
    from attndb_peft.families import SD, SDXL

    # the authors' fast version: stage 3 200 steps at lr 1e-5 (full weights; the LoRA 10x that) at batch 4
    fast = AttnDBConfig(**REQUIRED, recipe="fast")
    assert _resolved(fast, SD) == (200, 1e-4, 4, 1)
    assert _resolved(fast, SDXL) == (200, 1e-4, 2, 2)  # 4 images per step in SDXL's 2-image passes
    full = AttnDBConfig(**REQUIRED, recipe="fast", stage3_mode="full")
    assert _resolved(full, SD) == (200, 1e-5, 4, 1) and _resolved(full, SDXL) == (200, 1e-5, 2, 2)
    # stages 1-2 and the regularizer weights are the paper's in both recipes
    paper = AttnDBConfig(**REQUIRED)
    assert fast.stage1 == paper.stage1 and fast.stage2 == paper.stage2
    assert (fast.stage3.lambda_mu, fast.stage3.lambda_var) == (2.0, 5.0)
    assert AttnDBConfig.from_dict(json.loads(fast.to_json())) == fast  # attndb_config.json reads back


def test_the_paper_recipe_is_the_default_and_unchanged():
    from attndb_peft.families import SD, SDXL

    paper = AttnDBConfig(**REQUIRED)
    assert paper.recipe == "paper" and paper == AttnDBConfig(**REQUIRED, recipe="paper")
    assert _resolved(paper, SD) == (500, 2e-5, 8, 1) and _resolved(paper, SDXL) == (500, 2e-5, 2, 4)
    assert AttnDBConfig(**REQUIRED, stage3_mode="full").stage3.learning_rate == 2e-6
    # the stage 3 a config file of the old layout spells out is the paper's resolved one
    assert paper.stage3 == StageConfig(steps=500, learning_rate=2e-5, lambda_mu=2.0, lambda_var=5.0, rank=None)


def test_values_given_win_over_the_recipe():
    from attndb_peft.families import SD, SDXL

    base = ["train", "--model", "m", "--images", "i", "--category", "dog", "--output", "o", "--recipe", "fast"]
    given = build_parser().parse_args([*base, "--steps", "60,100,500", "--learning-rates", "1e-3,2e-4,3e-5"])
    c = config_from_args(given)
    assert c.recipe == "fast" and (c.stage3.steps, c.stage3.learning_rate) == (500, 3e-5)
    c = config_from_args(build_parser().parse_args([*base, "--batch-size", "8"]))
    assert _resolved(c, SD) == (200, 1e-4, 8, 1)
    c = config_from_args(build_parser().parse_args([*base, "--gradient-accumulation-steps", "1"]))
    assert _resolved(c, SDXL) == (200, 1e-4, 2, 1)
    # Python and config files alike: a stage-3 value set is kept, the unset one comes from the recipe
    c = AttnDBConfig(**REQUIRED, recipe="fast", stage3={"steps": 50})
    assert (c.stage3.steps, c.stage3.learning_rate) == (50, 1e-4)
    c = AttnDBConfig(**REQUIRED, recipe="fast", stage3={"learning_rate": 7e-5})
    assert (c.stage3.steps, c.stage3.learning_rate) == (200, 7e-5)
    with pytest.raises(ConfigError, match="`recipe` must be 'paper' or 'fast', got 'slow'"):
        AttnDBConfig(**REQUIRED, recipe="slow")


# -- the options beyond the paper --------------------------------------------------------------------------
def test_the_options_are_off_by_default_and_validated():
    c = AttnDBConfig(**REQUIRED)
    assert (c.snr_gamma, c.noise_offset, c.optimizer) == (None, 0.0, "adamw")
    base = ["train", "--model", "m", "--images", "i", "--category", "dog", "--output", "o"]
    flags = ["--snr-gamma", "5", "--noise-offset", "0.05", "--optimizer", "prodigy", "--recipe", "fast"]
    c = config_from_args(build_parser().parse_args([*base, *flags]))
    assert (c.snr_gamma, c.noise_offset, c.optimizer, c.recipe) == (5.0, 0.05, "prodigy", "fast")
    for changes, message in [
        (dict(snr_gamma=0.0), "`snr_gamma` must be > 0"),
        (dict(snr_gamma=-1.0), "`snr_gamma` must be > 0"),
        (dict(noise_offset=-0.1), "`noise_offset` must be >= 0"),
        (dict(optimizer="sgd"), "`optimizer` must be 'adamw' or 'prodigy' or 'adamw8bit', got 'sgd'"),
        (dict(optimizer="prodigy", stage3_train_token=True), "prodigy cannot train the token"),
    ]:
        with pytest.raises(ConfigError, match=message):
            AttnDBConfig(**REQUIRED, **changes)
