# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The examples run end to end in their offline tiny mode (no --model)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("train_load_generate.py", ["generated.png"]),
        ("mix_concept_and_style.py", ["concept0.9-style0.png", "concept0-style0.6.png", "concept0.9-style0.6.png"]),
        ("two_concepts.py", ["both.png", "b-only.png"]),
    ],
)
def test_example_runs_offline(script, outputs, tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scripts import their sibling _tiny.py
    monkeypatch.setattr(sys, "argv", [script, "--output", str(tmp_path / "out")])
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    for name in outputs:
        assert (tmp_path / "out" / name).is_file(), name
    assert "Traceback" not in capsys.readouterr().err
