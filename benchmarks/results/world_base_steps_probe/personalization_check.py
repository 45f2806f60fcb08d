"""Issue 9 check: does a base model still let a personalised prompt keep its context? The suite's short attndb run
(`tests/test_world_demo.py::test_a_short_attndb_run_learns_a_world_concept`: concept 11, stages 30/40/80 steps at
the world recipe) on a given base model, then the concept in the 5 contexts x 3 seeds, scored
(`world.evaluation.evaluate_personalization`).

Usage: python personalization_check.py PIPELINE_DIR NAME   (writes personalization_NAME.json beside this file)
Run 2026-11-28 (2 threads) on the shipped model, the frozen-text-encoder run and the object-weighted one.
"""

import json
import sys
from pathlib import Path

import torch

from attndb_peft.world.evaluation import evaluate_personalization

torch.set_num_threads(2)
source, name = Path(sys.argv[1]), sys.argv[2]
result = {"base": str(source), "concept": 11, "steps": [30, 40, 80], "summary": evaluate_personalization(source)}
Path(__file__).with_name(f"personalization_{name}.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result))
