# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb world ...`: the toy world's commands. `add_world_parser(subparsers)` adds the `world` group; each
subcommand has one `_add_<name>_parser` function (and a `_cmd_<name>` handler), so more are one function away.

- `attndb world pretrain --output DIR [--seed S] [--steps N]`: pretrain a world base model from scratch.
- `attndb world base --output DIR`: the shipped base model as a diffusers folder, with `attndb.yaml`.
- `attndb world concept --seed S --output DIR`: a concept's user photos and `concept.json`.
- `attndb world score --concept DIR --images DIR [--output FILE]`: scores a folder written by `attndb generate`.

Bad input raises `UsageError` (exit code 2, one line, nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from ..cli_args import add_common, non_negative_int, positive_int
from ..config import default_token
from ..errors import UsageError
from .model import write_base
from .pretrain import PretrainConfig, pretrain
from .scenes import CONCEPT_FILE, Concept, concept_folder, make_concept, picture_array
from .scorers import parse_caption, score_image, summarize

__all__ = ["add_world_parser", "score_folder"]

logger = logging.getLogger("attndb_peft")

GENERATE_FILE = "generate.json"


# ---------------------------------------------------------------------------------------------- concept
def _add_concept_parser(sub) -> None:
    p = sub.add_parser(
        "concept",
        help="Write a world concept's user photos and concept.json.",
        description="Draw the personal concept of SEED (a category with a two-colour pattern no pretraining "
        "picture has) and write its user photos DIR/instance_XX.png and DIR/concept.json (its category, pattern, "
        "colours, description and the token to train it under). Train on DIR with attndb train --images DIR.",
    )
    p.add_argument(
        "--seed", type=non_negative_int, required=True, help="The concept's seed (any non-negative whole number)."
    )
    p.add_argument("--output", metavar="DIR", required=True, help="Folder for the images and concept.json.")
    p.add_argument(
        "--num-images", type=positive_int, default=5, dest="num_images", help="How many user photos. Default 5."
    )
    add_common(p)
    p.set_defaults(handler=_cmd_concept)


def _cmd_concept(args: argparse.Namespace) -> int:
    info = concept_folder(args.seed, args.output, args.num_images)
    logger.info("Concept %d: %s; %d image(s), token %s", args.seed, info["description"], len(info["images"]),
                info["token"])
    print(args.output)
    return 0


# ---------------------------------------------------------------------------------------------- score
def _read_concept(folder: str | Path):
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--concept {folder}: no such folder; write one with "
                          f"`attndb world concept --seed S --output {folder}`.")
    path = folder / CONCEPT_FILE
    if not path.is_file():
        raise UsageError(f"--concept {folder}: no {CONCEPT_FILE} in it; give the folder written by "
                          "`attndb world concept`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        concept = Concept.from_dict(data)
        make_concept(concept.seed)  # a valid seed
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--concept {path}: not a concept file ({exc}); rewrite it with "
                          "`attndb world concept`.") from None
    token = data.get("token")
    if not token:
        token = default_token(concept.category)
    return concept, token


def _read_generation(folder: str | Path, token: str) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--images {folder}: no such folder; give the --output folder of `attndb generate`.")
    path = folder / GENERATE_FILE
    if not path.is_file():
        raise UsageError(f"--images {folder}: no {GENERATE_FILE} in it, so not a folder written by "
                          "`attndb generate`; give that command's --output folder.")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["images"]
        records = [{"file": str(r["file"]), "prompt": str(r["prompt"]), "seed": r.get("seed")} for r in records]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--images {path}: unreadable ({exc}); regenerate the folder with `attndb generate`.") \
            from None
    out = []
    for r in records:
        try:
            scene, found = parse_caption(r["prompt"], token)
        except ValueError as exc:
            raise UsageError(f"--images {path}: prompt {r['prompt']!r} of {r['file']} is not a world caption "
                              f"({exc}); generate with prompts like 'a painting of a purple {token} ball on the "
                              "beach'.") from None
        if not (folder / r["file"]).is_file():
            raise UsageError(f"--images {folder}: {r['file']} (listed in {GENERATE_FILE}) is missing; "
                              "regenerate the folder with `attndb generate`.")
        out.append({**r, "scene": scene, "has_token": found is not None})
    return out


def _load_image(path: Path):
    with Image.open(path) as image:
        return picture_array(image)


def score_folder(concept_dir: str | Path, images_dir: str | Path) -> dict:
    """Score every image of a folder written by `attndb generate` against its prompt and the concept.

    Args:
        concept_dir: the folder `attndb world concept` wrote (its `concept.json`).
        images_dir: the folder `attndb generate` wrote (its `generate.json` and PNGs; other sizes than 32 px are
            resized).

    Returns:
        `dict`: `{"concept": ..., "images": [per-image record], "summary": summarize(records)}`; a record has
        the file, prompt, seed, the parsed scene and `score_image`'s fields (identity only for prompts with the
        concept's token).

    Raises:
        `UsageError` for a missing folder, a folder without `concept.json` / `generate.json`, or a prompt that
        is not a world caption.
    """
    concept, token = _read_concept(concept_dir)
    records = _read_generation(images_dir, token)
    scored = []
    for r in records:
        scene = r["scene"]
        use_concept = concept if r["has_token"] and scene.category == concept.category else None
        result = score_image(_load_image(Path(images_dir) / r["file"]), scene, use_concept)
        scored.append({"file": r["file"], "prompt": r["prompt"], "seed": r["seed"], "scene": asdict(scene),
                       **result})
    return {"concept": {**concept.to_dict(), "token": token}, "images": scored, "summary": summarize(scored)}


def _add_score_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="Score the images of `attndb generate` against their world prompts and a concept.",
        description="Read the prompts of DIR/generate.json (world captions, the concept's token before the "
        "category, e.g. 'a painting of a purple <attndb-ball> ball on the beach'), score each image's style, "
        "context, colour, category/presence and identity to the concept from its pixels, and print per-image "
        "scores and their summary as JSON.",
    )
    p.add_argument("--concept", metavar="DIR", required=True, help="Folder written by `attndb world concept`.")
    p.add_argument("--images", metavar="DIR", required=True, help="Folder written by `attndb generate`.")
    p.add_argument("--output", metavar="FILE", help="Also write the JSON to FILE (optional).")
    add_common(p)
    p.set_defaults(handler=_cmd_score)


def _cmd_score(args: argparse.Namespace) -> int:
    result = score_folder(args.concept, args.images)
    text = json.dumps(result, indent=2)
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    s = result["summary"]
    logger.info(
        "%d image(s): %s",
        s["num_images"],
        ", ".join(f"{k} {s[k]:.2f}" for k in ("style_ok", "context_ok", "colour_ok", "present", "identity")
                  if s[k] is not None),
    )
    print(text)
    return 0


# ---------------------------------------------------------------------------------------------- pretrain
def _add_pretrain_parser(sub) -> None:
    defaults = PretrainConfig()
    p = sub.add_parser(
        "pretrain",
        help="Pretrain a world base model from scratch (the shipped one came from this command).",
        description="Train the world's VAE, then its U-Net and CLIP text encoder on captioned world scenes "
        "(v-prediction, zero terminal SNR, caption dropout, EMA), deterministic from --seed for a given torch build "
        "and thread count. Checkpoints every --checkpoint-every steps; the same command on the same --output "
        "resumes. Writes DIR/pipeline (a diffusers folder), DIR/pretrain.json and DIR/evaluation.json (held-out "
        "caption scores). The defaults (the shipped model's recipe) take about 100 minutes on 2 idle CPU cores "
        "(VAE 11-15 min, U-Net 3,600 steps at ~1.4 s a step).",
    )
    p.add_argument("--output", metavar="DIR", required=True, help="Folder for the run (resumed if it exists).")
    p.add_argument(
        "--seed", type=non_negative_int, default=defaults.seed, metavar="N", help=f"Seed. Default {defaults.seed}."
    )
    p.add_argument("--steps", type=positive_int, default=defaults.steps, metavar="N",
                   help=f"U-Net/text-encoder steps. Default {defaults.steps}.")
    p.add_argument("--threads", type=positive_int, default=defaults.threads, metavar="N",
                   help=f"CPU threads (results depend on it). Default {defaults.threads}.")
    p.add_argument("--checkpoint-every", type=positive_int, default=defaults.checkpoint_every, metavar="N",
                   dest="checkpoint_every", help=f"Steps between checkpoints. Default {defaults.checkpoint_every}.")
    p.add_argument("--stop-after", type=positive_int, default=None, dest="stop_after", metavar="STEP",
                   help="Stop at the first checkpoint at or past this step and write DIR/pipeline from its EMA "
                   "weights (run again without it to continue).")
    p.add_argument("--no-evaluate", action="store_false", dest="evaluate",
                   help="Skip the held-out evaluation at the end.")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--frozen-text-encoder", action="store_false", dest="train_text_encoder",
                      default=defaults.train_text_encoder,
                      help="Keep the text encoder at its seeded initialisation (frozen, as SD's CLIP is) and train "
                      "the U-Net alone.")
    text.add_argument("--train-text-encoder", action="store_true", dest="train_text_encoder",
                      help="Train the text encoder with the U-Net (the default; the shipped model's recipe).")
    p.add_argument("--object-loss-weight", type=_non_negative_float, default=defaults.object_loss_weight,
                   dest="object_loss_weight", metavar="W",
                   help="Extra loss weight on the object's latent positions (1 + W there, 1 elsewhere), so its "
                   "shape is learnt before the backgrounds' speckles; 0 is a plain MSE. "
                   f"Default {defaults.object_loss_weight}.")
    p.add_argument("--unet-layers-per-block", type=positive_int, default=defaults.unet_layers_per_block,
                   dest="unet_layers_per_block", metavar="N",
                   help="ResNet + transformer layers in each U-Net down block (deeper U-Net at both resolutions). "
                   f"Default {defaults.unet_layers_per_block}.")
    p.add_argument("--device", default="cpu", type=_torch_device,
                   help="Where to train: cpu (default) or a torch device such as cuda. The random draws stay on the "
                   "CPU, so the batches are the same anywhere; the weights differ across devices in rounding.")
    add_common(p)
    p.set_defaults(handler=_cmd_pretrain)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-negative number, e.g. 4")
    return value


def _torch_device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a torch device; use cpu or cuda (cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu")
    return text


def _cmd_pretrain(args: argparse.Namespace) -> int:
    config = PretrainConfig(
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        train_text_encoder=args.train_text_encoder,
        object_loss_weight=args.object_loss_weight,
        unet_layers_per_block=args.unet_layers_per_block,
    )
    try:
        final = pretrain(args.output, config, evaluate=args.evaluate, stop_after=args.stop_after, device=args.device)
    except ValueError as exc:  # another run's settings in --output
        raise UsageError(f"--output {exc}") from None
    print(final)
    return 0


# ---------------------------------------------------------------------------------------------- base
def _add_base_parser(sub) -> None:
    p = sub.add_parser(
        "base",
        help="Write the shipped world base model as a diffusers folder (with attndb.yaml).",
        description="Copy the pretrained world base model that ships with attndb_peft into DIR as a diffusers "
        "Stable Diffusion folder (any --model flag takes it), with DIR/attndb.yaml: the attndb train settings "
        "that suit it (attndb train --config DIR/attndb.yaml --images ... --category ... --output ...).",
    )
    p.add_argument("--output", metavar="DIR", required=True, help="A new or empty folder.")
    add_common(p)
    p.set_defaults(handler=_cmd_base)


def _cmd_base(args: argparse.Namespace) -> int:
    try:
        print(write_base(args.output))
    except (FileExistsError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    return 0


# ---------------------------------------------------------------------------------------------- the group
def add_world_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `world` command (the toy world: concepts, scoring) with its subcommands to `subparsers`."""
    p = subparsers.add_parser(
        "world",
        help="The toy world: its base model, concepts, and scores of generated pictures.",
        description="A small world where personalization quality is measured from pixels: 'attndb world base' "
        "writes its pretrained base model ('attndb world pretrain' retrains it), 'attndb world concept' draws a "
        "personal concept's user photos, 'attndb world score' scores what 'attndb generate' made of it.",
    )
    sub = p.add_subparsers(title="commands", dest="world_command", metavar="SUBCOMMAND", required=True)
    _add_pretrain_parser(sub)
    _add_base_parser(sub)
    _add_concept_parser(sub)
    _add_score_parser(sub)
    return p
