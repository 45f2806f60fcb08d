"""Issue 9 check: does a base model still let a personalised prompt keep its context? The suite's short attndb run
(`tests/test_world_demo.py::test_a_short_attndb_run_learns_a_world_concept`: concept 11, stages 30/40/80 steps at
the world recipe) on a given base model, then the concept in the 5 contexts x 3 seeds, scored
(`world.evaluation.evaluate_personalization`).

Usage: python personalization_check.py PIPELINE_DIR NAME [SEED ...]
  no SEED: concept 11, writes personalization_NAME.json beside this file;
  SEEDs (e.g. the world benchmark's tuning concepts 900 901): one run each, writes personalization_NAME_concepts.json
  with each concept's summary and the pooled context/presence counts.
Run 2026-11-28 (2 threads) with concept 11 on the shipped model, the frozen-text-encoder run, the object-weighted
ones (frozen and jointly trained encoder, W 4 and 16) and the deeper U-Net; the SEED form is what each base's
`*_concepts.json` file beside this one records (none before session 7).
"""

import json
import sys
from pathlib import Path

import torch

from attndb_peft.world.evaluation import evaluate_personalization

CONCEPT, STEPS = 11, (30, 40, 80)  # the suite's test; recorded in the output as run

torch.set_num_threads(2)
source, name, seeds = Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3:]]
if not seeds:
    summary = evaluate_personalization(source, concept_seed=CONCEPT, steps=STEPS)
    result = {"base": str(source), "concept": CONCEPT, "steps": list(STEPS), "summary": summary}
    out = Path(__file__).with_name(f"personalization_{name}.json")
else:
    per = {seed: evaluate_personalization(source, concept_seed=seed, steps=STEPS) for seed in seeds}
    pooled = {key: sum(round(s[key] * s["num_images"]) for s in per.values()) for key in ("context_ok", "present")}
    result = {"base": str(source), "concepts": seeds, "steps": list(STEPS), "per_concept": per,
              "pooled_right": pooled, "pooled_images": sum(s["num_images"] for s in per.values())}
    out = Path(__file__).with_name(f"personalization_{name}_concepts.json")
out.write_text(json.dumps(result, indent=1))
print(json.dumps(result))
