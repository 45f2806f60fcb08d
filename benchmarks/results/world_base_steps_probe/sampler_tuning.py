"""Issue 9 probe: does the sampler draw boxes? Tuning data only: 36 training captions (12 per category, with a
context; drawn with numpy seed 11) x 2 seeds (100, 101), never the held-out captions. Prints one JSON line per
(guidance, guidance_rescale) with the share of pictures whose context, style, colour and category are right, and
the share of boxes drawn as boxes. `guidance_rescale` is Lin et al.'s CFG rescale for zero-terminal-SNR models.

Usage: python sampler_tuning.py PIPELINE_DIR   (run 2026-11-28 on the frozen-text-encoder run's pipeline, 2 threads:
sampler_tuning_frozen.txt)
"""

import json
import sys
import time

import numpy as np
import torch

from attndb_peft.world import scenes as W
from attndb_peft.world.model import load_world_pipeline
from attndb_peft.world.scorers import score_image

torch.set_num_threads(2)
pipe = load_world_pipeline(sys.argv[1])
train, _ = W.split_scenes(30, seed=1)
rng = np.random.default_rng(11)
tune = []
for cat in W.CATEGORIES:
    pool = [s for s in train if s.category == cat and s.context is not None]
    tune += [pool[i] for i in rng.choice(len(pool), 12, replace=False)]
prompts = [W.caption(s) for s in tune]
for g, r in [(5, 0.0), (5, 0.7), (7.5, 0.7), (3, 0.0), (10, 0.7)]:
    t = time.time()
    recs = []
    for seed in (100, 101):
        gens = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(prompts))]
        imgs = pipe(prompts, height=W.SIZE, width=W.SIZE, num_inference_steps=25, guidance_scale=g,
                    guidance_rescale=r, generator=gens, output_type="np").images
        imgs = np.clip(np.round(imgs * 255), 0, 255).astype(np.uint8)
        recs += [score_image(i, s) for i, s in zip(imgs, tune)]
    out = {"guidance": g, "rescale": r}
    for k in ("context_ok", "style_ok", "colour_ok", "present"):
        v = [x[k] for x in recs if x.get(k) is not None]
        out[k] = round(float(np.mean(v)), 3)
    out["box"] = round(float(np.mean([x["present"] for x, s in zip(recs, tune * 2) if s.category == "box"])), 3)
    print(json.dumps(out), round(time.time() - t), flush=True)
