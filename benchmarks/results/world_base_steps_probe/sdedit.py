"""Issue 9 diagnostic: at which noise level does a base model lose a box's shape? Start the default sampler (DDIM,
25 trailing steps, guidance 5) not from pure noise but from ground truth noised to step k of the schedule (k = 0:
pure noise, as in generation; k = 25: the VAE round trip alone), for the held-out captions drawn as photos and
paintings (66 pictures: numpy seeds 100-102 for the renders, torch seeds 0-2 for the noise), and read the category
off the result with the scorer. Writes sdedit_NAME.json beside this file.

Usage: python sdedit.py PIPELINE_DIR NAME [K ...]   (default K: 0 9 15 19 22 25; 2 threads, about 3 min a model)
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from attndb_peft.world import scenes as W
from attndb_peft.world.model import load_world_pipeline
from attndb_peft.world.scorers import score_image

torch.set_num_threads(2)
pipe = load_world_pipeline(sys.argv[1])
ks = [int(k) for k in sys.argv[3:]] or [0, 9, 15, 19, 22, 25]
_, held = W.split_scenes(30, seed=1)
scenes = [s for s in held if s.style != "sketch"]
scheduler = pipe.scheduler
scheduler.set_timesteps(25)
timesteps = scheduler.timesteps
positive, negative = pipe.encode_prompt([W.caption(s) for s in scenes], "cpu", 1, True)
states = torch.cat([negative, positive])
scale = pipe.vae.config.scaling_factor
counts: dict = {}
for seed in range(3):
    rng = np.random.default_rng(100 + seed)
    truth = np.stack([W.render(s, rng)[0] for s in scenes]).astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        x0 = pipe.vae.encode(torch.from_numpy(truth).permute(0, 3, 1, 2)).latent_dist.mean * scale
    for k in ks:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        if k == 0:
            latents = noise
        elif k == len(timesteps):
            latents = x0
        else:
            latents = scheduler.add_noise(x0, noise, timesteps[k : k + 1].repeat(len(x0)))
        with torch.no_grad():
            for t in timesteps[k:]:
                both = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=states).sample
                uncond, cond = both.chunk(2)
                latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
            images = pipe.vae.decode(latents / scale).sample
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for image, s in zip(images, scenes):
            c = counts.setdefault(str(k), {"timestep": int(timesteps[k]) if k < len(timesteps) else None})
            right_n = c.setdefault(s.category, [0, 0])
            right_n[0] += bool(score_image(image, s)["category_ok"])
            right_n[1] += 1
for k, c in counts.items():
    print(k, c)
Path(__file__).with_name(f"sdedit_{sys.argv[2]}.json").write_text(json.dumps(counts, indent=1) + "\n")
