"""Issue 9 probe: do ancestral (stochastic) samplers draw boxes? `sampler_tuning.py` tried DDIM's guidance and CFG
rescale; this tries the schedulers. Tuning data only: the 36 training captions of `sampler_tuning.py` (12 per
category, with a context; numpy seed 11) x 3 seeds (100-102), guidance 5, never the held-out captions. Prints one
JSON line per sampler: the share of pictures whose context, style, colour and category are right, and the category
share per asked category.

Usage: python sampler_stochastic.py PIPELINE_DIR SAMPLER...   (ddim, ddim_eta1, ddpm25, ddpm50, euler_a25;
run 2026-11-28 on the jointly trained, object-weighted (W = 4) run's pipeline, 2 threads: sampler_stochastic.txt)
"""

import json
import sys
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

from attndb_peft.world import scenes as W
from attndb_peft.world.model import load_world_pipeline
from attndb_peft.world.scorers import score_image

torch.set_num_threads(2)
pipe = load_world_pipeline(sys.argv[1])
config = pipe.scheduler.config
train, _ = W.split_scenes(30, seed=1)
rng = np.random.default_rng(11)
tune = []
for cat in W.CATEGORIES:
    pool = [s for s in train if s.category == cat and s.context is not None]
    tune += [pool[i] for i in rng.choice(len(pool), 12, replace=False)]
prompts = [W.caption(s) for s in tune]
SAMPLERS = {
    "ddim": (DDIMScheduler, {}, 25),
    "ddim_eta1": (DDIMScheduler, {"eta": 1.0}, 25),
    "ddpm25": (DDPMScheduler, {}, 25),
    "ddpm50": (DDPMScheduler, {}, 50),
    "euler_a25": (EulerAncestralDiscreteScheduler, {}, 25),
}
for name in sys.argv[2:]:
    cls, kwargs, steps = SAMPLERS[name]
    pipe.scheduler = cls.from_config(config)  # same betas, zero terminal SNR, v-prediction, trailing spacing
    start, records = time.time(), []
    for seed in (100, 101, 102):
        generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(prompts))]
        images = pipe(prompts, height=W.SIZE, width=W.SIZE, num_inference_steps=steps, guidance_scale=5.0,
                      generator=generators, output_type="np", **kwargs).images
        images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
        records += [score_image(i, s) for i, s in zip(images, tune)]
    out = {"sampler": name}
    for key in ("context_ok", "style_ok", "colour_ok", "present"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = round(float(np.mean(values)), 3)
    for cat in W.CATEGORIES:
        out[cat] = round(float(np.mean([r["present"] for r, s in zip(records, tune * 3) if s.category == cat])), 3)
    print(json.dumps(out), round(time.time() - start), flush=True)
