# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Turning autocast off for a block of float32 math, under torch's autocast and under the memory estimator's
emulation of CUDA autocast (`estimator.accounting.CudaAutocast`, which counts steps on the `meta` device, where
torch has no autocast)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["autocast_off", "autocast_suspended"]

_state = threading.local()


@contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Run the block without autocast on `device_type` (a no-op for torch on devices without autocast, such as
    `meta`); an emulated autocast asks `autocast_suspended` and stands aside too."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        if torch.amp.is_autocast_available(device_type):
            with torch.autocast(device_type, enabled=False):
                yield
        else:
            yield
    finally:
        _state.depth = depth


def autocast_suspended() -> bool:
    """Whether the current thread is inside `autocast_off`."""
    return getattr(_state, "depth", 0) > 0
