# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Resumable checkpoints, written atomically and without pickle.

A checkpoint is a folder `OUT/checkpoints/stage{S}-step{K}/` holding:

- `weights.safetensors`: every trainable tensor so far (the token vector, the stage-2 LoRA, the stage-3
  LoRA or full U-Net), keyed by name;
- `optimizer.safetensors` + `optimizer.json`: the current stage's optimizer state, tensors and the rest (a
  tensor nested in a dict of a parameter's state, as bitsandbytes keeps its quantization state, is keyed
  `index.key.subkey`);
- past `SHARD_SIZE` (a `--stage3 full` checkpoint of SD: ~3.4 GB of weights, ~6.9 GB of AdamW state), a file is
  written in shards `weights-00001-of-00004.safetensors`, ... with `weights.safetensors.index.json`, the layout
  `huggingface_hub.save_torch_state_dict` uses, so that only one shard is ever copied to host memory;
- `rng-{process}.safetensors` + `rng-{process}.json`: every random number generator of each process
  (python, numpy, torch CPU, CUDA, and the trainer's own noise generator);
- `state.json`: stage, step, LR-scheduler state and the settings that must match on resume. Written last.

The folder is assembled under a temporary name and renamed into place, so a kill at any moment leaves
either a complete checkpoint or a temporary folder that `find_latest` ignores.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from .errors import RunError

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "SHARD_SIZE",
    "checkpoint_name",
    "find_latest",
    "list_checkpoints",
    "load_optimizer_state",
    "load_rng_state",
    "load_tensors",
    "optimizer_state_to_files",
    "prune",
    "read_json",
    "rng_state_to_files",
    "save_tensors",
    "write_json_atomic",
]

CHECKPOINT_DIR = "checkpoints"
#: Largest file of a checkpoint; a bigger state is written shard by shard (host memory holds one shard at a time).
SHARD_SIZE = "1GB"
_NAME = re.compile(r"^stage([123])-step(\d+)$")


class CheckpointError(RunError):
    """A checkpoint cannot be read or does not belong to this run."""


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first, as `(stage, step, path)`."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / "state.json").is_file():
                found.append((int(match[1]), int(match[2]), path))
    return sorted(found)


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][2] if found else None


def prune(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest checkpoints so at most `keep` remain; also removes stale temporary folders."""
    root = Path(output_dir) / CHECKPOINT_DIR
    removed = []
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
    if keep is not None:
        for _, _, path in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _save_fsync(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _index_path(path: Path) -> Path:
    return path.with_name(path.name + ".index.json")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str | None = None) -> None:
    """Write `tensors` (on any device) to `path`, or to shards of it past `max_shard_size` (default `SHARD_SIZE`).

    The tensors stay where they are; each shard is copied to the host, written and synced before the next one,
    so a `--stage3 full` checkpoint of SD needs about one shard of host memory rather than ~10 GB.
    """
    tensors = {k: v.detach() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(
        tensors,
        filename_pattern=path.stem + "{suffix}" + path.suffix,
        max_shard_size=max_shard_size or SHARD_SIZE,
    )
    for filename, names in split.filename_to_tensors.items():
        _save_fsync({k: tensors[k].to("cpu").contiguous() for k in names}, path.parent / filename)
    if split.is_sharded:
        write_json_atomic(_index_path(path), {"metadata": split.metadata, "weight_map": split.tensor_to_filename})


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """What `save_tensors(path, ...)` wrote, one file or all its shards, loaded straight onto `device`."""
    index = _index_path(path)
    try:
        if path.is_file() or not index.is_file():
            return load_file(str(path), device=str(device))
        weight_map = read_json(index)["weight_map"]
        tensors = {}
        for filename in sorted(set(weight_map.values())):
            tensors.update(load_file(str(path.parent / filename), device=str(device)))
        if tensors.keys() != weight_map.keys():
            raise ValueError(f"the shards hold {len(tensors)} tensors, the index lists {len(weight_map)}")
        return tensors
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot be read ({exc}); delete this checkpoint folder to resume from an older one."
        ) from None


# -- optimizer -------------------------------------------------------------------------------------------
def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and plain values (for JSON)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    stored: set[int] = set()  # safetensors refuses tensors that share memory: bitsandbytes' quantization maps do

    def split(values: dict, prefix: str) -> dict:
        rest = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                shared = value.untyped_storage().data_ptr() in stored and value.numel() > 0
                tensors[f"{prefix}.{key}"] = value.clone() if shared else value
                stored.add(value.untyped_storage().data_ptr())
            elif isinstance(value, dict):  # bitsandbytes' `__bnb_optimizer_quant_state__`
                rest[key] = split(value, f"{prefix}.{key}")
            else:
                rest[key] = value
        return rest

    for index, values in state["state"].items():
        plain["state"][str(index)] = split(values, str(index))
    return tensors, plain


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        index, *nested, name = key.split(".")
        if name == "step" and not nested:
            # Adam keeps its step count on the CPU unless capturable/fused (then `load_state_dict` moves it), so
            # a state loaded straight onto the GPU must not leave it there.
            value = value.cpu()
        target = state.setdefault(int(index), {})
        for part in nested:
            target = target.setdefault(part, {})
        target[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


# -- random number generators ----------------------------------------------------------------------------
def rng_state_to_files(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG of this process: python, numpy, torch CPU, all CUDA devices, and the trainer's generator."""
    tensors = {"torch_cpu": torch.random.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "generator_device": str(generator.device),
    }
    return tensors, plain


def load_rng_state(generator: torch.Generator, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    generator.set_state(tensors["generator"])


# -- whole checkpoints -----------------------------------------------------------------------------------
def temporary_dir(output_dir: str | os.PathLike, stage: int, step: int) -> Path:
    """The folder a checkpoint is assembled in before `commit` renames it into place."""
    return Path(output_dir) / CHECKPOINT_DIR / f".tmp-{checkpoint_name(stage, step)}"


def commit(tmp: Path, state: dict) -> Path:
    """Write `state.json` last, then rename the folder into place atomically (replacing an older copy)."""
    write_json_atomic(tmp / "state.json", state)
    _fsync_dir(tmp)
    final = tmp.with_name(checkpoint_name(state["stage"], state["step"]))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final
