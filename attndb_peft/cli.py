# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb` command line: argparse -> `AttnDBConfig` / function calls. No logic of its own.

Subcommands: `train`, `generate`, `inspect`, `evaluate`, `push`, `export`, `demo`, `world` (its subcommands live
in `world/cli.py`). In prompts, `{}` expands to `TOKEN CATEGORY` (read from the adapter's `attndb_config.json`).

Exit codes: 0 done, 2 bad input or usage (nothing written), 1 failure during the run. Errors are one line on
stderr; `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from .errors import AttnDBError
from .world.cli import add_world_parser

__all__ = ["build_parser", "main"]

logger = logging.getLogger("attndb_peft")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse's default prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _three(kind):
    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected three comma-separated values (stage 1,2,3), got {text!r}")
        try:
            return tuple(kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected three {kind.__name__} values like '60,100,500', got {text!r}"
            ) from None

    return parse


def _per_stage(kind, stages: tuple[int, ...] = (1, 2, 3)):
    """Parse one value for every stage in `stages`, or one value each (comma-separated); returns a 3-tuple with
    None for the stages not covered."""
    example = ",".join(["1"] * len(stages)) if kind is not str else ",".join(["constant"] * len(stages))

    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1:
            parts = parts * len(stages)
        if len(parts) != len(stages):
            names = ",".join(map(str, stages))
            raise argparse.ArgumentTypeError(
                f"expected one value, or {len(stages)} comma-separated values (stages {names}), got {text!r}"
            )
        try:
            values = dict(zip(stages, (kind(p) for p in parts)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} values like '{example}', got {text!r}"
            ) from None
        return tuple(values.get(stage) for stage in (1, 2, 3))

    return parse


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _config_help(name: str, show_default: bool = True) -> str:
    """The setting's help text from `AttnDBConfig`, with its default (or that it is required) appended."""
    from .config import AttnDBConfig

    for f in dataclasses.fields(AttnDBConfig):
        if f.name == name:
            text = f.metadata.get("help", "")
            if not show_default or "default" in text.lower():  # the text already says it
                return text
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                return f"{text} Required (here or in --config)."
            return f"{text} Default: {_show(f.default)}."
    raise KeyError(name)


def _stage_default(field_name: str, stages: tuple[int, ...] = (1, 2, 3)) -> str:
    from .config import AttnDBConfig

    defaults = AttnDBConfig(model="m", images="i", category="c", output="o").stages
    return "Default: " + ",".join(_show(getattr(defaults[s - 1], field_name)) for s in stages) + "."


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="Debug logging, and tracebacks on errors.")
    group.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors; no progress bars.")


def _add_train_parser(sub) -> None:
    from .families import SD, SDXL

    p = sub.add_parser(
        "train",
        help="Train a concept with the three AttnDreamBooth stages.",
        description="Train a concept (token embedding, attn2 LoRA, U-Net LoRA or full) and write the adapter folder.",
    )
    p.add_argument("--model", help=_config_help("model"))
    p.add_argument("--model-config", dest="model_config", help=_config_help("model_config", show_default=False))
    p.add_argument("--images", help=_config_help("images"))
    p.add_argument("--category", help=_config_help("category"))
    p.add_argument("--output", help=_config_help("output"))
    p.add_argument("--token", help=_config_help("token"))
    p.add_argument(
        "--config",
        help="YAML or JSON file of AttnDBConfig settings (see examples/config.yaml), or a finished run's "
        "attndb_config.json to reproduce it; flags given here override it.",
    )
    p.add_argument("--revision", help=_config_help("revision"))
    p.add_argument("--variant", help=_config_help("variant"))
    p.add_argument("--resolution", type=int, help=_config_help("resolution"))
    p.add_argument("--batch-size", type=int, dest="batch_size", help=_config_help("batch_size"))
    p.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        dest="gradient_accumulation_steps",
        help=_config_help("gradient_accumulation_steps"),
    )
    p.add_argument("--steps", type=_three(int), help="Steps of stages 1,2,3. Default: 60,100,500 (the paper's).")
    p.add_argument(
        "--learning-rates",
        type=_three(float),
        dest="learning_rates",
        help="Learning rates of stages 1,2,3; default 1e-3,2e-4,2e-5 (stage 3 full: 2e-6).",
    )
    p.add_argument(
        "--ranks",
        type=_per_stage(int, (2, 3)),
        help="LoRA rank of stages 2,3 (one value: both). Default: the model family's, "
        f"{SD.default_lora_rank} on SD 1.x/2.x and {SDXL.default_lora_rank} on SDXL.",
    )
    p.add_argument(
        "--lora-alphas",
        type=_per_stage(float, (2, 3)),
        dest="lora_alphas",
        help="LoRA alpha of stages 2,3 (one value: both); the LoRA's scale is alpha/rank. Default: alpha = rank.",
    )
    p.add_argument(
        "--lr-schedulers",
        type=_per_stage(str),
        dest="lr_schedulers",
        help="Learning-rate schedule of stages 1,2,3 (one name: all), diffusers' get_scheduler names: constant, "
        "constant_with_warmup, linear, cosine, ... " + _stage_default("lr_scheduler"),
    )
    p.add_argument(
        "--lr-warmup-steps",
        type=_per_stage(int),
        dest="lr_warmup_steps",
        help="Learning-rate warm-up steps of stages 1,2,3 (one value: all). " + _stage_default("lr_warmup_steps"),
    )
    p.add_argument(
        "--lambda-mu",
        type=_per_stage(float),
        dest="lambda_mu",
        help="Regularizer weight of the attention-map mean, stages 1,2,3. " + _stage_default("lambda_mu"),
    )
    p.add_argument(
        "--lambda-var",
        type=_per_stage(float),
        dest="lambda_var",
        help="Regularizer weight of the attention-map variance, stages 1,2,3. " + _stage_default("lambda_var"),
    )
    p.add_argument("--stage3", choices=("lora", "full"), dest="stage3_mode", help=_config_help("stage3_mode"))
    p.add_argument("--full-export-rank", type=int, dest="full_export_rank", help=_config_help("full_export_rank"))
    p.add_argument("--regularizer", choices=("per_layer", "pooled"), help=_config_help("regularizer"))
    p.add_argument("--seed", type=int, help=_config_help("seed"))
    p.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "fp16", "bf16"),
        dest="mixed_precision",
        help=_config_help("mixed_precision"),
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        dest="gradient_checkpointing",
        help=_config_help("gradient_checkpointing"),
    )
    p.add_argument(
        "--offload-frozen",
        action="store_true",
        default=None,
        dest="offload_frozen",
        help=_config_help("offload_frozen"),
    )
    p.add_argument("--compile", action="store_true", default=None, help=_config_help("compile"))
    p.add_argument(
        "--save-dtype", choices=("fp16", "bf16", "fp32"), dest="save_dtype", help=_config_help("save_dtype")
    )
    p.add_argument("--random-crops", type=int, dest="random_crops", help=_config_help("random_crops"))
    p.add_argument(
        "--no-flip", action="store_false", default=None, dest="flip", help="Disable horizontal flips (on by default)."
    )
    p.add_argument(
        "--masked-loss",
        action="store_true",
        default=None,
        dest="masked_loss",
        help=_config_help("masked_loss"),
    )
    p.add_argument("--masks", metavar="DIR", help=_config_help("masks"))
    p.add_argument("--max-grad-norm", type=float, dest="max_grad_norm", help=_config_help("max_grad_norm"))
    p.add_argument(
        "--no-tf32",
        action="store_false",
        default=None,
        dest="allow_tf32",
        help="Disable TF32 matmuls on Ampere+ GPUs (on by default).",
    )
    p.add_argument(
        "--checkpointing-steps", type=int, dest="checkpointing_steps", help=_config_help("checkpointing_steps")
    )
    p.add_argument(
        "--checkpoints-total-limit",
        type=int,
        dest="checkpoints_total_limit",
        help=_config_help("checkpoints_total_limit"),
    )
    p.add_argument("--resume", action="store_true", default=None, help=_config_help("resume"))
    p.add_argument("--overwrite", action="store_true", default=None, help=_config_help("overwrite"))
    p.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO", help=_config_help("push_to_hub"))
    p.add_argument("--log-every", type=int, dest="log_every", help=_config_help("log_every"))
    p.add_argument(
        "--validation-prompts",
        nargs="*",
        metavar="PROMPT",
        dest="validation_prompts",
        help=_config_help("validation_prompts", show_default=False)
        + " Give each prompt quoted; give the flag alone to disable. Default: background, style and colour changes.",
    )
    p.add_argument("--validation-steps", type=int, dest="validation_steps", help=_config_help("validation_steps"))
    p.add_argument("--validation-images", type=int, dest="validation_images", help=_config_help("validation_images"))
    p.add_argument(
        "--validation-inference-steps",
        type=int,
        dest="validation_inference_steps",
        help=_config_help("validation_inference_steps"),
    )
    p.add_argument(
        "--validation-guidance-scale",
        type=float,
        dest="validation_guidance_scale",
        help=_config_help("validation_guidance_scale"),
    )
    p.add_argument(
        "--report-to",
        choices=("tensorboard", "wandb"),
        dest="report_to",
        help=_config_help("report_to", show_default=False) + " Needs that package installed; logs go to OUT/logs.",
    )
    _add_common(p)
    p.set_defaults(handler=_cmd_train)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _multiple_of_8(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 (the VAE's downsampling), got {value}")
    return value


def _add_generation_args(p: argparse.ArgumentParser, steps: int, adapter_required: bool = False) -> None:
    """Flags shared by generate, inspect and evaluate: base model, adapter and sampling settings."""
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="Base model: Hub id, local diffusers folder, or single .safetensors file (with --model-config). "
        "Default: the base model named in the adapter's attndb_config.json.",
    )
    p.add_argument(
        "--model-config",
        dest="model_config",
        help="With a single-file --model: a diffusers folder or Hub id of the same architecture.",
    )
    p.add_argument(
        "--adapter",
        metavar="PATH_OR_REPO",
        required=adapter_required,
        help="Adapter folder written by attndb train, or a Hub repo id; loaded with load_attndb. Its token and "
        "category fill '{}' in prompts.",
    )
    p.add_argument(
        "--lora-scale", type=float, default=1.0, dest="lora_scale", help="Weight of the adapter's LoRA. Default 1."
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the first image; image i uses seed+i. Default 0.")
    p.add_argument("--steps", type=_positive_int, default=steps, help=f"Denoising steps. Default {steps}.")
    p.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale. Default 7.5.")
    p.add_argument(
        "--height", type=_multiple_of_8, help="Image height in pixels (multiple of 8); default the model's."
    )
    p.add_argument("--width", type=_multiple_of_8, help="Image width in pixels (multiple of 8); default the model's.")
    p.add_argument("--device", help="Torch device, e.g. cuda, cuda:1, cpu. Default: CUDA if available, else CPU.")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="Weights dtype. Default auto: fp16 on CUDA, fp32 elsewhere.",
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
        "--num-images", type=_positive_int, default=1, dest="num_images", help="Images per prompt. Default 1."
    )
    p.add_argument("--negative-prompt", dest="negative_prompt", help="Negative prompt (optional).")
    p.add_argument(
        "--output", metavar="DIR", required=True, help="Folder for the PNGs and generate.json (created if missing)."
    )
    _add_generation_args(p, steps=30)
    _add_common(p)
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
    _add_common(p)
    p.set_defaults(handler=_cmd_inspect)


def _add_evaluate_parser(sub) -> None:
    from .evaluate import DEFAULT_CLIP_MODEL

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
        "--num-images", type=_positive_int, default=4, dest="num_images", help="Images per prompt. Default 4."
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        default="attndb-eval",
        help="Folder for metrics.json, grid.png and images/. Default ./attndb-eval.",
    )
    _add_generation_args(p, steps=30, adapter_required=True)
    _add_common(p)
    p.set_defaults(handler=_cmd_evaluate)


def _add_demo_parser(sub) -> None:
    from .demo import DEMO_STEPS, WORLD_DEMO_CONCEPT
    from .world.model import BASE_SETTINGS

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
        type=_three(int),
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
    _add_common(p)
    p.set_defaults(handler=_cmd_demo)


def config_from_args(args: argparse.Namespace):
    """Merge `--config` file values with the flags given (flags win) into an `AttnDBConfig`."""
    from .config import AttnDBConfig, ConfigError, read_config_file

    values = read_config_file(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(AttnDBConfig)}
    for name, value in vars(args).items():
        if name in names and value is not None:
            values[name] = value
    missing = [f"--{n}" for n in ("model", "images", "category", "output") if not values.get(n)]
    if missing:
        raise ConfigError(f"missing required argument(s): {', '.join(missing)} (on the command line or in --config).")
    config = AttnDBConfig.from_dict(values, source=args.config or "arguments")
    stage_values = {
        "steps": args.steps,
        "learning_rates": args.learning_rates,
        "rank": args.ranks,
        "alpha": args.lora_alphas,
        "lr_scheduler": args.lr_schedulers,
        "lr_warmup_steps": args.lr_warmup_steps,
        "lambda_mu": args.lambda_mu,
        "lambda_var": args.lambda_var,
    }
    if any(v is not None for v in stage_values.values()):
        config = config.with_stage_values(**stage_values)
    return config


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    config = config_from_args(args)
    if config.push_to_hub:
        from .hub import check_repo_id

        check_repo_id(config.push_to_hub)  # before hours of training, not after
    trainer = Trainer(config)
    result = trainer.run()  # logs the run summary (time per stage, peak memory, files)
    print(result.output_dir)
    accelerator = getattr(trainer, "accelerator", None)
    if config.push_to_hub and (accelerator is None or accelerator.is_main_process):
        from .hub import push_to_hub

        url = push_to_hub(result.output_dir, config.push_to_hub)
        logger.info("Pushed to the Hub: %s", url)
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
    _add_common(p)
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .trainer import export_checkpoint

    files = export_checkpoint(args.checkpoint, args.output, model=args.model, model_config=args.model_config)
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
    _add_common(p)
    p.set_defaults(handler=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

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
    from .inference import load_pipeline

    model_config = args.model_config
    if model_config is None and args.model is None and args.adapter:  # the adapter's own base model
        from .inference import read_adapter_config

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
    from .inference import expand_prompt

    return expand_prompt(prompt, info.token if info else None, info.category if info else None)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .inference import write_generation

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
    from .inference import inspect_prompt

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
    from .evaluate import ClipEmbedder, DinoEmbedder, evaluate_concept, load_reference_images, read_prompts_file

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
    from .demo import run_demo
    from .inference import UsageError

    if args.concept_seed < 0:
        raise UsageError(f"--concept-seed {args.concept_seed}: expected a non-negative integer.")
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
    parser = _Parser(
        prog="attndb",
        description="AttnDreamBooth personalization for Stable Diffusion, shipped as PEFT/LoRA adapters. "
        "Start with 'attndb demo' (offline, tiny model); 'attndb COMMAND --help' describes each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
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
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    if quiet:  # downloads keep their bars unless asked for quiet
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attndb` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with code 2 on usage errors
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    _setup_logging(verbose, quiet)
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
        # Usage messages say what is wrong and how to fix it (one line per problem found). A failure's message is
        # cut to its first line -- library messages such as CUDA out-of-memory go on for lines -- and --verbose
        # shows the rest with the traceback.
        text = str(exc).strip()
        if code == EXIT_USAGE:
            message = text
        else:
            message = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if not verbose:
                message += " (run again with --verbose for the traceback)"
        print(f"attndb {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
