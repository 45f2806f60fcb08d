"""Issue 9 probe (run on 2026-11-27, 2-core CPU, 1 thread; ~3 min per setting): the shipped world base model's
held-out scores at other guidance scales and step counts of its DDIM sampler."""

import json
import time
from pathlib import Path

import torch

from attndb_peft.world.evaluation import evaluate_base
from attndb_peft.world.model import SHIPPED_DIR, load_world_pipeline

KEYS = ("context", "style", "colour", "category")

torch.set_num_threads(1)
pipe = load_world_pipeline(SHIPPED_DIR)
pipe.set_progress_bar_config(disable=True)
out = {}
for steps, guidance in [(25, 5.0), (25, 2.5), (25, 7.5), (25, 10.0), (50, 7.5)]:
    started = time.time()
    result = evaluate_base(pipe, steps=steps, guidance=guidance)
    out[f"{steps}-{guidance}"] = result
    held = {k: result["held_out"][k] for k in KEYS}
    train = {k: result["train"][k] for k in KEYS}
    print(steps, guidance, "held", held, "train", train, round(time.time() - started), flush=True)
Path(__file__).with_name("guidance.json").write_text(json.dumps(out, indent=1))
