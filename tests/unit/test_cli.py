# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The command line: every flag is described, errors are one line (traceback only with --verbose)."""

from __future__ import annotations

import argparse

import pytest

from attndb_peft import cli
from attndb_peft.cli import build_parser, config_from_args, main

COMMANDS = ("train", "estimate", "generate", "inspect", "evaluate", "push", "export", "demo")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
    parser = build_parser()
    assert set(_subparsers(parser)) == {*COMMANDS, "world"}  # world's subcommands: tests/world/test_world_scorers.py
    for choice in next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions:
        assert choice.help and choice.help.strip(), choice.dest


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_every_command_has_help(command, capsys):
    sub = _subparsers(build_parser())[command]
    assert sub.description and sub.description.strip()
    options = [a for a in sub._actions if a.option_strings]
    assert len(options) > 3
    for action in options:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in options:
        assert max(action.option_strings, key=len) in text
    for flag in ("--verbose", "--quiet"):
        assert flag in text


def test_new_train_flags_reach_the_config(tmp_path):
    args = build_parser().parse_args(
        [
            "train",
            "--model",
            "m",
            "--images",
            "i",
            "--category",
            "dog",
            "--output",
            str(tmp_path),
            "--validation-prompts",
            "a photo of a {}",
            "a {} in the snow",
            "--validation-steps",
            "50",
            "--validation-images",
            "3",
            "--validation-inference-steps",
            "20",
            "--report-to",
            "tensorboard",
        ]
    )
    config = config_from_args(args)
    assert config.validation_prompts == ("a photo of a {}", "a {} in the snow")
    assert (config.validation_steps, config.validation_images, config.validation_inference_steps) == (50, 3, 20)
    assert config.report_to == "tensorboard"
    base = ["train", "--model", "m", "--images", "i", "--category", "dog", "--output", str(tmp_path)]
    assert config_from_args(build_parser().parse_args([*base, "--validation-prompts"])).validation_prompts == ()


def _one_line_error(capsys, argv, code):
    assert main(argv) == code
    captured = capsys.readouterr()
    # transformers 5 may print a note about torchvision when diffusers is imported; that is not our error
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("[transformers]")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_usage_errors_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", "--output", str(tmp_path), "--num-images", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "attndb generate: error: argument --num-images: expected a number >= 1, got 0 (see attndb generate --help)"
    ]
    line = _one_line_error(
        capsys, ["generate", "--adapter", str(tmp_path / "missing"), "--prompt", "a {}", "--output", str(tmp_path)], 2
    )
    assert line.startswith("attndb generate: error: --adapter") and "no such folder" in line
    (tmp_path / "not-an-adapter").mkdir()
    line = _one_line_error(
        capsys, ["inspect", "--adapter", str(tmp_path / "not-an-adapter"), "--prompt", "a {}", "--output", "a.png"], 2
    )
    assert "attndb_config.json" in line
    line = _one_line_error(
        capsys, ["inspect", "--model", str(tmp_path / "nope"), "--prompt", "a", "--output", "a.png"], 2
    )
    assert line.startswith("attndb inspect: error: --model") and "no such folder or file; give a Hub id" in line
    line = _one_line_error(capsys, ["evaluate", "--adapter", "x", "--images", str(tmp_path / "none")], 2)
    assert "--images" in line
    (tmp_path / "foreign.txt").write_text("not a demo")
    line = _one_line_error(capsys, ["demo", "--output", str(tmp_path)], 2)
    assert "--output" in line and "not empty" in line


def test_failures_are_one_line_and_verbose_adds_the_traceback(capsys, caplog, monkeypatch):
    def broken(args):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB\nmore details")

    monkeypatch.setattr(cli, "_cmd_demo", broken)
    line = _one_line_error(capsys, ["demo", "--quiet"], 1)
    assert line == (
        "attndb demo: error: RuntimeError: CUDA out of memory. (run again with --verbose for the traceback)"
    )
    assert "Traceback" not in caplog.text
    assert main(["demo", "--verbose"]) == 1
    assert "Traceback" in caplog.text and "more details" in caplog.text  # logged to stderr by the CLI's handler
    assert capsys.readouterr().err.strip().splitlines()[-1] == "attndb demo: error: RuntimeError: CUDA out of memory."


# -- the flags generated from the config's fields: every flag of the hand-written parser still parses the same ----
#: Every long option each command had before the train flags were generated, by dest (`_` <-> `-` unless given).
OLD_OPTIONS = {
    "train": "model model-config images category output token config revision variant resolution batch-size "
    "gradient-accumulation-steps steps learning-rates ranks lora-alphas lr-schedulers lr-warmup-steps lambda-mu "
    "lambda-var full-export-rank regularizer seed mixed-precision gradient-checkpointing offload-frozen compile "
    "save-dtype random-crops masked-loss masks max-grad-norm checkpointing-steps checkpoints-total-limit resume "
    "overwrite push-to-hub log-every validation-prompts validation-steps validation-images "
    "validation-inference-steps validation-guidance-scale report-to verbose quiet",
    "generate": "prompt num-images negative-prompt output model model-config adapter lora-scale seed steps guidance "
    "height width device dtype verbose quiet",
    "inspect": "prompt output model model-config adapter lora-scale seed steps guidance height width device dtype "
    "verbose quiet",
    "evaluate": "images prompts clip dino num-images output model model-config adapter lora-scale seed steps "
    "guidance height width device dtype verbose quiet",
    "push": "private token commit-message verbose quiet",
    "export": "checkpoint output model model-config verbose quiet",
    "demo": "output steps seed concept-seed random-weights family verbose quiet",
    "world pretrain": "output seed steps threads checkpoint-every stop-after train-text-encoder object-loss-weight "
    "unet-layers-per-block device verbose quiet",
    "world base": "output verbose quiet",
    "world concept": "seed output num-images verbose quiet",
    "world score": "concept images output verbose quiet",
}
OLD_RENAMED = {
    "train": {"--stage3": "stage3_mode", "--no-gradient-checkpointing": "gradient_checkpointing",
              "--no-flip": "flip", "--no-tf32": "allow_tf32"},
    "world pretrain": {"--no-evaluate": "evaluate", "--frozen-text-encoder": "train_text_encoder"},
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in command.split():
        parser = _subparsers(parser)[name]
    return parser


@pytest.mark.parametrize("command", sorted(OLD_OPTIONS))
def test_every_old_option_keeps_its_dest(command):
    parser = _command_parser(command)
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    expected = {f"--{name}": name.replace("-", "_") for name in OLD_OPTIONS[command].split()}
    expected.update(OLD_RENAMED.get(command, {}))
    assert {option: dests.get(option) for option in expected} == expected


TRAIN = ["train", "--model", "m", "--images", "i", "--category", "teddy bear", "--output", "o"]
#: (flags, {setting: the value the hand-written parser gave}), every old train flag at least once.
OLD_TRAIN_FLAGS = [
    ([], {"token": "<attndb-teddy-bear>", "flip": True, "allow_tf32": True, "masked_loss": False,
          "gradient_checkpointing": None, "offload_frozen": False, "compile": False, "resume": False,
          "overwrite": False, "stage1.steps": 60, "stage3.learning_rate": 2e-5, "stage2.rank": None}),
    (["--model-config", "mc", "--token", "<x>", "--revision", "r", "--variant", "fp16"],
     {"model_config": "mc", "token": "<x>", "revision": "r", "variant": "fp16"}),
    (["--resolution", "256", "--batch-size", "3", "--gradient-accumulation-steps", "2", "--seed", "7"],
     {"resolution": 256, "batch_size": 3, "gradient_accumulation_steps": 2, "seed": 7}),
    (["--steps", "1,2,3", "--learning-rates", "1e-3,1e-4,5e-6"],
     {"stage1.steps": 1, "stage2.steps": 2, "stage3.steps": 3, "stage2.learning_rate": 1e-4,
      "stage3.learning_rate": 5e-6}),
    (["--ranks", "4,64", "--lora-alphas", "8"],
     {"stage1.rank": 32, "stage2.rank": 4, "stage3.rank": 64, "stage1.alpha": None, "stage2.alpha": 8.0,
      "stage3.alpha": 8.0}),
    (["--ranks", "16", "--lora-alphas", "1,2"], {"stage2.rank": 16, "stage3.rank": 16, "stage3.alpha": 2.0}),
    (["--lr-schedulers", "cosine", "--lr-warmup-steps", "1,2,3"],
     {"stage1.lr_scheduler": "cosine", "stage3.lr_scheduler": "cosine", "stage2.lr_warmup_steps": 2}),
    (["--lr-schedulers", "constant,linear,cosine"], {"stage2.lr_scheduler": "linear"}),
    (["--lambda-mu", "0,1,2", "--lambda-var", "3"],
     {"stage1.lambda_mu": 0.0, "stage3.lambda_mu": 2.0, "stage1.lambda_var": 3.0, "stage3.lambda_var": 3.0}),
    (["--stage3", "full", "--full-export-rank", "8", "--regularizer", "pooled"],
     {"stage3_mode": "full", "stage3.learning_rate": 2e-6, "full_export_rank": 8, "regularizer": "pooled"}),
    (["--mixed-precision", "bf16", "--gradient-checkpointing", "--offload-frozen", "--save-dtype", "fp32"],
     {"mixed_precision": "bf16", "gradient_checkpointing": True, "offload_frozen": True, "save_dtype": "fp32"}),
    (["--compile", "--no-gradient-checkpointing", "--overwrite"],
     {"compile": True, "gradient_checkpointing": False, "overwrite": True}),
    (["--random-crops", "2", "--no-flip", "--masked-loss", "--max-grad-norm", "0.5", "--no-tf32"],
     {"random_crops": 2, "flip": False, "masked_loss": True, "max_grad_norm": 0.5, "allow_tf32": False}),
    (["--masks", "mk"], {"masks": "mk", "masked_loss": True}),
    (["--checkpointing-steps", "5", "--checkpoints-total-limit", "2", "--resume", "--push-to-hub", "a/b"],
     {"checkpointing_steps": 5, "checkpoints_total_limit": 2, "resume": True, "push_to_hub": "a/b"}),
    (["--log-every", "3", "--validation-prompts", "a {}", "b {}", "--validation-steps", "4"],
     {"log_every": 3, "validation_prompts": ("a {}", "b {}"), "validation_steps": 4}),
    (["--validation-images", "1", "--validation-inference-steps", "5", "--validation-guidance-scale", "3.5",
      "--report-to", "wandb", "--validation-prompts"],
     {"validation_images": 1, "validation_inference_steps": 5, "validation_guidance_scale": 3.5,
      "report_to": "wandb", "validation_prompts": ()}),
]


@pytest.mark.parametrize("flags, expected", OLD_TRAIN_FLAGS)
def test_old_train_flags_parse_to_the_same_config(flags, expected):
    config = config_from_args(build_parser().parse_args([*TRAIN, *flags]))
    got = {}
    for path in expected:
        value = config
        for part in path.split("."):
            value = getattr(value, part)
        got[path] = value
    assert got == expected


def test_train_flags_come_from_the_fields():
    """One flag per field with a flag (booleans with their --no- form), in a help section; nothing else."""
    import dataclasses

    from attndb_peft.config import AttnDBConfig, StageConfig

    parser = _command_parser("train")
    by_setting = {getattr(a, "setting", None): a for a in parser._actions}
    for cls in (AttnDBConfig, StageConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag", "") is None:
                assert f.name not in by_setting, f.name
                continue
            action = by_setting[f.name]
            assert action.default is None and f.metadata["help"].split(". ")[0] in action.help, f.name
            if "choices" in f.metadata:
                assert tuple(action.choices) == f.metadata["choices"]
    assert by_setting["flip"].option_strings == ["--flip", "--no-flip"]
    assert by_setting["allow_tf32"].option_strings == ["--tf32", "--no-tf32"]
    text = parser.format_help()
    for title in ("base model:", "instance data and token:", "training stages:", "memory and speed:",
                  "output, checkpoints and the Hub:", "logging and sample grids:"):
        assert title in text


@pytest.mark.parametrize("command", sorted(OLD_OPTIONS))
def test_help_shows_every_default(command):
    parser = _command_parser(command)
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 and not hasattr(action, "setting"):
            continue  # positionals, and switches (--no-evaluate: "default True" would only mislead)
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        if action.default not in (None, False) or hasattr(action, "setting"):  # train's: default None, shown
            assert "default" in text.lower() or "required" in text.lower(), (command, action.option_strings)


def test_errors_name_the_flag_on_the_command_line_and_the_argument_in_python(capsys, tmp_path):
    from attndb_peft.config import AttnDBConfig, ConfigError

    with pytest.raises(ConfigError, match="^`resolution` must be a positive multiple of 8, got 500"):
        AttnDBConfig(model="m", images="i", category="dog", output="o", resolution=500)
    line = _one_line_error(capsys, [*TRAIN, "--resolution", "500"], 2)
    assert line == "attndb train: error: --resolution must be a positive multiple of 8, got 500."
    line = _one_line_error(capsys, ["train", "--model", "m"], 2)
    assert "--images, --category, --output" in line and "`" not in line
    # settings whose flag is spelt differently: the parser's own actions say which flag sets them
    config = tmp_path / "run.yaml"
    config.write_text("stage3_mode: half\n")
    line = _one_line_error(capsys, [*TRAIN, "--config", str(config)], 2)
    assert "--stage3 must be 'lora' or 'full', got 'half'" in line
    config.write_text("stage2:\n  learning_rate: -1\n")
    line = _one_line_error(capsys, [*TRAIN, "--config", str(config)], 2)
    assert "stage2: --learning-rates must be > 0, got -1" in line
    assert _one_line_error(capsys, ["demo", "--concept-seed", "-1"], 2).startswith(
        "attndb demo: error: --concept-seed -1: expected"
    )


def test_cli_modules_import_one_way_and_at_the_top():
    """world/cli.py and cli_args.py never import cli.py; no function imports one of the package's modules."""
    import ast
    from pathlib import Path

    root = Path(cli.__file__).parent
    for name in ("cli.py", "cli_args.py", "world/cli.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local = [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.level > 0]
                assert not local, f"{name}:{node.name} imports {[n.module for n in local]}"
            if isinstance(node, ast.ImportFrom) and name != "cli.py":
                assert not (node.level > 0 and node.module == "cli"), name


def test_warnings_logged_during_a_command_name_its_flags(monkeypatch, caplog):
    import logging

    def warns(args):
        logging.getLogger("attndb_peft.data").warning("%s %s: smaller than `resolution`", "`concept_seed`", 3)
        return 0

    monkeypatch.setattr(cli, "_cmd_demo", warns)
    with caplog.at_level("WARNING", logger="attndb_peft"):
        assert main(["demo", "--quiet"]) == 0
    # demo has --concept-seed but no --resolution: only the flags of the command that ran are shown
    assert "--concept-seed 3: smaller than `resolution`" in caplog.text
    logging.getLogger("attndb_peft.data").warning("`concept_seed` outside the CLI")
    assert "`concept_seed` outside the CLI" in caplog.text  # the filter is gone once main returns
