# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The one error family: everything attndb_peft raises on purpose is an `AttnDBError`.

Two branches, and the CLI's exit code follows from the branch (`exit_code`):

- `UsageError` (exit 2): bad input or usage, found before anything is written. The message names the argument,
  the value received and the fix.
- `RunError` (exit 1): a failure during the run (divergence, out of memory, the Hub refusing a push, an
  unreadable checkpoint). What was written before it (checkpoints, the adapter folder) is said in the message.

Messages name settings the way Python callers spell them, marked with `arg`: "`token` 'dog' already exists".
The CLI shows the same message with its flag instead ("--token 'dog' already exists"), so one message serves
both without the library knowing about flags.
"""

from __future__ import annotations

__all__ = ["AttnDBError", "RunError", "UsageError", "arg", "first_line"]


class AttnDBError(Exception):
    """Base class of every error attndb_peft raises on purpose: `except attndb_peft.AttnDBError` catches them."""

    #: The `attndb` command's exit status for this error.
    exit_code = 1


class UsageError(AttnDBError, ValueError):
    """Bad input or usage, found before anything is written (CLI exit code 2). The message names the argument,
    the value received and the fix."""

    exit_code = 2


class RunError(AttnDBError, RuntimeError):
    """A failure during the run (CLI exit code 1). The message says what was kept."""

    exit_code = 1


def arg(name: str) -> str:
    """How a message names the setting or argument `name`: `` `name` `` for Python callers; the CLI replaces it
    with the option that sets it (`--name`)."""
    return f"`{name}`"


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: library messages can run for many lines; a one-line error shows this."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
