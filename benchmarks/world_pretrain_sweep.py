"""Pretrain several world base models from scratch and compare their held-out scores (the base model's bar of
held-out category >= 85 %).

Each variant is one `attndb world pretrain` run (`world.pretrain.pretrain`, the command's own code) with a few settings
changed from the defaults, scored by its own `evaluation.json` (30 held-out captions x 3 seeds at the default
sampler) and by what the base is for, personalization: a short attndb run on concept 11 and the concept in every
context (`world.evaluation.evaluate_personalization`; the step-1,800 plain-loss model keeps the context in 14 of 15
pictures, the frozen-encoder, object-weighted candidate in 4, the shipped model in 15). On the 2-core CPU one
variant takes about 70-90 minutes (joint_obj4_3600 about 100); on a GPU a few minutes (an estimate, not measured
yet), which is what this script is for: one GPU runs the whole sweep in a sitting.

    python benchmarks/world_pretrain_sweep.py --tiny --only joint_plain --out /tmp/sweep  # CPU, seconds: the plumbing
    python benchmarks/world_pretrain_sweep.py --device cuda --out sweep                   # every variant below
    python benchmarks/world_pretrain_sweep.py --device cuda --only joint_obj1 frozen_obj1 --out sweep

Run it from the repository root (with `PYTHONPATH=.` where attndb_peft is not installed). Results:
`OUT/sweep.json` (settings, device, seconds and held-out/training scores per variant, written after each one) and
each variant's run folder `OUT/NAME` (its pipeline is a base model that any `--model` flag takes as
`OUT/NAME/pipeline`). A finished variant is skipped when the script runs again, so a sweep cut off by a time limit
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from attndb_peft.testing import TINY_PRETRAIN_SETTINGS
from attndb_peft.world.evaluation import evaluate_base, evaluate_personalization
from attndb_peft.world.model import load_world_pipeline
from attndb_peft.world.pretrain import PretrainConfig, pretrain

__all__ = ["KEYS", "VARIANTS", "main"]

#: The settings the variants differ in, at the step-1,800 recipe the sweep started from (plain MSE, jointly trained
#: text encoder); every variant spells them out, so a name keeps its meaning when `PretrainConfig()` changes.
_STARTED_FROM = {"steps": 1800, "object_loss_weight": 0.0, "train_text_encoder": True, "unet_layers_per_block": 1}
#: name -> settings changed from `_STARTED_FROM`, the untried ones first. Frozen text encoder: SD keeps CLIP frozen,
#: and the jointly trained one merged `ball` and `box`; the object weight puts the loss on the shape (and, at 4 with a
#: frozen encoder, cost personalised prompts their context); depth and steps are the capacity and training the CPU
#: could not afford. Measured on the CPU (README): joint_plain (shipped until 2026-11-28), frozen, frozen_obj4,
#: joint_obj4 (held-out category 75.6 %, context kept under personalization), joint_obj4_lpb2 (72.2 %) and
#: joint_obj4_3600 (95.6 %, every bar met: shipped since 2026-11-28 and `PretrainConfig()`'s defaults;
#: `--seed 1 --only joint_obj4_3600` checks another seed). A wider U-Net is no variant: the width must be a multiple
#: of 32 (GroupNorm), and 96 already makes the U-Net 9.4 M parameters, over the package's 20 MB budget with the VAE;
#: two layers a block give 6.13 M.
_CHANGES: dict[str, dict] = {
    "joint_obj1": {"object_loss_weight": 1.0},
    "frozen_obj1": {"train_text_encoder": False, "object_loss_weight": 1.0},
    "joint_obj4_lpb2_6k": {"object_loss_weight": 4.0, "unet_layers_per_block": 2, "steps": 6000},
    "joint_obj4_lpb2": {"object_loss_weight": 4.0, "unet_layers_per_block": 2},
    "joint_obj4_3600": {"object_loss_weight": 4.0, "steps": 3600},
    "joint_obj4": {"object_loss_weight": 4.0},
    "joint_plain": {},
    "frozen": {"train_text_encoder": False},
    "frozen_obj4": {"train_text_encoder": False, "object_loss_weight": 4.0},
}
VARIANTS: dict[str, dict] = {name: {**_STARTED_FROM, **changes} for name, changes in _CHANGES.items()}
KEYS = ("context", "style", "colour", "category")


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep (see the module docstring).

    Args:
        argv (`list[str]`, *optional*): the command line without the program name (default: `sys.argv[1:]`).

    Returns:
        `dict`: what `OUT/sweep.json` holds: `device`, `torch` and, per variant, its settings, seconds, held-out
        and training scores and personalization summary (`finished` once it is complete).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="Folder for the runs and sweep.json.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="Run these variants (default: all).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="Tiny models, 4 steps, scored with one seed and a 2-step sampler: checks the plumbing in "
                   "seconds a variant.")
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
        config = PretrainConfig(seed=args.seed, **{**VARIANTS[name], **(TINY_PRETRAIN_SETTINGS if args.tiny else {})})
        start = time.perf_counter()
        # --tiny scores with one seed and a 2-step sampler (pretrain's own evaluation draws 180 pictures at 25
        # steps): the numbers mean nothing either way, and the plumbing is the same
        folder = pretrain(args.out / name, config, evaluate=not args.tiny, device=args.device)
        log = json.loads((args.out / name / "pretrain.json").read_text())
        if args.tiny:
            evaluation = evaluate_base(load_world_pipeline(folder, device=args.device), seeds=(0,), steps=2)
            personalization = evaluate_personalization(folder, steps=(2, 2, 2), seeds=(0,))
        else:
            evaluation = log["evaluation"]
            personalization = evaluate_personalization(folder, steps=(30, 40, 80))
        variants[name] = {
            "settings": asdict(config),
            "seconds": round(time.perf_counter() - start, 1),
            "vae_seconds": log.get("vae_seconds"),
            "unet_seconds": log.get("unet_seconds"),
            "held_out": {k: evaluation["held_out"][k] for k in KEYS},
            "train": {k: evaluation["train"][k] for k in KEYS},
            "personalization": {k: personalization[k] for k in ("context_ok", "present", "identity_ok")},
            "finished": True,
        }
        summary_file.write_text(json.dumps(summary, indent=1))
        print(name, json.dumps({k: variants[name][k] for k in ("seconds", "held_out", "personalization")}),
              flush=True)
    return summary


if __name__ == "__main__":
    main()
