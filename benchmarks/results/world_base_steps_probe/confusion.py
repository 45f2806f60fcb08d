"""Issue 9 diagnostic: where the shipped world base model's shapes go wrong. The 30 held-out captions x 3 seeds
at the default sampler (what `evaluate_base` scores), with the category the scorer reads off each picture, per
asked category and per style; next to it the same captions rendered as ground truth (one render per seed), read
by the same scorer. Writes confusion.json (the shipped model) or confusion_NAME.json (python confusion.py
PIPELINE_DIR NAME) beside this file."""

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from attndb_peft.world import scenes as W
from attndb_peft.world.evaluation import generate
from attndb_peft.world.model import SHIPPED_DIR, load_world_pipeline
from attndb_peft.world.scorers import score_image

torch.set_num_threads(1)
folder = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED_DIR
out_name = f"confusion_{sys.argv[2]}.json" if len(sys.argv) > 2 else "confusion.json"
pipe = load_world_pipeline(folder)
pipe.set_progress_bar_config(disable=True)
_, held = W.split_scenes(30, seed=1)
prompts = [W.caption(s) for s in held]
rows = {"generated": [], "ground_truth": []}
for seed in (0, 1, 2):
    images = generate(pipe, prompts, seed=1000 * seed)
    rng = np.random.default_rng(seed)
    for scene, image in zip(held, images):
        for kind, picture in (("generated", image), ("ground_truth", W.render(scene, rng)[0])):
            r = score_image(picture, scene)
            record = {"asked": scene.category, "style": scene.style, "read": r["category"], "area": r["area"]}
            rows[kind].append(record)


def summary(records):
    out = {"by_category": {}, "by_style": {}}
    for key, field in (("by_category", "asked"), ("by_style", "style")):
        groups = defaultdict(list)
        for r in records:
            groups[r[field]].append(r)
        for name, group in sorted(groups.items()):
            out[key][name] = {
                "n": len(group),
                "right": round(float(np.mean([r["read"] == r["asked"] for r in group])), 3),
                "read_as": dict(Counter(str(r["read"]) for r in group)),
                "mean_area_px": round(float(np.mean([r["area"] for r in group])), 1),
            }
    out["right"] = round(float(np.mean([r["read"] == r["asked"] for r in records])), 4)
    return out


result = {kind: summary(records) for kind, records in rows.items()}
Path(__file__).with_name(out_name).write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
