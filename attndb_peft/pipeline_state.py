# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What `load_attndb` changes in a pipeline, and how a failed load or `unload_attndb` takes it out again.

diffusers makes a freshly loaded LoRA the only active one and has no getter for adapter weights, so the active
adapters and every PEFT layer's scaling are read back (`capture_lora_state`) before a load and put back after it
(`activate_new`) or after an undo (`restore`). `undo_load` removes exactly what a failed load added: the load
checked beforehand that neither the adapter name nor the tokens existed, so everything of those names is its own.
The loaded concepts are remembered on the pipeline (`concept_registry`).
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer as TokenizerFast
from torch import nn

from .families import ModelFamily

__all__ = [
    "Concept",
    "LoraState",
    "activate_new",
    "add_token_row",
    "all_adapter_names",
    "capture_lora_state",
    "cheap_resizing",
    "concept_registry",
    "delete_adapter",
    "drop_empty_lora_layers",
    "quiet_missing_text_encoder_lora",
    "remove_token_rows",
    "restore",
    "undo_load",
    "unload_tokens",
]

logger = logging.getLogger(__name__)

# Where the loaded concepts are remembered on a pipeline (adapter name -> Concept).
_REGISTRY_ATTR = "_attndb_concepts"


@dataclass
class Concept:
    """A concept `load_attndb` loaded: its token(s) and where it came from."""

    token: str
    tokens: list[str]  # the token and, for a multi-vector embedding, token_1, token_2, ...
    source: str


@dataclass
class LoraState:
    """Which adapters are active and every LoRA layer's per-adapter scaling (`weight * alpha / r`)."""

    active: list[str]
    scaling: dict[tuple[str, str, str], float] = field(default_factory=dict)


def concept_registry(pipe) -> dict[str, Concept]:
    """The concepts `load_attndb` loaded into `pipe`, by adapter name (kept in the pipeline's `__dict__`)."""
    return pipe.__dict__.setdefault(_REGISTRY_ATTR, {})


def _lora_components(pipe) -> Iterator[tuple[str, nn.Module]]:
    """The pipeline's models that can hold LoRA layers, by component name."""
    for name in getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder")):
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            yield name, model


def all_adapter_names(pipe) -> set[str]:
    """Every LoRA adapter name of the pipeline's LoRA-loadable models, attndb's or not."""
    return {name for _, model in _lora_components(pipe) for name in getattr(model, "peft_config", {})}


def _tuner_layers(pipe) -> Iterator[tuple[str, str, nn.Module]]:
    """Every PEFT layer of those models: `(component, module name, layer)`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component, model in _lora_components(pipe):
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                yield component, name, module


def capture_lora_state(pipe) -> LoraState:
    """Active adapters and the exact per-layer scalings. diffusers has no getter for adapter weights, and
    `set_adapters` may have been given per-block weights, so they are read back from every PEFT layer."""
    state = LoraState(active=[])
    for component, name, module in _tuner_layers(pipe):
        for adapter in module.active_adapters:
            if adapter not in state.active:
                state.active.append(adapter)
        for adapter, scale in getattr(module, "scaling", {}).items():
            state.scaling[(component, name, adapter)] = scale
    return state


def activate_new(pipe, before: LoraState, adapter_name: str, weight: float) -> None:
    """Make `adapter_name` active at `weight` next to the adapters that were active, which keep their exact
    per-layer scalings (`set_adapters` would reset them to one weight per adapter)."""
    pipe.set_adapters([*before.active, adapter_name], [1.0] * len(before.active) + [weight])
    _restore_scalings(pipe, before)


def restore(pipe, state: LoraState) -> None:
    """Put back the recorded active adapters and scalings, layer by layer as diffusers' `set_adapters` does
    (it can't take an empty list, and the recorded scalings may be per block)."""
    present = all_adapter_names(pipe)
    active = [name for name in state.active if name in present]
    for _, _, module in _tuner_layers(pipe):
        module.set_adapter(active)
    _restore_scalings(pipe, state)


def _restore_scalings(pipe, state: LoraState) -> None:
    """Put back each recorded per-layer scaling whose layer and adapter still exist."""
    for (component, name, adapter), scale in state.scaling.items():
        try:
            module = getattr(pipe, component).get_submodule(name)
        except AttributeError:
            continue
        if adapter in getattr(module, "scaling", {}):
            module.scaling[adapter] = scale


def undo_load(pipe, family: ModelFamily, adapter_name: str, tokens: list[str], before: LoraState) -> None:
    """Remove what a failed `load_attndb` added (it checked that neither the adapter nor the tokens existed)."""
    try:
        if adapter_name in all_adapter_names(pipe):
            delete_adapter(pipe, adapter_name)
        unload_tokens(pipe, family, tokens)
        restore(pipe, before)
    except Exception:  # the original error is the one to report
        logger.exception("Could not fully undo the failed load of adapter %r.", adapter_name)


def delete_adapter(pipe, adapter_name: str) -> None:
    """Delete one LoRA adapter, and the empty LoRA layers when it was the last."""
    with warnings.catch_warnings():  # PEFT picks a new active adapter; `restore` sets the right ones right after
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        pipe.delete_adapters(adapter_name)
    drop_empty_lora_layers(pipe)


def drop_empty_lora_layers(pipe) -> None:
    """When no adapter is left, take out the (empty) LoRA layers PEFT keeps around every module it once targeted,
    so the base model runs as loaded and the next load starts from plain modules (PEFT checks each module against
    every existing LoRA layer: ~0.5 s more per SDXL load otherwise)."""
    if not all_adapter_names(pipe) and any(True for _ in _tuner_layers(pipe)):
        pipe.unload_lora_weights()


def unload_tokens(pipe, family: ModelFamily, tokens: list[str]) -> None:
    """Remove `tokens` from every tokenizer/text-encoder pair that has them."""
    for tokenizer, text_encoder in family.components(pipe):
        vocab = tokenizer.get_vocab()
        present = [t for t in tokens if t in vocab]
        if present and family.textual_inversion:
            pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=text_encoder)
            _sync_vocab_size(text_encoder)
        elif present:
            remove_token_rows(pipe, tokenizer, text_encoder, present)


# Where the base rows past a tokenizer's vocabulary are kept on a pipeline (text encoder id -> snapshot).
_SPARE_ROWS_ATTR = "_attndb_spare_rows"


def _spare_rows(pipe, tokenizer, text_encoder) -> tuple[int, torch.Tensor]:
    """`(first id, rows)`: the embedding rows the base model has past its tokenizer's vocabulary (T5: 28 rows past
    32 100 tokens; CLIP: none), as they were before attndb added a token, kept on the pipeline."""
    snapshots = pipe.__dict__.setdefault(_SPARE_ROWS_ATTR, {})
    key = id(text_encoder)
    if key not in snapshots:
        weight = text_encoder.get_input_embeddings().weight
        snapshots[key] = (len(tokenizer), weight[len(tokenizer) :].detach().clone())
    return snapshots[key]


def add_token_row(pipe, tokenizer, text_encoder, token: str, vector: torch.Tensor) -> None:
    """Add `token` to `tokenizer` with embedding `vector` `[width]`: in the first spare row past the vocabulary if
    the matrix has one (T5's), else in a new row (`remove_token_rows` undoes it exactly)."""
    _spare_rows(pipe, tokenizer, text_encoder)
    tokenizer.add_tokens(token)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= text_encoder.get_input_embeddings().num_embeddings:
        with cheap_resizing(text_encoder):
            text_encoder.resize_token_embeddings(token_id + 1)
        _sync_vocab_size(text_encoder)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = vector.to(weight.device, weight.dtype)


def remove_token_rows(pipe, tokenizer, text_encoder, tokens: list[str]) -> None:
    """Remove `tokens` from `tokenizer` (later added tokens move down, as diffusers' `unload_textual_inversion`
    renumbers them) and their rows from the embedding matrix; the rows past the vocabulary get back the base
    model's values, so a pipeline whose concepts are all unloaded equals the base model exactly."""
    first, spare = _spare_rows(pipe, tokenizer, text_encoder)
    ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in tokens)
    state = json.loads(tokenizer._tokenizer.to_str())
    kept = []
    for entry in sorted(state.get("added_tokens", []), key=lambda e: e["id"]):
        if entry["content"] in tokens:
            continue
        entry["id"] -= sum(1 for i in ids if i < entry["id"])
        kept.append(entry)
    state["added_tokens"] = kept
    tokenizer._tokenizer = TokenizerFast.from_str(json.dumps(state))
    embeddings = text_encoder.get_input_embeddings()
    weight = embeddings.weight.detach()
    rows = torch.cat([weight[i:j] for i, j in zip([0, *(i + 1 for i in ids)], [*ids, weight.shape[0]])])
    rows = torch.cat([rows[: len(tokenizer)], spare[max(0, len(tokenizer) - first) :].to(rows)])
    if rows.shape[0] != weight.shape[0]:
        with cheap_resizing(text_encoder):
            text_encoder.resize_token_embeddings(rows.shape[0])
        _sync_vocab_size(text_encoder)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.copy_(rows)


def _sync_vocab_size(text_encoder) -> None:
    # unload_textual_inversion shrinks the embedding matrix but leaves config.vocab_size at the grown size.
    text_encoder.config.vocab_size = text_encoder.get_input_embeddings().num_embeddings


@contextmanager
def cheap_resizing(text_encoder):
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
def quiet_missing_text_encoder_lora():
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
