# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The SHA-256 of every file a fixed set of seeded runs writes: the check that a refactor keeps behaviour.

    python benchmarks/record_hashes.py --out hashes.json              # record
    python benchmarks/record_hashes.py --check benchmarks/results/hashes/hashes.json

Runs (all on the CPU, one thread, seeded): a tiny SD run with stage 3 as LoRA and one with stage 3 full, a tiny
SDXL run, a tiny SD3 and a tiny Flux run, the TI+DB baseline with accumulated passes and the pooled regularizer,
a world concept at the demo's settings (the shipped base model), and a tiny SD run that is resumed with more
stage-3 steps. Every file of each
output folder is hashed, except what only records a time, a duration or a version: tracker logs (`logs/`), the
model card (it prints the training time) and, in JSON files, keys that hold a time, a duration or a version
(their other keys are hashed as canonical JSON). Safetensors files are hashed by their tensors and header
metadata (less the same keys), in name order.

Float results depend on the machine and the thread count: compare hashes recorded on one machine with one thread
count. `--check FILE` exits 1 and lists every file whose hash differs from FILE's (or is missing or new).
`--tiny` skips the world run (about three of the script's four minutes on a 2-core CPU). `--ignore-keys` leaves
JSON keys out of the hashes: after adding a setting, `--check OLD --ignore-keys NEW_SETTING` shows that only the
setting's own key changed, and a new reference is recorded with `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attndb_peft import AttnDBConfig, train  # noqa: E402
from attndb_peft.demo import WORLD_DEMO_CONCEPT  # noqa: E402
from attndb_peft.testing import (  # noqa: E402
    TINY_RESOLUTION,
    make_instance_images,
    save_tiny_pipeline,
    save_tiny_sdxl_pipeline,
)
from attndb_peft.testing_mmdit import save_tiny_flux_pipeline, save_tiny_sd3_pipeline  # noqa: E402
from attndb_peft.world.model import world_config, write_base  # noqa: E402
from attndb_peft.world.scenes import concept_folder, make_concept  # noqa: E402

#: JSON keys whose values are a time, a duration or a version (differ between identical runs or releases).
VOLATILE_KEYS = ("seconds", "time", "date", "version", "duration", "elapsed", "created", "peak_memory")
#: Files and folders that only record times, durations or versions.
SKIPPED = ("logs", "README.md")

TINY = dict(
    resolution=TINY_RESOLUTION,
    batch_size=2,
    gradient_accumulation_steps=1,
    save_dtype="fp32",
    log_every=1,
    seed=7,
    category="dog",
    validation_prompts=("a photo of {} on the beach",),
    validation_images=1,
    validation_inference_steps=2,
)
TINY_STEPS, TINY_LRS = (3, 3, 3), (5e-2, 1e-2, 1e-2)


#: JSON keys `--ignore-keys` leaves out (settings added since a reference was recorded).
IGNORED_KEYS: set[str] = set()


def _volatile(key: str) -> bool:
    return key in IGNORED_KEYS or any(word in key.lower() for word in VOLATILE_KEYS)


def _strip(value, workdir: str, key: str = ""):
    """`value` less its volatile keys, with JSON held in strings (safetensors metadata) parsed too, the work
    folder's path written as `<workdir>`, and PEFT's `target_modules` (a set, written in Python's per-process
    hash order) sorted."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, str):
        return value.replace(workdir, "<workdir>")
    if isinstance(value, dict):
        return {k: _strip(v, workdir, k) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        items = [_strip(v, workdir) for v in value]
        return sorted(items) if key.endswith("target_modules") and all(isinstance(i, str) for i in items) else items
    return value


def _safetensors_digest(raw: bytes, workdir: str) -> str:
    """A safetensors file's tensors (name, dtype, shape, bytes) in name order and its header metadata less the
    volatile keys: the writer's key order follows Python's per-process string hashing, so the bytes may not."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    digest = hashlib.sha256(json.dumps(_strip(header.pop("__metadata__", {}), workdir), sort_keys=True).encode())
    for name in sorted(header):
        begin, end = header[name]["data_offsets"]
        digest.update(json.dumps([name, header[name]["dtype"], header[name]["shape"]]).encode())
        digest.update(data[begin:end])
    return digest.hexdigest()


def _digest(path: Path, workdir: str) -> str:
    if path.suffix == ".json":
        data = json.dumps(_strip(json.loads(path.read_text()), workdir), sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()
    if path.suffix == ".safetensors":
        return _safetensors_digest(path.read_bytes(), workdir)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hash_folder(folder: Path, workdir: Path) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `folder` except `SKIPPED` ones; the path `workdir` is hashed
    as `<workdir>` wherever a file records it, so recordings made in different folders compare."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part in SKIPPED for part in rel.parts):
            hashes[rel.as_posix()] = _digest(path, str(workdir))
    return hashes


def _tiny_config(model: Path, images: Path, out: Path, **overrides) -> AttnDBConfig:
    settings = {**TINY, **overrides}
    steps = settings.pop("steps", TINY_STEPS)
    return AttnDBConfig(model=str(model), images=str(images), output=str(out), **settings).with_stage_values(
        steps=steps, learning_rates=TINY_LRS
    )


def record(root: Path, world: bool = True) -> dict[str, dict[str, str]]:
    """Run every seeded run under `root`; returns `{run: {file: sha256}}`."""
    sd, sdxl, images = root / "tiny-sd", root / "tiny-sdxl", root / "images"
    save_tiny_pipeline(sd)
    save_tiny_sdxl_pipeline(sdxl)
    make_instance_images(images, num_images=4, size=48)
    runs: dict[str, Path] = {}

    runs["sd-lora"] = train(_tiny_config(sd, images, root / "sd-lora", checkpointing_steps=2))
    runs["sd-full"] = train(_tiny_config(sd, images, root / "sd-full", stage3_mode="full", full_export_rank=4))
    runs["sdxl-lora"] = train(_tiny_config(sdxl, images, root / "sdxl-lora"))
    runs["sd-tidb-accumulated"] = train(  # the TI+DB baseline, two accumulated passes, the pooled regularizer
        _tiny_config(
            sd, images, root / "sd-tidb-accumulated", stage3_train_token=True, batch_size=1,
            gradient_accumulation_steps=2, regularizer="pooled", token_init="random",
        )
    )

    for name, save in (("sd3", save_tiny_sd3_pipeline), ("flux", save_tiny_flux_pipeline)):  # joint attention
        runs[f"{name}-lora"] = train(_tiny_config(save(root / f"tiny-{name}"), images, root / f"{name}-lora"))

    resumed = root / "sd-resumed"
    train(_tiny_config(sd, images, resumed, steps=(3, 3, 2)))
    runs["sd-resumed"] = train(_tiny_config(sd, images, resumed, steps=(3, 3, 4), resume=True))

    if world:
        base, concept_images = root / "world-base", root / "world-images"
        write_base(base)
        concept_folder(WORLD_DEMO_CONCEPT, concept_images)
        category = make_concept(WORLD_DEMO_CONCEPT).category
        config = world_config(
            model=str(base), images=str(concept_images), category=category, seed=0, output=str(root / "world"),
            validation_images=1,
        )
        runs["world-demo"] = train(config)
    return {name: hash_folder(folder, root) for name, folder in runs.items()}


def compare(recorded: dict, now: dict) -> list[str]:
    """Lines naming each file whose hash differs between `recorded` and `now` (missing or new included)."""
    lines = []
    for run in sorted(set(recorded) | set(now)):
        before, after = recorded.get(run, {}), now.get(run, {})
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                state = "missing now" if name not in after else "new" if name not in before else "differs"
                lines.append(f"{run}/{name}: {state}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Write the hashes to this JSON file.")
    parser.add_argument("--check", type=Path, help="Compare with a JSON file written by --out; exit 1 on a change.")
    parser.add_argument("--tiny", action="store_true", help="Skip the world run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (hashes depend on it). Default: 1.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "attndb-record-hashes",
        help="Where the runs write (emptied first; its path is hashed as <workdir>). Default: %(default)s.",
    )
    parser.add_argument(
        "--ignore-keys",
        default="",
        metavar="KEYS",
        help="Comma-separated JSON keys to leave out of every hash: a check across a change that adds a setting "
        "(its key appears in attndb_config.json and state.json) shows that nothing else changed.",
    )
    args = parser.parse_args(argv)
    IGNORED_KEYS.update(k for k in args.ignore_keys.split(",") if k)
    torch.set_num_threads(args.threads)
    # checkpoints keep the global Python and NumPy generators' state: start them from a fixed one
    random.seed(0)
    np.random.seed(0)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    hashes = record(args.workdir, world=not args.tiny)
    shutil.rmtree(args.workdir)
    count = sum(len(v) for v in hashes.values())
    if args.out:
        meta = {"threads": args.threads, "torch": torch.__version__, "machine": os.uname().machine}
        args.out.write_text(json.dumps({"meta": meta, "runs": hashes}, indent=1, sort_keys=True) + "\n")
        print(f"{count} files in {len(hashes)} runs -> {args.out}")
    if args.check:
        recorded = json.loads(args.check.read_text())["runs"]
        if args.tiny:
            recorded = {k: v for k, v in recorded.items() if k != "world-demo"}
        changed = compare(recorded, hashes)
        print("\n".join(changed) if changed else f"all {count} files match {args.check}")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
