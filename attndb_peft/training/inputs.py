# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The checks a run's inputs get before anything heavy is loaded or anything is written.

`check_inputs` collects every problem it can find from the images, masks, output folder, token, category, the
training prompt's length and the U-Net's config, and raises them together (`InputError`), so one fix-and-rerun
cycle sees all of them. `resolve_model_defaults` fills in the settings that depend on the base model.
Messages name settings by their Python names through `errors.arg`; the CLI shows its flags instead.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

from .. import base_model
from .. import checkpoints as ckpt
from ..base_model import BaseModelError, check_base_model, check_quantize_base
from ..config import AttnDBConfig
from ..data import scan_image_folder, scan_masks
from ..errors import UsageError, arg
from ..families import (
    SD,
    family_of_denoiser,
    family_of_model,
    family_of_pipeline,
    family_of_unet_config,
    native_resolution,
)
from ..reporting import check_report_to
from .optimizers import check_optimizer

__all__ = ["InputError", "check_inputs", "load_tokenizer", "resolve_model_defaults", "warn_resolution"]

logger = logging.getLogger(__name__)

#: Full fine-tuning an SDXL U-Net (2.6 B parameters) with AdamW: fp32 weights, gradients and two moments.
_SDXL_FULL_GIB = 41


class InputError(UsageError):
    """Bad input or usage found before training starts (CLI exit code 2). Nothing has been written."""


def load_tokenizer(config: AttnDBConfig):
    """The base model's first tokenizer (`base_model.load_tokenizer` for `config.model`)."""
    return base_model.load_tokenizer(config.model, config.revision, config.model_config)


def check_inputs(config: AttnDBConfig, tokenizer=None, unet_config: dict | None = None) -> list[str]:
    """Check everything about a run's inputs that can be checked without loading the U-Net, VAE or text encoder.

    Checked: the images, the output folder, the token, the category and the training prompt's length (with the
    base model's tokenizer, or `tokenizer` when given), with `masked_loss` the subject masks, the tracker of
    `report_to`, the packages of `optimizer` and `quantize_base`, and a U-Net attndb cannot train (its config,
    or `unet_config`: inpainting/depth models).

    Args:
        config (`AttnDBConfig`): the run's settings.
        tokenizer (*optional*): the base model's first tokenizer, when already loaded.
        unet_config (`dict`, *optional*): the U-Net's config, when already loaded.

    Returns:
        `list[str]`: warnings (e.g. SDXL with a full stage 3).

    Raises:
        InputError: listing every problem found.
    """
    problems: list[str] = []
    report = scan_image_folder(config.images, config.resolution)
    problems += report.problems
    warnings = list(report.warnings)
    if config.masked_loss and report.images:
        masks = scan_masks(report.images, config.masks)
        problems += masks.problems
        warnings += masks.warnings
    if tracker_problem := check_report_to(config.report_to):
        problems.append(tracker_problem)
    if optimizer_problem := check_optimizer(config.optimizer):
        problems.append(optimizer_problem)
    if quantize_problem := check_quantize_base(config.quantize_base):
        problems.append(quantize_problem)
    problems += _output_problems(config)
    try:
        if tokenizer is None:
            check_base_model(config.model, config.revision, model_config=config.model_config)  # one line if unusable
            tokenizer = load_tokenizer(config)
    except BaseModelError as exc:
        problems.append(str(exc))
    except Exception as exc:  # a broken folder: say which
        problems.append(f"{arg('model')} {config.model}: cannot load its tokenizer ({type(exc).__name__}: {exc}).")
    else:
        token_problems, token_warnings = _token_problems(config, tokenizer)
        problems += token_problems
        warnings += token_warnings
    unet_problems, unet_warnings = _unet_problems(config, unet_config)
    problems += unet_problems
    warnings += unet_warnings
    if problems:
        raise InputError("Cannot start training:\n  - " + "\n  - ".join(problems))
    return warnings


def _output_problems(config: AttnDBConfig) -> list[str]:
    """The output folder must be a folder, empty unless resuming or overwriting, with a checkpoint to resume."""
    problems = []
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        problems.append(f"{arg('output')} {out}: exists and is not a folder; choose another path.")
    elif out.is_dir() and any(out.iterdir()) and not (config.resume or config.overwrite):
        problems.append(
            f"{arg('output')} {out}: folder is not empty; pass {arg('resume')} to continue its run, "
            f"{arg('overwrite')} to replace it, or choose an empty folder."
        )
    if config.resume and ckpt.find_latest(out) is None:
        problems.append(
            f"{arg('resume')}: no complete checkpoint in {out / ckpt.CHECKPOINT_DIR}; start without {arg('resume')}."
        )
    return problems


def _token_problems(config: AttnDBConfig, tokenizer) -> tuple[list[str], list[str]]:
    """`(problems, warnings)` of the token and category in the base model's tokenizer."""
    problems, warnings = [], []
    token_ids = tokenizer(config.token, add_special_tokens=False).input_ids
    if config.token in tokenizer.get_vocab() or (len(token_ids) == 1 and token_ids[0] != tokenizer.unk_token_id):
        # a word the tokenizer already has as one token would be hijacked everywhere it appears
        problems.append(
            f"{arg('token')} {config.token!r} already exists in the tokenizer of {config.model}; choose an unused "
            "token such as '<attndb-dog>'."
        )
    if not tokenizer(config.category, add_special_tokens=False).input_ids:
        problems.append(
            f"{arg('category')} {config.category!r} tokenizes to nothing; give the subject's category as a word "
            "such as 'dog'."
        )
    else:
        problems += _prompt_problems(config, tokenizer)
    if re.fullmatch(r"[A-Za-z0-9]+", config.token):
        # the tokenizer splits added tokens out of any text, so 'zwx' also matches inside 'zwxy'
        warnings.append(
            f"{arg('token')} {config.token!r} is plain letters/digits: it will also match inside longer words (e.g. "
            f"'{config.token}s'). A delimited token such as '<{config.token}>' avoids that."
        )
    return problems, warnings


def _prompt_problems(config: AttnDBConfig, tokenizer) -> list[str]:
    """The training prompt must fit the text encoder's window (77 tokens) with the token and category in it."""
    length = len(tokenizer(config.prompt.replace(config.token, " ")).input_ids) + 1  # + the new token's id
    if length > tokenizer.model_max_length:
        return [
            f"{arg('category')} {config.category!r}: the training prompt {config.prompt!r} is {length} tokens long, "
            f"more than the text encoder's {tokenizer.model_max_length}; give a shorter category (one or a few "
            "words)."
        ]
    return []


def _unet_problems(config: AttnDBConfig, unet_config: dict | None) -> tuple[list[str], list[str]]:
    """`(problems, warnings)` of the U-Net: ones attndb cannot train, and settings that will hardly fit, from the
    U-Net's config (read from the model folder when not given; nothing is said when it cannot be read: loading
    the model reports that)."""
    if unet_config is None:
        try:
            family = family_of_model(base_model.config_source(config.model, config.model_config), config.revision)
        except Exception:
            family = SD
        if family.flow_matching:
            warnings = []
            if config.stage3_mode == "full":
                warnings.append(
                    f"{arg('stage3_mode')} full on a {family.pipeline_class} transformer: fp32 weights, gradients and "
                    "two AdamW moments are 16 bytes per parameter (Flux.1's 12 B: about 190 GB; SD3.5-large's 8 B: "
                    f"130 GB; SD3.5-medium's 2.5 B: 40 GB), before activations; {arg('stage3_mode')} lora (the "
                    "default) trains a LoRA instead."
                )
            return _flow_matching_problems(config, family), warnings
        try:
            from diffusers import UNet2DConditionModel

            unet_config = UNet2DConditionModel.load_config(config.model, subfolder="unet", revision=config.revision)
        except Exception:
            return [], []
    problems, warnings = [], []
    if unet_config.get("in_channels", 4) != 4:
        problems.append(
            f"{arg('model')} {config.model}: its U-Net takes {unet_config['in_channels']} input channels (an "
            "inpainting or depth model); attndb trains text-to-image models with 4 latent channels, e.g. SD 1.5 or "
            "SD 2.1."
        )
    if family_of_unet_config(unet_config) is not SD and config.stage3_mode == "full":
        warnings.append(
            f"{arg('stage3_mode')} full on an SDXL U-Net: its AdamW state alone is about {_SDXL_FULL_GIB} GB on the "
            f"device (fp32 weights, gradients and two moments), before activations; {arg('stage3_mode')} lora (the "
            "default) trains a LoRA instead."
        )
    return problems, warnings


def _flow_matching_problems(config: AttnDBConfig, family) -> list[str]:
    """Settings of the DDPM families that mean nothing for a rectified-flow model (SD3, Flux)."""
    problems, name = [], family.pipeline_class
    if config.snr_gamma is not None:
        problems.append(
            f"{arg('snr_gamma')} {config.snr_gamma:g}: Min-SNR weighting is for DDPM models (SD 1.x/2.x, SDXL); "
            f"{config.model} is a {name}, trained by rectified flow; leave {arg('snr_gamma')} out."
        )
    if config.noise_offset:
        problems.append(
            f"{arg('noise_offset')} {config.noise_offset:g}: the offset-noise trick is for DDPM models; "
            f"{config.model} is a {name}, trained by rectified flow; leave {arg('noise_offset')} out."
        )
    targets = dict(family.stage3_targets)
    if config.stage3_targets not in targets:
        problems.append(
            f"{arg('stage3_targets')} {config.stage3_targets}: a U-Net set; {name} takes {' or '.join(targets)}."
        )
    return problems


def resolve_model_defaults(
    config: AttnDBConfig, given: dict, unet=None, vae=None, announce: bool = True
) -> AttnDBConfig:
    """Fill in the defaults that depend on the base model (`AttnDBConfig.for_model`).

    `resolution=None` becomes the model's own size (`families.native_resolution`: 1024 for SDXL, 512 for SD
    2.1-base, 768 for SD 2.1), stage-2/3 `rank=None` the family's LoRA rank, and an unset batch, accumulation or
    checkpointing the family's setting. Read from the U-Net and VAE configs alone, before the input checks, so
    that the checks, `resume`'s comparison and attndb_config.json all see what is trained. A model whose configs
    cannot be read here is resolved from the loaded models instead (`unet`, `vae`), or fails to load with
    loading's own message.

    Args:
        config (`AttnDBConfig`): the run's settings.
        given (`dict`): in-memory components (`Trainer(components=...)`), possibly empty.
        unet, vae (*optional*): the loaded models, once they are.
        announce (`bool`): log the defaults chosen (the main process).

    Returns:
        `AttnDBConfig`: `config`, or a copy with the defaults filled in.
    """
    if not config.model_defaults_missing:
        return config
    if unet is not None:
        configs = (unet.config, vae.config if vae is not None else None)
        family = family_of_denoiser(unet)
    elif given:
        family = family_of_pipeline(SimpleNamespace(**given))
        denoiser = given.get(family.denoiser)
        if denoiser is None:
            return config
        configs = (denoiser.config, given["vae"].config if "vae" in given else None)
    else:
        import diffusers

        source = base_model.config_source(config.model, config.model_config)
        family = family_of_model(source, config.revision)
        try:
            configs = tuple(
                getattr(diffusers, cls).load_config(source, subfolder=sub, revision=config.revision)
                for cls, sub in ((family.denoiser_class, family.denoiser), ("AutoencoderKL", "vae"))
            )
        except Exception:  # reported when the model is loaded
            return config
    resolved = config.for_model(family, native_resolution(*configs))
    if announce:
        _announce_defaults(config, resolved, family.name.upper())
    return resolved


def _announce_defaults(config: AttnDBConfig, resolved: AttnDBConfig, family: str) -> None:
    if config.resolution is None:
        logger.info(f"Resolution: {resolved.resolution} px, the base model's own ({arg('resolution')} to change).")
    if (config.stage2.rank, config.stage3.rank) != (resolved.stage2.rank, resolved.stage3.rank):
        logger.info(
            f"LoRA ranks (stages 2, 3): {resolved.stage2.rank}, {resolved.stage3.rank} (the {family} default; "
            f"{arg('rank')} to change)."
        )
    if None in (config.batch_size, config.gradient_accumulation_steps, config.gradient_checkpointing):
        logger.info(
            f"Batch {resolved.batch_size} per pass x {resolved.gradient_accumulation_steps} accumulated, gradient "
            f"checkpointing {'on' if resolved.gradient_checkpointing else 'off'} (the {family} default; "
            f"{arg('batch_size')}, {arg('gradient_accumulation_steps')}, {arg('gradient_checkpointing')} to change)."
        )


def warn_resolution(config: AttnDBConfig, native: int) -> None:
    """Warn when the run trains at another size than the base model's own (`native`)."""
    if config.resolution != native:
        logger.warning(
            f"{arg('resolution')} {config.resolution}: {config.model} generates at {native} px (e.g. SD 2.1 at "
            "768, SD 2.1-base at 512); training at another size usually makes the concept worse at the model's own "
            f"size. Pass {arg('resolution')} {native} unless you mean it."
        )
