"""Pretrain several world base models from scratch and compare their held-out scores (issue 9's category bar).

Each variant is one `attndb world pretrain` run (`world.model.pretrain`, the command's own code) with a few settings
changed from the defaults, scored by its own `evaluation.json` (30 held-out captions x 3 seeds at the default
sampler). On the 2-core CPU one variant takes about an hour; on a GPU a few minutes, which is what this script is
for: a lent device runs the sweep in one call.

    python benchmarks/world_pretrain_sweep.py --tiny --out /tmp/sweep          # CPU, about a minute: the plumbing
    python benchmarks/world_pretrain_sweep.py --device cuda --out sweep         # every variant below
    python benchmarks/world_pretrain_sweep.py --device cuda --only frozen_obj4 frozen_obj4_w128 --out sweep

On a device machine without diffusers, carry its wheel (see the device tool's README) and run from the repository
root with `PYTHONPATH=.`. Results: `OUT/sweep.json` (settings, device, seconds and held-out/training scores per
variant, written after each one) and each variant's run folder `OUT/NAME` (its pipeline is a base model that
`attndb world base`-style use takes with `--model OUT/NAME/pipeline`). A finished variant is skipped when the
script runs again, so a sweep cut off by a time limit continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from attndb_peft.world.model import PretrainConfig, pretrain

#: name -> settings changed from `PretrainConfig()` (the shipped recipe). Frozen text encoder: SD keeps CLIP frozen,
#: and the jointly trained one merged `ball` and `box`; the object weight puts the loss on the shape; width and
#: steps are the capacity and training the CPU could not afford.
VARIANTS: dict[str, dict] = {
    "shipped": {},
    "frozen": {"train_text_encoder": False},
    "frozen_obj4": {"train_text_encoder": False, "object_loss_weight": 4.0},
    "frozen_obj4_w128": {"train_text_encoder": False, "object_loss_weight": 4.0, "unet_width": 128},
    "frozen_obj4_6k": {"train_text_encoder": False, "object_loss_weight": 4.0, "steps": 6000},
}
#: --tiny: the sizes of the unit tests' runs (seconds on a CPU; the scores mean nothing).
TINY = dict(steps=4, batch_size=4, num_images=24, vae_steps=2, vae_images=16, vae_batch_size=4, checkpoint_every=2,
            threads=1, unet_width=32, text_width=32, text_layers=1)
KEYS = ("context", "style", "colour", "category")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="Folder for the runs and sweep.json.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="Run these variants (default: all).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="Tiny models and 4 steps: checks the plumbing in seconds.")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    summary_file = args.out / "sweep.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary.setdefault("device", torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
    summary.setdefault("torch", torch.__version__)
    variants = summary.setdefault("variants", {})
    for name in args.only or VARIANTS:
        if name in variants and variants[name].get("finished"):
            print(f"{name}: done before, skipped", flush=True)
            continue
        # --tiny overrides the variant's sizes too (its steps and width), so every variant takes seconds
        config = PretrainConfig(seed=args.seed, **{**VARIANTS[name], **(TINY if args.tiny else {})})
        start = time.perf_counter()
        pretrain(args.out / name, config, evaluate=True, device=args.device)
        log = json.loads((args.out / name / "pretrain.json").read_text())
        evaluation = log["evaluation"]
        variants[name] = {
            "settings": asdict(config),
            "seconds": round(time.perf_counter() - start, 1),
            "vae_seconds": log.get("vae_seconds"),
            "unet_seconds": log.get("unet_seconds"),
            "held_out": {k: evaluation["held_out"][k] for k in KEYS},
            "train": {k: evaluation["train"][k] for k in KEYS},
            "finished": True,
        }
        summary_file.write_text(json.dumps(summary, indent=1))
        print(name, json.dumps({k: variants[name][k] for k in ("seconds", "held_out", "train")}), flush=True)
    return summary


if __name__ == "__main__":
    main()
