# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The command line: every flag is described, errors are one line (traceback only with --verbose)."""

from __future__ import annotations

import argparse

import pytest

from attndb_peft import cli
from attndb_peft.cli import build_parser, config_from_args, main

COMMANDS = ("train", "generate", "inspect", "evaluate", "push", "export", "demo")


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
    assert set(_subparsers(parser)) == {*COMMANDS, "world"}  # world's subcommands: tests/test_world_scorers.py
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
