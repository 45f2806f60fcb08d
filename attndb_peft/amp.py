# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Turning autocast off for a block of float32 math, under torch's autocast and under the memory estimator's
emulation of CUDA autocast (`estimator.accounting.CudaAutocast`, which counts steps on the `meta` device, where
torch has no autocast)."""

from __future__ import annotations

import threading

import torch

__all__ = ["autocast_off", "autocast_suspended"]

_state = threading.local()


class _AutocastOff:
    """Torch's autocast off on the device (where it has one) and the emulation told to stand aside."""

    def __init__(self, device_type: str) -> None:
        available = torch.amp.is_autocast_available(device_type)
        self._torch = torch.autocast(device_type, enabled=False) if available else None

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        if self._torch is not None:
            self._torch.__enter__()

    def __exit__(self, *exc) -> None:
        if self._torch is not None:
            self._torch.__exit__(*exc)
        _state.depth -= 1


def autocast_off(device_type: str):
    """A context manager running its block without autocast on `device_type` (a no-op for torch on devices
    without autocast, such as `meta`); an emulated autocast asks `autocast_suspended` and stands aside too. Under
    `torch.compile` it is torch's own `autocast(enabled=False)`, which compiles without a graph break (the
    estimator never compiles)."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return _AutocastOff(device_type)


def autocast_suspended() -> bool:
    """Whether the current thread is inside `autocast_off`."""
    return getattr(_state, "depth", 0) > 0
