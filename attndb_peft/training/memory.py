# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""A GPU run's memory check: each stage's peak predicted when the run starts (`estimator`) and measured at its end
(`torch.cuda.max_memory_allocated` since the stage began), logged side by side, so every real run checks the
estimator."""

from __future__ import annotations

import logging

import torch

from ..config import AttnDBConfig
from ..estimator.estimate import estimate_run
from ..estimator.gpus import local_gpu
from ..reporting import memory_check

__all__ = ["StageMemory"]

logger = logging.getLogger(__name__)


class StageMemory:
    """Predicted and measured peak GPU memory per stage (GiB); does nothing off CUDA.

    Args:
        device (`torch.device`): the run's device.
        log (`bool`): whether this process logs (the main process).
    """

    def __init__(self, device: torch.device, log: bool) -> None:
        self.device, self.log = device, log
        self.predicted: dict[int, float] = {}
        self.measured: dict[int, float] = {}

    def predict(self, config: AttnDBConfig) -> None:
        """With `predict_memory` on a GPU: predict each stage's peak (on this card) and log it, with the settings
        that would fit when it is predicted not to. A prediction that fails is logged and the run goes on."""
        if self.device.type != "cuda" or not config.predict_memory or not self.log:
            return
        try:
            estimate = estimate_run(config, gpu=local_gpu())
        except Exception as exc:  # the prediction is a report, never a reason to stop a run
            logger.warning("Memory prediction skipped (%s: %s).", type(exc).__name__, exc)
            return
        self.predicted = {int(p.name.split()[-1]): p.total_gib for p in estimate.phases if p.name.startswith("stage")}
        logger.info(
            "Predicted peak GPU memory per stage: %s GiB (attndb estimate; measured at each stage's end).",
            ", ".join(f"{s}: {g:.2f}" for s, g in sorted(self.predicted.items())),
        )
        if estimate.suggestions:  # predicted not to fit this card: say what would, before it runs out
            logger.warning(
                "The predicted peak (%.2f GiB) may not fit this GPU's %.1f GiB; the run may stop out of memory. "
                "Predicted with the same images per step: %s.",
                estimate.peak_gib,
                estimate.gpu_memory_gib,
                "; ".join(f"{text} {peak:.2f} GiB" for text, peak in estimate.suggestions),
            )

    def run_peak(self) -> float:
        """The run's peak GPU memory (GiB): the highest stage peak, or what was allocated since the last stage
        began (the export) when higher; 0.0 off CUDA."""
        if self.device.type != "cuda":
            return 0.0
        return max([torch.cuda.max_memory_allocated(self.device) / 2**30, *self.measured.values()])

    def stage_started(self) -> None:
        if self.device.type == "cuda":  # each stage's own peak
            torch.cuda.reset_peak_memory_stats(self.device)

    def stage_ended(self, stage: int) -> None:
        if self.device.type != "cuda":
            return
        self.measured[stage] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.log:
            logger.info(memory_check(stage, self.measured[stage], self.predicted.get(stage)))
