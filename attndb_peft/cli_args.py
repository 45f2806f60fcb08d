# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Argument helpers shared by `attndb` (`cli.py`) and `attndb world` (`world/cli.py`).

The `attndb train` flags are not written by hand: `add_config_arguments` builds them from the metadata of
`AttnDBConfig`'s and `StageConfig`'s fields (see `config.setting` for the keys), the way transformers'
`HfArgumentParser` builds flags from a dataclass, and `config_from_args` turns the parsed flags back into an
`AttnDBConfig`. A new setting is therefore one field with its metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from typing import Any

from .config import AttnDBConfig, ConfigError, StageConfig, read_config_file
from .errors import arg

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "TRAIN_GROUPS",
    "HelpFormatter",
    "Parser",
    "add_common",
    "add_config_arguments",
    "config_from_args",
    "flag_names",
    "multiple_of_8",
    "non_negative_int",
    "parser_that_ran",
    "per_stage",
    "positive_int",
    "show_flags",
    "three",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

#: The `attndb train --help` sections, by a field's `group` metadata, in the order shown.
TRAIN_GROUPS = {
    "model": "base model",
    "data": "instance data and token",
    "stages": "training stages",
    "memory": "memory and speed",
    "output": "output, checkpoints and the Hub",
    "logging": "logging and sample grids",
    "scoring": "scored checkpoints and selection",
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with the default appended to every option that takes a value and whose help does
    not state it already (a flag's default is part of what it does)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        if action.nargs == 0:  # a switch: its "default" is the value it flips, which would only mislead
            return text
        return f"{text} Default: %(default)s."


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse's default prints the whole usage block first) and
    `HelpFormatter` for itself and every subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- value types ------------------------------------------------------------------------------------------
def _whole_number(text: str, minimum: int, expected: str, too_small: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {too_small}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole_number(text, 1, "a whole number", "a number >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (e.g. a seed)."""
    return _whole_number(text, 0, "a non-negative whole number", "a non-negative whole number")


def multiple_of_8(text: str) -> int:
    """argparse type: a positive multiple of 8 (image sides: the VAE downsamples by 8)."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 (the VAE's downsampling), got {value}")
    return value


def three(kind):
    """argparse type: exactly three comma-separated values of `kind` (stages 1, 2, 3)."""

    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three comma-separated values (stage 1,2,3), got {text!r}")
        try:
            return tuple(kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected three {kind.__name__} values like '60,100,500', got {text!r}"
            ) from None

    return parse


def per_stage(kind, stages: tuple[int, ...] = (1, 2, 3)):
    """argparse type: one value for every stage in `stages`, or one value each (comma-separated). Returns a
    3-tuple (stages 1, 2, 3) with None for the stages not covered."""
    example = ",".join(["constant" if kind is str else "1"] * len(stages))

    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            parts = parts * len(stages)
        if len(parts) != len(stages):
            names = ",".join(map(str, stages))
            raise argparse.ArgumentTypeError(
                f"expected one value, or {len(stages)} comma-separated values (stages {names}), got {text!r}"
            )
        try:
            values = dict(zip(stages, (kind(p) for p in parts)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} values like '{example}', got {text!r}"
            ) from None
        return tuple(values.get(stage) for stage in (1, 2, 3))

    return parse


def add_common(parser: argparse.ArgumentParser) -> None:
    """`-v/--verbose` and `-q/--quiet`, which every command has."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="Debug logging, and tracebacks on errors.")
    group.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors; no progress bars.")


# -- flags from the config's fields -----------------------------------------------------------------------
#: Short metavars by value type, so the help's option column stays narrow.
_METAVARS = {int: "N", float: "X"}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _flag(f: dataclasses.Field) -> str | None:
    """The option string of a field (`flag` metadata, else `--field-name`); None for a field without one."""
    flag = f.metadata.get("flag", "")
    return ("--" + f.name.replace("_", "-")) if flag == "" else flag


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # the annotations are strings under `from __future__ import annotations`; evaluating them is per class
    return typing.get_type_hints(cls)


def _value_type(cls: type, f: dataclasses.Field) -> Any:
    """The field's type without `| None`."""
    hint = _type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _help(f: dataclasses.Field, default: str | None) -> str:
    """A field's help with its default appended, unless the help already states it ("Default: ...")."""
    text = f.metadata["help"]
    if "Default:" in text:
        return text
    if default is None:
        return f"{text} Required (here or in --config)."
    return f"{text} Default: {f.metadata.get('default_text', default)}."


def _stage_defaults() -> tuple[StageConfig, ...]:
    # stage 3's learning rate is only known once stage3_mode is, so read the defaults off a built config
    return AttnDBConfig(model="m", images="i", category="c", output="o").stages


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `AttnDBConfig` field with a flag and one per-stage flag per `StageConfig` field with a
    flag, in the `TRAIN_GROUPS` sections.

    Every flag's argparse default is None, so `config_from_args` can tell a flag given from one left out (a
    `--config` file's value then stands). Booleans get both forms (`--flip` / `--no-flip`). Each action carries
    `setting`, the field it sets, so error messages naming the field can show the flag (`show_flags`).
    """
    groups = {name: parser.add_argument_group(title) for name, title in TRAIN_GROUPS.items()}
    groups["stages"].description = (
        "Per-stage flags take one value for every stage they cover or one per stage: --steps 60,100,500."
    )
    for f in dataclasses.fields(AttnDBConfig):
        flag = _flag(f)
        if flag is None:
            continue
        kind = _value_type(AttnDBConfig, f)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else _show(f.default)
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f, default)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            options["nargs"] = "*"
        elif kind is not str:
            options["type"] = kind
            options["metavar"] = _METAVARS[kind]
        for key in ("choices", "metavar"):
            if key in f.metadata:
                options[key] = f.metadata[key]
        action = groups[f.metadata["group"]].add_argument(flag, **options)
        action.setting = f.name
    defaults = _stage_defaults()
    for f in dataclasses.fields(StageConfig):
        flag = _flag(f)
        if flag is None:
            continue
        stages = f.metadata["stages"]
        names = ",".join(map(str, stages))
        shown = ",".join(_show(getattr(defaults[s - 1], f.name)) for s in stages)
        text = _help(f, shown).replace(" Default:", f" Stages {names}. Default:", 1)
        kind = _value_type(StageConfig, f)
        metavar = ",".join([_METAVARS.get(kind, "NAME")] * len(stages))
        action = groups["stages"].add_argument(
            flag, type=per_stage(kind, stages), default=None, metavar=metavar, help=text
        )
        action.setting = f.name


def config_from_args(args: argparse.Namespace) -> AttnDBConfig:
    """Merge `--config` file values with the flags given (flags win) into an `AttnDBConfig`."""
    values = read_config_file(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(AttnDBConfig)}
    for name, value in vars(args).items():
        if name in names and value is not None:
            values[name] = value
    missing = [arg(n) for n in ("model", "images", "category", "output") if not values.get(n)]
    if missing:
        raise ConfigError(
            f"missing required argument(s): {', '.join(missing)} (on the command line or in {arg('config')})."
        )
    config = AttnDBConfig.from_dict(values, source=args.config or "arguments")
    stage_values = {
        f.name: getattr(args, _flag(f).lstrip("-").replace("-", "_"))
        for f in dataclasses.fields(StageConfig)
        if _flag(f) is not None
    }
    if any(v is not None for v in stage_values.values()):
        config = config.with_stage_values(**stage_values)
    return config


# -- error messages: settings -> flags ---------------------------------------------------------------------
def parser_that_ran(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that parsed `args`: follow the chosen subcommand down, e.g. `attndb world score`."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) not in sub.choices:
            return parser
        parser = sub.choices[getattr(args, sub.dest)]


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """`{dest or setting: its long option string}` for every option of `parser` (`stage3_mode` -> `--stage3`)."""
    names = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long:
            names.setdefault(action.dest, long[0])
            names.setdefault(getattr(action, "setting", action.dest), long[0])
    return names


def show_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with each `` `name` `` (how `errors.arg` writes a setting) that is an option of `parser`
    replaced by that option's flag; other marked names stay as they are."""
    names = flag_names(parser)
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: names.get(m.group(1), m.group(0)), message)
