# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The "will it fit" table of docs/performance.md: `attndb estimate` for the released architectures (SD 1.5,
SD 2.1-base, SD 2.1 at 768 px, SDXL), stage 3 LoRA and full, at the default and the low-memory setting
(`--gradient-checkpointing --offload-frozen`), with the paper's steps: each stage's predicted peak and the
recipe's predicted training time on common cards. Everything is counted on the meta device (a CPU suffices:
about 10 minutes for the 16 runs).

    python benchmarks/estimate_table.py            # writes benchmarks/results/estimator/table.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from attndb_peft.config import AttnDBConfig
from attndb_peft.estimator.architectures import ARCHITECTURES
from attndb_peft.estimator.estimate import estimate_run
from attndb_peft.estimator.gpus import ALLOCATOR_HEADROOM, GPUS

OUT = Path(__file__).resolve().parent / "results" / "estimator"
CARDS = {"h100": "H100", "a100": "A100 80GB", "l4": "L4", "rtx4090": "RTX 4090", "rtx3090": "RTX 3090"}
SETTINGS = {"default": {}, "low-memory": {"gradient_checkpointing": True, "offload_frozen": True}}


def rows(architectures, modes):
    for name in architectures:
        for mode in modes:
            for setting, overrides in SETTINGS.items():
                config = AttnDBConfig(model=name, images="-", category="dog", output="-", stage3_mode=mode)
                config = dataclasses.replace(config, **overrides)
                started = time.perf_counter()
                estimate = estimate_run(config, suggest=False)
                yield {
                    "architecture": ARCHITECTURES[name].title,
                    "stage3": mode,
                    "setting": setting,
                    "batch": f"{estimate.config.batch_size} x {estimate.config.gradient_accumulation_steps}",
                    "checkpointing": estimate.config.gradient_checkpointing,
                    "offload": estimate.config.offload_frozen,
                    "peak_gib": {p.name: round(p.total_gib, 2) for p in estimate.phases},
                    "needs_gib": round(estimate.peak_gib * (1 + ALLOCATOR_HEADROOM), 1),
                    "minutes": {k: [round(t / 60, 1) for t in estimate.seconds(GPUS[k])] for k in CARDS},
                    "fits": {k: estimate.fits(GPUS[k].usable_gib()) for k in CARDS} | {
                        f"{gib} GiB": estimate.fits(gib - 0.5) for gib in (12, 16, 24)
                    },
                    "counted_in_s": round(time.perf_counter() - started, 1),
                }


def markdown(table: list[dict]) -> str:
    head = ["architecture", "stage 3", "setting", "batch", "peak GiB: latents / 1 / 2 / 3 / samples"]
    head += ["fits 12 / 16 / 24 GiB"]
    head += [f"minutes on {short}" for short in CARDS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        peaks = " / ".join(f"{v:.1f}" for v in r["peak_gib"].values())
        fits = " / ".join("yes" if r["fits"][f"{g} GiB"] else "no" for g in (12, 16, 24))
        times = [_span(*r["minutes"][k]) for k in CARDS]
        lines.append("| " + " | ".join([r["architecture"], r["stage3"], r["setting"], r["batch"], peaks, fits,
                                        *times]) + " |")
    return "\n".join(lines)


def _span(low: float, high: float) -> str:
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--architectures", default=",".join(ARCHITECTURES), help="Comma-separated ARCHITECTURES keys.")
    p.add_argument("--modes", default="lora,full", help="Stage-3 modes.")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    table = []
    for row in rows(a.architectures.split(","), a.modes.split(",")):
        print(json.dumps(row), flush=True)
        table.append(row)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    (a.out / "table.md").write_text(markdown(table) + "\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
