# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb` command line: argparse -> `AttnDBConfig` / function calls. No logic of its own.

Subcommands: `train`, `estimate`, `generate`, `inspect`, `evaluate`, `push`, `export`, `demo`, `world` (its
subcommands live in `world/cli.py`). The `train` flags (and `estimate`'s) are generated from `AttnDBConfig`'s
fields (`cli_args.add_config_arguments`). In prompts, `{}` expands to `TOKEN CATEGORY` (read from the adapter's
`attndb_config.json`).

Imports run one way: this module imports `world/cli.py` (to register `world`) and `cli_args.py` (the argument
helpers both share); neither imports this one.

Exit codes: 0 done, 2 bad input or usage (nothing written), 1 failure during the run. Errors are one line on
stderr; `--verbose` adds the traceback. Library messages name settings as Python spells them (`` `token` ``);
`main` shows them, and the package's log records, with the flag of the command that ran (`--token`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from diffusers.utils import logging as diffusers_logging
from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as transformers_logging

from . import trainer
from .cli_args import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    add_common,
    add_config_arguments,
    config_from_args,
    multiple_of_8,
    parser_that_ran,
    positive_int,
    show_flags,
    three,
)
from .demo import DEMO_STEPS, WORLD_DEMO_CONCEPT, run_demo
from .errors import AttnDBError, UsageError, arg
from .estimator.architectures import ARCHITECTURES
from .estimator.estimate import estimate_run, format_estimate, write_estimate
from .estimator.gpus import GPUS
from .evaluate import (
    DEFAULT_CLIP_MODEL,
    ClipEmbedder,
    DinoEmbedder,
    evaluate_concept,
    load_reference_images,
    read_prompts_file,
)
from .hub import push_to_hub
from .inference import expand_prompt, inspect_prompt, load_pipeline, read_adapter_config, write_generation
from .world.cli import add_world_parser
from .world.model import BASE_SETTINGS

__all__ = ["build_parser", "config_from_args", "main"]

logger = logging.getLogger("attndb_peft")


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        usage="attndb train --model MODEL --images DIR --category WORD --output DIR [options]",
        help="Train a concept with the three AttnDreamBooth stages.",
        description="Train a concept (token embedding, attn2 LoRA, U-Net LoRA or full) and write the adapter folder. "
        "Every setting can also come from --config; flags given here override it.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of AttnDBConfig settings (see examples/config.yaml), or a finished run's "
        "attndb_config.json to reproduce it.",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="Run every input check, print the predicted GPU memory and time of each stage (attndb estimate), "
        "and stop before training; nothing is written.",
    )
    add_common(p)
    add_config_arguments(p)  # one flag per AttnDBConfig/StageConfig field, from the fields' metadata
    p.set_defaults(handler=_cmd_train)


def _add_estimate_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        usage="attndb estimate --model MODEL [--gpu-memory GIB] [--gpu NAME] [train options]",
        help="Predict a run's peak GPU memory per stage and its training time, without a GPU.",
        description="Predict, for the settings of an 'attndb train' run, each stage's peak GPU memory (weights, "
        "gradients, optimizer, activations, workspace), whether it fits a card and which settings would make it "
        "fit, and the recipe's training time on common GPUs. The steps are counted on PyTorch's meta device from "
        "the model's configs alone (no weights, no GPU): --model is a diffusers folder, a Hub id (its config "
        "files only), a single file with --model-config, or one of the architectures "
        f"{', '.join(ARCHITECTURES)} (no download). Takes every 'attndb train' flag; --images, --category and "
        "--output are optional here.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings, as for attndb train.")
    p.add_argument(
        "--gpu-memory", type=float, metavar="GIB", help="Check the fit against this much GPU memory (GiB)."
    )
    p.add_argument(
        "--gpu",
        choices=tuple(GPUS),
        help="The card: its memory for the fit (unless --gpu-memory) and its precision for --mixed-precision auto. "
        "Default: every listed card in the time table, the fit checked where --gpu-memory says.",
    )
    p.add_argument("--json", metavar="FILE", help="Also write the estimate as JSON.")
    add_common(p)
    add_config_arguments(p)
    p.set_defaults(handler=_cmd_estimate)


def _estimate_config(args: argparse.Namespace):
    """The train settings of `attndb estimate`, where the data and output folders are optional."""
    for name, placeholder in (("images", "-"), ("output", "-"), ("category", "dog")):
        if getattr(args, name, None) is None:
            setattr(args, name, placeholder)
    return config_from_args(args)


def _with_flags(text: str) -> str:
    """An estimate's text with the settings it names shown as `attndb train` flags."""
    flags = argparse.ArgumentParser(add_help=False)
    add_config_arguments(flags)
    return show_flags(text, flags)


def _cmd_estimate(args: argparse.Namespace) -> int:
    gpu = GPUS[args.gpu] if args.gpu else None
    logger.info("Counting each stage on the meta device (seconds to a minute)...")
    result = estimate_run(_estimate_config(args), gpu=gpu, gpu_memory_gib=args.gpu_memory)
    print(_with_flags(format_estimate(result, [gpu] if gpu else None)))
    if args.json:
        write_estimate(result, args.json)
    return EXIT_OK


def _add_generation_args(p: argparse.ArgumentParser, steps: int, adapter_required: bool = False) -> None:
    """Flags shared by generate, inspect and evaluate: base model, adapter and sampling settings, in two help
    sections."""
    model = p.add_argument_group("model and adapter")
    model.add_argument(
        "--model",
        metavar="MODEL",
        help="Base model: Hub id, local diffusers folder, or single .safetensors file (with --model-config). "
        "Default: the base model named in the adapter's attndb_config.json.",
    )
    model.add_argument(
        "--model-config",
        dest="model_config",
        metavar="MODEL",
        help="With a single-file --model: a diffusers folder or Hub id of the same architecture.",
    )
    model.add_argument(
        "--adapter",
        metavar="PATH_OR_REPO",
        required=adapter_required,
        help="Adapter folder written by attndb train, or a Hub repo id; loaded with load_attndb. Its token and "
        "category fill '{}' in prompts.",
    )
    model.add_argument(
        "--lora-scale", type=float, default=1.0, dest="lora_scale", metavar="X",
        help="Weight of the adapter's LoRA. Default 1.",
    )
    model.add_argument(
        "--device", help="Torch device, e.g. cuda, cuda:1, cpu. Default: CUDA if available, else CPU."
    )
    model.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="Weights dtype. Default auto: fp16 on CUDA, fp32 elsewhere.",
    )
    sampling = p.add_argument_group("sampling")
    sampling.add_argument(
        "--seed", type=int, default=0, metavar="N", help="Seed of the first image; image i uses seed+i. Default 0."
    )
    sampling.add_argument(
        "--steps", type=positive_int, default=steps, metavar="N", help=f"Denoising steps. Default {steps}."
    )
    sampling.add_argument(
        "--guidance", type=float, metavar="X",
        help="Guidance scale. Default the family pipeline's own: 7.5 (SD, SDXL), 7.0 (SD3), 3.5 (Flux).",
    )
    sampling.add_argument(
        "--height", type=multiple_of_8, metavar="PX", help="Image height in pixels (multiple of 8); default the "
        "model's."
    )
    sampling.add_argument(
        "--width", type=multiple_of_8, metavar="PX", help="Image width in pixels (multiple of 8); default the model's."
    )


def _add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="Generate images with a trained concept.",
        description="Generate PNGs with a base model and an attndb adapter, plus generate.json with the settings. "
        "In prompts, {} expands to 'TOKEN CATEGORY'. The same seed gives the same pixels.",
    )
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="Prompt, e.g. 'a photo of a {} on the beach' ({} -> TOKEN CATEGORY); repeat for several prompts.",
    )
    p.add_argument(
        "--num-images", type=positive_int, default=1, dest="num_images", metavar="N",
        help="Images per prompt. Default 1.",
    )
    p.add_argument("--negative-prompt", dest="negative_prompt", metavar="PROMPT", help="Negative prompt (optional).")
    p.add_argument(
        "--output", metavar="DIR", required=True, help="Folder for the PNGs and generate.json (created if missing)."
    )
    _add_generation_args(p, steps=30)
    add_common(p)
    p.set_defaults(handler=_cmd_generate)


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="Show where every prompt token attends (per-token cross-attention maps).",
        description="Generate one image and draw it next to the cross-attention map of every prompt token "
        "(averaged over heads, layers and denoising steps, labelled with the token's text), like the "
        "AttnDreamBooth paper's figures. Also writes a JSON file with the tokens next to the figure.",
    )
    p.add_argument(
        "--prompt", required=True, help="Prompt, e.g. 'a photo of a {} in the jungle' ({} -> TOKEN CATEGORY)."
    )
    p.add_argument(
        "--output", metavar="PNG", required=True, help="The figure's path (.png); the JSON goes next to it."
    )
    _add_generation_args(p, steps=30)
    add_common(p)
    p.set_defaults(handler=_cmd_inspect)


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Score a concept: CLIP identity, CLIP text alignment (and DINO identity).",
        description="Generate images for an evaluation prompt set and report identity (mean CLIP image-image "
        "cosine similarity to the instance images), text alignment (mean CLIP image-text cosine similarity to the "
        "prompt without the token) and, with --dino, DINO identity; writes metrics.json, grid.png and the images.",
    )
    p.add_argument(
        "--images", metavar="DIR", required=True, help="Folder with the instance images the concept was trained on."
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="Text file, one prompt per line ({} -> TOKEN CATEGORY; optional 'group: ' prefix; # comments). "
        "Default: the built-in 24 prompts (background, interaction, color, style).",
    )
    p.add_argument(
        "--clip",
        metavar="MODEL",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP model (Hub id or folder). Default {DEFAULT_CLIP_MODEL}.",
    )
    p.add_argument(
        "--dino", metavar="MODEL", help="DINO ViT model for DINO identity, e.g. facebook/dino-vits16 (optional)."
    )
    p.add_argument(
        "--num-images", type=positive_int, default=4, dest="num_images", metavar="N",
        help="Images per prompt. Default 4.",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        default="attndb-eval",
        help="Folder for metrics.json, grid.png and images/. Default ./attndb-eval.",
    )
    _add_generation_args(p, steps=30, adapter_required=True)
    add_common(p)
    p.set_defaults(handler=_cmd_evaluate)


def _add_demo_parser(sub) -> None:
    world_steps = ",".join(str(BASE_SETTINGS[f"stage{i}"]["steps"]) for i in (1, 2, 3))
    p = sub.add_parser(
        "demo",
        help="Run the whole flow offline in the toy world: AttnDB vs Textual Inversion, scored (a few minutes).",
        description="Learn a toy-world concept with the world's pretrained base model: write the base model and the "
        "concept's photos, train the three stages and a Textual-Inversion-only run of the same length, load both "
        "back with pipe.load_attndb, draw the same prompts and seeds side by side with every picture's scores, "
        "and write per-token attention maps. No network. --random-weights runs the few-second smoke path on a "
        "tiny random model instead (its pictures are noise).",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        default="attndb-demo",
        help="Folder for everything the demo writes. Default ./attndb-demo.",
    )
    p.add_argument(
        "--steps",
        type=three(int),
        default=None,
        help=f"Training steps of stages 1,2,3. Default {world_steps} (world), {','.join(map(str, DEMO_STEPS))} "
        "(--random-weights).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of training and samples. Default 0.")
    p.add_argument(
        "--concept-seed",
        type=int,
        default=WORLD_DEMO_CONCEPT,
        help=f"The world concept to learn (any seed gives a new one). Default {WORLD_DEMO_CONCEPT}.",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="The smoke path: a tiny random model built in code, a few seconds, pictures are noise.",
    )
    p.add_argument(
        "--family",
        choices=("sd", "sdxl"),
        default="sd",
        help="With --random-weights: the tiny model's family, SD 2.x-like (default) or SDXL (two text encoders).",
    )
    add_common(p)
    p.set_defaults(handler=_cmd_demo)


def _cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.dry_run:
        print(_with_flags(format_estimate(trainer.dry_run(config))))
        return EXIT_OK
    # the run logs its summary (time per stage, peak memory, files) and, with push_to_hub, the pushed repo
    print(trainer.train(config))
    return EXIT_OK


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="Write the adapter of a training checkpoint (pick a step).",
        description="Turn a checkpoint of a run (OUT/checkpoints/stage{2,3}-step{K}, which is resume state, not an "
        "adapter) into an adapter folder with the same files a finished run writes, loadable with load_attndb.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="The checkpoint folder, e.g. OUT/checkpoints/stage3-step250.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="The adapter folder to write (new or empty).")
    p.add_argument(
        "--model", help="Base model, if it is no longer where the run found it. Default: the run's --model."
    )
    p.add_argument(
        "--model-config",
        dest="model_config",
        help="With a single-file --model: a diffusers folder or Hub id of the same architecture.",
    )
    add_common(p)
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    files = trainer.export_checkpoint(args.checkpoint, args.output, model=args.model, model_config=args.model_config)
    logger.info("Wrote %d file(s) to %s", len(files), args.output)
    print(args.output)
    return EXIT_OK


def _add_push_parser(sub) -> None:
    p = sub.add_parser(
        "push",
        help="Push an adapter folder to the Hugging Face Hub.",
        description="Upload the adapter files, model card and sample images of OUT (never checkpoints) to the Hub "
        "model repo REPO, creating it if needed. Prints the commit URL.",
    )
    p.add_argument("output", metavar="OUT", help="The adapter folder `attndb train` wrote.")
    p.add_argument("repo_id", metavar="REPO", help="Hub repo id, e.g. your-name/my-dog.")
    p.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps its own).")
    p.add_argument("--token", help="Hub token with write access (default: the one saved by `hf auth login`).")
    p.add_argument("--commit-message", dest="commit_message", help="Default: 'Upload attndb concept TOKEN'.")
    add_common(p)
    p.set_defaults(handler=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    url = push_to_hub(
        args.output, args.repo_id, private=args.private, token=args.token, commit_message=args.commit_message
    )
    print(url)
    return EXIT_OK


def _generation_settings(args: argparse.Namespace, info) -> dict:
    """What generate.json / the inspect JSON / metrics.json record about the model and adapter."""
    return {
        "model": args.model or (info.base_model if info else None),
        "adapter": args.adapter,
        "token": info.token if info else None,
        "category": info.category if info else None,
        "lora_scale": args.lora_scale,
    }


def _load(args: argparse.Namespace, safety_checker: bool = True):
    model_config = args.model_config
    if model_config is None and args.model is None and args.adapter:  # the adapter's own base model
        model_config = read_adapter_config(args.adapter).config.get("settings", {}).get("model_config")
    return load_pipeline(
        args.model,
        args.adapter,
        args.lora_scale,
        args.device,
        args.dtype,
        model_config=model_config,
        safety_checker=safety_checker,
    )


def _expand(prompt: str, info) -> str:
    return expand_prompt(prompt, info.token if info else None, info.category if info else None)


def _cmd_generate(args: argparse.Namespace) -> int:
    pipe, info = _load(args)
    prompts = [_expand(p, info) for p in args.prompt]
    paths = write_generation(
        pipe,
        prompts,
        args.output,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        settings=_generation_settings(args, info),
    )
    logger.info("Wrote %d image(s) and generate.json to %s", len(paths), args.output)
    print(args.output)
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    pipe, info = _load(args)
    result = inspect_prompt(
        pipe,
        _expand(args.prompt, info),
        args.output,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        settings=_generation_settings(args, info),
    )
    logger.info("Attention maps of %d token(s): %s", len(result.labels), ", ".join(result.labels))
    print(args.output)
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    references = load_reference_images(args.images)  # cheap input checks first, then the models
    prompts = read_prompts_file(args.prompts) if args.prompts else None
    clip = ClipEmbedder(args.clip, args.device)
    dino = DinoEmbedder(args.dino, args.device) if args.dino else None
    pipe, info = _load(args, safety_checker=False)  # a blacked-out false positive would enter the metrics
    result = evaluate_concept(
        pipe,
        info,
        references,
        args.output,
        clip,
        dino,
        prompts=prompts,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        settings={**_generation_settings(args, info), "clip": args.clip, "dino": args.dino, "images": args.images},
    )
    scores = ", ".join(f"{k} {result[k]:.4f}" for k in ("identity", "text_alignment", "dino_identity") if k in result)
    logger.info("%s (metrics.json and grid.png in %s)", scores, args.output)
    print(args.output)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.concept_seed < 0:
        raise UsageError(f"{arg('concept_seed')} {args.concept_seed}: expected a non-negative integer.")
    result = run_demo(
        args.output,
        steps=args.steps,
        seed=args.seed,
        random_weights=args.random_weights,
        concept_seed=args.concept_seed,
        family=args.family,
    )
    print(result.describe())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The `attndb` parser with every subcommand; each subcommand's `handler` default runs it."""
    parser = Parser(
        prog="attndb",
        description="AttnDreamBooth personalization for Stable Diffusion, shipped as PEFT/LoRA adapters. "
        "Start with 'attndb demo' (offline: the toy world's small base model, a few minutes on a CPU); "
        "'attndb COMMAND --help' describes each command.",
    )
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_estimate_parser(sub)
    _add_generate_parser(sub)
    _add_inspect_parser(sub)
    _add_evaluate_parser(sub)
    _add_push_parser(sub)
    _add_export_parser(sub)
    _add_demo_parser(sub)
    add_world_parser(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("attndb_peft").setLevel(level)
    if not verbose:  # "Loading pipeline components" / "Loading weights" bars tell a user nothing
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    if quiet:  # downloads keep their bars unless asked for quiet
        disable_progress_bars()


class _ShowFlags(logging.Filter):
    """Rewrites the package's log records (warnings such as "`resolution` 48 ...") to name the flags of the
    command that ran, as `main` does for error messages."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("attndb_peft"):
            record.msg, record.args = show_flags(record.getMessage(), self.parser), None
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attndb` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with code 2 on usage errors
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    _setup_logging(verbose, quiet)
    ran = parser_that_ran(parser, args)
    # on the handlers, not the loggers: a logger's filter misses its children's records (attndb_peft.trainer)
    handlers, show = list(logging.getLogger().handlers), _ShowFlags(ran)
    for handler in handlers:
        handler.addFilter(show)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        kept = "; checkpoints written so far are kept (continue with --resume)" if args.command == "train" else ""
        print(f"attndb {args.command}: interrupted{kept}.", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        code = exc.exit_code if isinstance(exc, AttnDBError) else EXIT_FAILURE  # the class says which
        if verbose:
            logger.exception("attndb %s failed", args.command)
        # Library messages name settings as Python spells them (`token`); the CLI shows the flag that sets them.
        # Usage messages say what is wrong and how to fix it (one line per problem found). A failure's message is
        # cut to its first line -- library messages such as CUDA out-of-memory go on for lines -- and --verbose
        # shows the rest with the traceback.
        text = show_flags(str(exc).strip(), ran)
        if code == EXIT_USAGE:
            message = text
        else:
            message = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if not verbose:
                message += " (run again with --verbose for the traceback)"
        print(f"attndb {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        for handler in handlers:
            handler.removeFilter(show)


if __name__ == "__main__":
    sys.exit(main())
