"""Issue 9 probe (run on 2026-11-27, 2-core CPU, 1 thread; ~3 min per setting): the shipped base model's held-out scores at other guidance scales and step counts."""
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from attndb_peft.world.model import SHIPPED_DIR, load_world_pipeline
from attndb_peft.world.evaluation import evaluate_base
pipe = load_world_pipeline(SHIPPED_DIR)
pipe.set_progress_bar_config(disable=True)
out = {}
for steps, g in [(25, 5.0), (25, 2.5), (25, 7.5), (25, 10.0), (50, 7.5)]:
    t = time.time()
    r = evaluate_base(pipe, steps=steps, guidance=g)
    out[f"{steps}-{g}"] = r
    print(steps, g, "held", {k: r["held_out"][k] for k in ("context", "style", "colour", "category")},
          "train", {k: r["train"][k] for k in ("context", "style", "colour", "category")}, round(time.time() - t), flush=True)
json.dump(out, open(Path(__file__).with_name("guidance.json"), "w"), indent=1)
