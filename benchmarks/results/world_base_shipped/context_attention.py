"""Where do the words of a world prompt attend? The demo claims per-token maps in which `[V]` covers the object
and the context words the background; this measures it on held-out captions, for the plain (shipped until session 9)
and the shipped base model, and with an attndb adapter on top.

For each picture: a word's share of its cross-attention inside the object's mask (`scorers.object_mask`), next to
the mask's share of the picture (what uniform attention gives). A word "covers the object" when its share is above
the mask's, "covers the background" when below. Aggregated over pictures as the mean share minus the mask fraction.

    python context_attention.py PLAIN_PIPELINE SHIPPED_PIPELINE [--adapter NAME=BASE:ADAPTER ...] --out FILE.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import attndb_peft  # noqa: F401  (registers pipe.load_attndb)
from attndb_peft.inference import token_attention_maps
from attndb_peft.world import scenes as W
from attndb_peft.world.evaluation import WORLD_GUIDANCE, WORLD_INFERENCE_STEPS
from attndb_peft.world.model import load_world_pipeline
from attndb_peft.world.scorers import object_mask

CONTEXT_WORD = {"grass": "grass", "beach": "beach", "snow": "snow", "night": "night", "brick": "brick"}


def shares(pipe, prompt: str, words: dict[str, str], seed: int) -> dict | None:
    result = token_attention_maps(pipe, prompt, seed=seed, steps=WORLD_INFERENCE_STEPS, guidance=WORLD_GUIDANCE,
                                  height=W.SIZE, width=W.SIZE)
    mask = object_mask(np.asarray(result.image))
    if not mask.any():
        return None
    out = {"mask_fraction": float(mask.mean())}
    for role, word in words.items():
        (token_id,) = pipe.tokenizer(word, add_special_tokens=False).input_ids  # every world word is one token
        attention = result.maps[result.token_ids.index(token_id)]
        factor = mask.shape[0] // attention.shape[0]
        attention = np.kron(attention, np.ones((factor, factor)))
        out[role] = float(attention[mask].sum() / attention.sum())
    return out


def measure(pipe, scenes, token: str | None, seeds) -> dict:
    rows = []
    for scene in scenes:
        prompt = W.caption(scene, token)
        words = {"category": scene.category, "context": CONTEXT_WORD[scene.context]}
        if token:
            words["concept"] = token
        for seed in seeds:
            row = shares(pipe, prompt, words, seed)
            if row is not None:
                rows.append(row)
    summary = {"pictures": len(rows), "mask_fraction": float(np.mean([r["mask_fraction"] for r in rows]))}
    for role in rows[0]:
        if role == "mask_fraction":
            continue
        excess = [r[role] - r["mask_fraction"] for r in rows]
        summary[role] = {"share": float(np.mean([r[role] for r in rows])), "minus_mask": float(np.mean(excess)),
                         "above_mask": int(sum(e > 0 for e in excess))}
    return summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("plain")
    p.add_argument("shipped")
    p.add_argument("--adapter", nargs="*", default=[], help="NAME=BASE_FOLDER:ADAPTER_FOLDER")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    _, held = W.split_scenes()
    scenes = [s for s in held if s.context is not None and s.style == "photo"]
    seeds = (0, 1)
    results = {"scenes": [W.caption(s) for s in scenes], "seeds": list(seeds)}
    for name, folder in (("plain", args.plain), ("shipped", args.shipped)):
        results[name] = measure(load_world_pipeline(folder), scenes, None, seeds)
        print(name, json.dumps(results[name]), flush=True)
    results["shipped_by_step_and_layer"] = by_step_and_layer(load_world_pipeline(args.shipped), scenes, seeds)
    print("shipped by step and layer", json.dumps(results["shipped_by_step_and_layer"]), flush=True)
    for spec in args.adapter:
        name, folders = spec.split("=", 1)
        base, adapter = folders.split(":", 1)
        pipe = load_world_pipeline(base)
        token = pipe.load_attndb(adapter, adapter_name="concept")
        category = json.loads(open(f"{adapter}/attndb_config.json").read())["category"]
        concept_scenes = [W.Scene(category, None, ctx, "photo") for ctx in CONTEXT_WORD]
        results[name] = measure(pipe, concept_scenes, token, (0, 1, 2))
        print(name, json.dumps(results[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)



def by_step_and_layer(pipe, scenes, seeds) -> dict:
    """The context and category words' excess share inside the object (share minus the mask's share), split by
    denoising thirds (early / middle / late steps) and by the resolution of the attention layer (16x16, 8x8):
    where the all-steps, all-layers average of `measure` could hide a word that does cover the background."""
    from attndb_peft.attention import AttentionStore, capture_cross_attention
    from attndb_peft.inference import _generators, prompt_tokens

    sums: dict = {}
    for scene in scenes:
        prompt = W.caption(scene)
        words = {"category": scene.category, "context": CONTEXT_WORD[scene.context]}
        token_ids, _ = prompt_tokens(pipe.tokenizer, prompt)
        rows = {role: token_ids.index(pipe.tokenizer(w, add_special_tokens=False).input_ids[0])
                for role, w in words.items()}
        for seed in seeds:
            per_step: list[dict] = []
            store = AttentionStore()

            def keep(pipeline, step, timestep, callback_kwargs, per_step=per_step, store=store):
                per_step.append({name: m[-1:].float().mean(1)[0].cpu() for name, m in store.maps.items()})
                store.clear()
                return {}

            with capture_cross_attention(pipe.unet, list(range(1, len(token_ids) + 1)), store), torch.no_grad():
                image = pipe(prompt, num_inference_steps=WORLD_INFERENCE_STEPS, guidance_scale=WORLD_GUIDANCE,
                             height=W.SIZE, width=W.SIZE, generator=_generators(seed, 1),
                             callback_on_step_end=keep).images[0]
            mask = object_mask(np.asarray(image))
            if not mask.any():
                continue
            for k, step in enumerate(per_step):
                third = ("early", "middle", "late")[min(2, 3 * k // len(per_step))]
                for m in step.values():  # [pixels, tokens]
                    side = int(round(m.shape[0] ** 0.5))
                    factor = mask.shape[0] // side
                    small = mask.reshape(side, factor, side, factor).mean((1, 3)).reshape(-1)
                    for role, row in rows.items():
                        a = m[:, row].numpy()
                        excess = float((a * small).sum() / a.sum() - small.mean())
                        key = f"{role}/{third}/{side}x{side}"
                        total, count = sums.get(key, (0.0, 0))
                        sums[key] = (total + excess, count + 1)
    return {key: round(total / count, 4) for key, (total, count) in sorted(sums.items())}


if __name__ == "__main__":
    main()
