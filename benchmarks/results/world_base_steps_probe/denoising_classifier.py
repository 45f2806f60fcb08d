"""Issue 9 diagnostic: does a base model's U-Net tell `box` from `ball`, and at which noise level? A diffusion
classifier on ground truth: the held-out box and ball captions drawn as photos and paintings (4 renders each,
numpy seeds 500-503), each picture's VAE latent noised at timestep t (4 noise draws, torch seed 0), the U-Net's
v-prediction error with the right caption against the same caption with the other category. Per t: the share of
(picture, noise) pairs where the right caption has the lower error (0.5 = the word is not used), per category, and
the mean relative error gap. Writes denoising_classifier_NAME.json beside this file.

Usage: python denoising_classifier.py PIPELINE_DIR NAME   (1 thread, about 100 s a model)
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from attndb_peft.world import scenes as W
from attndb_peft.world.model import load_world_pipeline

torch.set_num_threads(1)
pipe = load_world_pipeline(sys.argv[1])
_, held = W.split_scenes(30, seed=1)
scenes = [s for s in held if s.style != "sketch" and s.category in ("box", "ball")]
other = {"box": "ball", "ball": "box"}
pictures, right, wrong, asked = [], [], [], []
for r in range(4):
    rng = np.random.default_rng(500 + r)
    for s in scenes:
        pictures.append(W.render(s, rng)[0])
        asked.append(s.category)
        right.append(W.caption(s))
        wrong.append(W.caption(W.Scene(other[s.category], s.colour, s.context, s.style)))
x = torch.from_numpy(np.stack(pictures).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
with torch.no_grad():
    x0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    states_right, _ = pipe.encode_prompt(right, "cpu", 1, False)
    states_wrong, _ = pipe.encode_prompt(wrong, "cpu", 1, False)
box = torch.tensor([c == "box" for c in asked])
generator = torch.Generator().manual_seed(0)
out = {"pictures": len(pictures), "noise_draws": 4, "by_timestep": {}}
for t in (50, 150, 250, 400, 550, 700, 850, 950):
    wins, gaps = [], []
    for _ in range(4):
        noise = torch.randn(x0.shape, generator=generator)
        tt = torch.full((len(x0),), t)
        xt = pipe.scheduler.add_noise(x0, noise, tt)
        v = pipe.scheduler.get_velocity(x0, noise, tt)
        with torch.no_grad():
            error_right = ((pipe.unet(xt, tt, states_right).sample - v) ** 2).mean((1, 2, 3))
            error_wrong = ((pipe.unet(xt, tt, states_wrong).sample - v) ** 2).mean((1, 2, 3))
        wins.append((error_right < error_wrong).float())
        gaps.append((error_wrong - error_right) / error_right)
    wins, gaps = torch.stack(wins), torch.stack(gaps)
    out["by_timestep"][t] = {
        "right_preferred": round(float(wins.mean()), 3),
        "box": round(float(wins[:, box].mean()), 3),
        "ball": round(float(wins[:, ~box].mean()), 3),
        "relative_gap": round(float(gaps.mean()), 4),
    }
    print(t, out["by_timestep"][t], flush=True)
Path(__file__).with_name(f"denoising_classifier_{sys.argv[2]}.json").write_text(json.dumps(out, indent=1) + "\n")
