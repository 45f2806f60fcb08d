"""Issue 9 diagnostic: how far apart the world text encoder puts the words the U-Net must tell apart. For each pair
of words that differ in one slot of `a photo of a red ball on the grass`, the distance between the encoder's
output states at the word's position (what the U-Net's cross-attention reads), next to the states' mean norm.
Writes text_states.json (the shipped model) or text_states_NAME.json (python text_states.py PIPELINE_DIR NAME)
beside this file."""

import json
import sys
from pathlib import Path

import torch

from attndb_peft.world.model import SHIPPED_DIR, load_world_pipeline

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED_DIR
name = f"text_states_{sys.argv[2]}.json" if len(sys.argv) > 2 else "text_states.json"
pipe = load_world_pipeline(folder)
tokenizer, encoder = pipe.tokenizer, pipe.text_encoder


@torch.no_grad()
def states(caption):
    ids = tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return encoder(ids.input_ids)[0][0]


template = "a photo of a {colour} {category} {context}"
base = {"colour": "red", "category": "ball", "context": "on the grass"}
slots = {"category": 6, "colour": 5, "context": 9}  # the slot's (first differing) token position
pairs = {
    "category": [("ball", "box"), ("ball", "cone"), ("box", "cone")],
    "colour": [("red", "blue"), ("red", "orange"), ("yellow", "orange"), ("purple", "blue")],
    "context": [("on the grass", "on the beach"), ("on the grass", "in the snow"), ("at night", "by a brick wall")],
}
norm = states(template.format(**base)).norm(dim=-1)[:11].mean()
result = {"model": "shipped" if folder == SHIPPED_DIR else str(folder), "mean_state_norm": round(float(norm), 3)}
for slot, items in pairs.items():
    for a, b in items:
        sa, sb = states(template.format(**{**base, slot: a})), states(template.format(**{**base, slot: b}))
        result[f"{slot}: {a} / {b}"] = round(float((sa - sb)[slots[slot]].norm()), 3)
Path(__file__).with_name(name).write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
