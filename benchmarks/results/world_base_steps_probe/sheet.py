"""Issue 9 diagnostic: the shipped base model's held-out pictures (seed 0) next to ground-truth renders of the
same captions, one pair of rows per category (box, ball, cone), 4x enlarged: held_out_seed0_sheet.png. Prints the
category the scorer reads off each generated picture. `python sheet.py PIPELINE_DIR NAME` does the same for another
base model and writes held_out_seed0_sheet_NAME.png."""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attndb_peft.world import scenes as W
from attndb_peft.world.evaluation import generate
from attndb_peft.world.model import SHIPPED_DIR, load_world_pipeline
from attndb_peft.world.scorers import score_image

torch.set_num_threads(1)
pipe = load_world_pipeline(sys.argv[1] if len(sys.argv) > 1 else SHIPPED_DIR)
pipe.set_progress_bar_config(disable=True)
_, held = W.split_scenes(30, seed=1)
rows = []
for category in ("box", "ball", "cone"):
    scenes = [s for s in held if s.category == category]
    images = generate(pipe, [W.caption(s) for s in scenes], seed=0)
    rng = np.random.default_rng(0)
    truth = [W.render(s, rng)[0] for s in scenes]
    print(category, [score_image(i, s)["category"] for i, s in zip(images, scenes)])
    rows += [np.concatenate(images, 1), np.concatenate(truth, 1)]
width = max(r.shape[1] for r in rows)
rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
sheet = Image.fromarray(np.concatenate(rows, 0))
sheet = sheet.resize((sheet.width * 4, sheet.height * 4), Image.NEAREST)
suffix = f"_{sys.argv[2]}" if len(sys.argv) > 2 else ""
sheet.save(Path(__file__).with_name(f"held_out_seed0_sheet{suffix}.png"))
