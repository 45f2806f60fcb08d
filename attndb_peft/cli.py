# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb` command line: argparse -> `AttnDBConfig` / function calls. No logic of its own.

Exit codes: 0 done, 2 bad input or usage (nothing written), 1 failure during the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

logger = logging.getLogger("attndb_peft")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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


def _config_help(name: str) -> str:
    from .config import AttnDBConfig

    for f in dataclasses.fields(AttnDBConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="Debug logging, and tracebacks on errors.")
    group.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors; no progress bars.")


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="Train a concept with the three AttnDreamBooth stages.",
        description="Train a concept (token embedding, attn2 LoRA, U-Net LoRA or full) and write the adapter folder.",
    )
    p.add_argument("--model", help=_config_help("model"))
    p.add_argument("--images", help=_config_help("images"))
    p.add_argument("--category", help=_config_help("category"))
    p.add_argument("--output", help=_config_help("output"))
    p.add_argument("--token", help=_config_help("token"))
    p.add_argument("--config", help="YAML or JSON file of AttnDBConfig settings; flags given here override it.")
    p.add_argument("--revision", help=_config_help("revision"))
    p.add_argument("--variant", help=_config_help("variant"))
    p.add_argument("--resolution", type=int, help=_config_help("resolution") + " Default 512.")
    p.add_argument("--batch-size", type=int, dest="batch_size", help=_config_help("batch_size") + " Default 8.")
    p.add_argument("--steps", type=_three(int), help="Steps of stages 1,2,3, e.g. 60,100,500 (the paper's).")
    p.add_argument(
        "--learning-rates",
        type=_three(float),
        dest="learning_rates",
        help="Learning rates of stages 1,2,3; default 1e-3,2e-4,2e-5 (stage 3 full: 2e-6).",
    )
    p.add_argument("--stage3", choices=("lora", "full"), dest="stage3_mode", help=_config_help("stage3_mode"))
    p.add_argument("--regularizer", choices=("per_layer", "pooled"), help=_config_help("regularizer"))
    p.add_argument("--seed", type=int, help=_config_help("seed") + " Default 0.")
    p.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "fp16", "bf16"),
        dest="mixed_precision",
        help=_config_help("mixed_precision"),
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        dest="gradient_checkpointing",
        help=_config_help("gradient_checkpointing"),
    )
    p.add_argument(
        "--save-dtype", choices=("fp16", "bf16", "fp32"), dest="save_dtype", help=_config_help("save_dtype")
    )
    p.add_argument("--random-crops", type=int, dest="random_crops", help=_config_help("random_crops"))
    p.add_argument("--no-flip", action="store_false", default=None, dest="flip", help="Disable horizontal flips.")
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
    _add_common(p)
    p.set_defaults(handler=_cmd_train)


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
    if args.steps is not None or args.learning_rates is not None:
        config = config.with_stage_values(steps=args.steps, learning_rates=args.learning_rates)
    return config


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    config = config_from_args(args)
    if config.push_to_hub:
        from .hub import check_repo_id

        check_repo_id(config.push_to_hub)  # before hours of training, not after
    trainer = Trainer(config)
    result = trainer.run()
    logger.info("Adapter written to %s", result.output_dir)
    for stage, seconds in sorted(result.stage_seconds.items()):
        logger.info("  stage %d: %.1f s", stage, seconds)
    for path in result.files:
        logger.info("  %s", path)
    print(result.output_dir)
    accelerator = getattr(trainer, "accelerator", None)
    if config.push_to_hub and (accelerator is None or accelerator.is_main_process):
        from .hub import push_to_hub

        url = push_to_hub(result.output_dir, config.push_to_hub)
        logger.info("Pushed to the Hub: %s", url)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attndb",
        description="AttnDreamBooth personalization for Stable Diffusion, shipped as PEFT/LoRA adapters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_push_parser(sub)
    return parser


def _usage_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .loading import AdapterError
    from .trainer import InputError

    return (AdapterError, ConfigError, DataError, InputError)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("attndb_peft").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attndb` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with code 2 on usage errors
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    _setup_logging(verbose, quiet)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("attndb: interrupted; checkpoints written so far are kept (continue with --resume).", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        code = EXIT_USAGE if isinstance(exc, _usage_errors()) else EXIT_FAILURE
        if verbose:
            logger.exception("attndb %s failed", args.command)
        message = str(exc) if code == EXIT_USAGE else f"{type(exc).__name__}: {exc}"
        print(f"attndb {args.command}: error: {message}", file=sys.stderr)
        if not verbose and code == EXIT_FAILURE:
            print("(run again with --verbose for the traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
