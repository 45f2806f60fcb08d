"""Issue 9 probe: are the EMA weights what blurs the boxes? Scores a pretraining run's raw (non-EMA) U-Net weights of
its last checkpoint with `evaluate_base` (the same 30 held-out + 30 training captions x 3 seeds as
`evaluation.json`, which scores the EMA weights).

Usage: python raw_weights.py RUN_DIR   (run 2026-11-28 on the frozen-text-encoder run, 2 threads:
raw_weights_frozen.json)
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from attndb_peft.world.evaluation import evaluate_base
from attndb_peft.world.model import load_world_pipeline

torch.set_num_threads(2)
run = Path(sys.argv[1])
pipe = load_world_pipeline(run / "pipeline")
pipe.unet.load_state_dict(load_file(str(run / "checkpoint" / "unet.safetensors")))
print(json.dumps(evaluate_base(pipe), indent=1))
