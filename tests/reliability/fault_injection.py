# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Run `attndb` and SIGKILL the process at a chosen point (used by test_reliability.py).

    python tests/reliability/fault_injection.py POINT N -- train --model ...

POINT is where the N-th event kills the process:
- `loss`: the N-th computation of the diffusion loss (inside a training step, between checkpoints);
- `commit`: the N-th checkpoint commit, after its files were written and before the folder is renamed;
- `export`: the N-th file moved into place by the exporter (a half-replaced adapter folder).
"""

import os
import signal
import sys


def _kill_on(count: int):
    calls = {"n": 0}

    def maybe_kill():
        calls["n"] += 1
        if calls["n"] == count:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill


def main() -> None:
    point, count, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: fault_injection.py POINT N -- ATTNDB ARGS"
    maybe_kill = _kill_on(int(count))

    from attndb_peft import checkpoints, export
    from attndb_peft.training import step

    if point == "loss":
        original_loss = step.diffusion_loss

        def diffusion_loss(*args, **kwargs):
            maybe_kill()
            return original_loss(*args, **kwargs)

        step.diffusion_loss = diffusion_loss
    elif point == "commit":
        original_commit = checkpoints.commit

        def commit(tmp, state):
            maybe_kill()
            return original_commit(tmp, state)

        checkpoints.commit = commit
    elif point == "export":
        original_replace = os.replace

        class _Os:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                maybe_kill()
                return original_replace(src, dst)

        export.os = _Os()
    else:
        raise SystemExit(f"unknown kill point {point!r}")

    from attndb_peft.cli import main as attndb_main

    sys.exit(attndb_main(argv))


if __name__ == "__main__":
    main()
