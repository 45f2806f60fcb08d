"""Issue 9 diagnostic: what the world VAE keeps. Ground truth of the 30 held-out captions (3 renders each, numpy
seeds 0-2) encoded (posterior mean) and decoded: mean absolute pixel error per style and the category the scorer
reads off the round trip (the ceiling for any U-Net behind this VAE); vae_roundtrip.png shows the box photos and
paintings of the first render, ground truth above, round trip below (4x). Prints JSON.

Usage: python vae_roundtrip.py PIPELINE_DIR   (1 thread, seconds)
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attndb_peft.world import scenes as W
from attndb_peft.world.model import load_world_pipeline
from attndb_peft.world.scorers import score_image

torch.set_num_threads(1)
pipe = load_world_pipeline(sys.argv[1])
_, held = W.split_scenes(30, seed=1)
error, right = defaultdict(list), defaultdict(list)
for seed in range(3):
    rng = np.random.default_rng(seed)
    truth = np.stack([W.render(s, rng)[0] for s in held])
    with torch.no_grad():
        x = torch.from_numpy(truth.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    back = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for s, a, b in zip(held, truth, back):
        error[s.style].append(float(np.abs(a.astype(np.float32) - b).mean()))
        right[(s.style, s.category)].append(bool(score_image(b, s)["category_ok"]))
    if seed == 0:
        boxes = [i for i, s in enumerate(held) if s.category == "box" and s.style != "sketch"]
        sheet = np.concatenate([np.concatenate(list(truth[boxes]), 1), np.concatenate(list(back[boxes]), 1)], 0)
        image = Image.fromarray(sheet)
        image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(
            Path(__file__).with_name("vae_roundtrip.png"))
out = {
    "mean_abs_error_of_255": {k: round(float(np.mean(v)), 2) for k, v in sorted(error.items())},
    "category_right": {f"{k[0]} {k[1]}": f"{sum(v)}/{len(v)}" for k, v in sorted(right.items())},
}
print(json.dumps(out, indent=1))
