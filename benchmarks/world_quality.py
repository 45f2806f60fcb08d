#!/usr/bin/env python
# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The paper's comparison reproduced in the toy world: AttnDreamBooth against Textual Inversion, DreamBooth and
TI+DB, with the ablations of its stages and regularizer, on concepts no setting was tuned on.

    python benchmarks/world_quality.py --output wq                 # the full run (tuning grid, then evaluation)
    python benchmarks/world_quality.py --quick --output wq-quick   # 2 concepts, main methods, short recipe (CI)
    python benchmarks/world_quality.py --sweep --output wq-sweep   # the LoRA rate x rank sweep (tuning concepts)

Every method is trained by the project's own `Trainer` (nothing re-implemented here) and loaded back with
`pipe.load_attndb` before it is scored, like a user would. The world recipe (`world.model.BASE_SETTINGS`: steps,
learning rates, ranks) is read at run time.

Methods (`--methods`, names below; `main` / `ablations` / `all` select groups):

- `ti`: Textual Inversion, the embedding alone at TI's long recipe, as `world.model.textual_inversion_config` (stage 1
  only, no regularizer, the world's TI rate), `TI_PAPER_STEPS / 660` x the recipe's total steps.
- `db`: DreamBooth, the full U-Net with a fixed rare token: stages 1-2 skipped, stage 3 `full` for all the steps,
  no regularizer, `token_init='random'` (a token the model has no prior for; its embedding never trains).
- `ti_db`: TI+DB, the embedding and the full U-Net jointly: as `db` with `token_init='category'` and
  `stage3_train_token=True` (the token at the recipe's stage-1 rate, the U-Net at the full fine-tune's).
- `attndb`: AttnDB, the default (stage-3 LoRA): the world recipe. `attndb_full`: the recipe, `stage3_mode='full'`.
- `attndb_fast`: AttnDB at the authors' fast recipe, as the ratios `--recipe fast` applies to the paper's (stage 3
  at 200/500 of the steps, 5x the LoRA rate, half the images per step); tuned with `attndb`'s factor.
- `no_stage1` / `no_stage2` / `no_stage3`: AttnDB with that stage's steps 0. `no_reg`: every stage's lambdas 0.
  `pooled`: `regularizer='pooled'` (the paper's Eq. 2; `attndb` uses `per_layer`).

Budgets: AttnDB's stage steps are the recipe's (times `--steps-scale`); `db` and `ti_db` get the same total
(the paper's TI+DB: 660 steps, as AttnDB's 60/100/500); `ti` gets `TI_PAPER_STEPS / 660` times it. Full fine-tunes
(`db`, `ti_db`, `attndb_full`) run at the recipe's stage-3 LoRA rate times the project's full/LoRA ratio
(`config.STAGE3_LEARNING_RATES`), and export with an unlimited SVD rank, so the loaded LoRA is their exact weight
delta (biases and norms, which `export` leaves out, are the only loss).

Fair scaling (one procedure for every method): each tuned method (`ti`, `db`, `ti_db`, `attndb`, `attndb_full`)
multiplies all its learning rates by each factor of `--grid` (default `LR_GRID`) and is trained on the tuning
concepts `TUNING_CONCEPTS` (never evaluated: `--concepts` refuses them); the factor with the best mean of
`identity_ok` (the concept beats every distractor) and text alignment over them is frozen (ties: the one nearest
1). Ablations and `pooled` use `attndb`'s factor: an ablation removes a part at fixed settings. The grid, the
scores and the frozen settings are in the JSON.

Per method and evaluation concept: `len(EVAL_PROMPTS)` prompts with `[V]` (context, style and colour changes) x
`--images` seeds, scored by `world.scorers`; the `[V]` token's share of cross-attention inside the object's mask
(`inference.token_attention_maps` on one seed per prompt, mask by `scorers.object_mask`; the mask's share of the
picture is the uniform-attention baseline); the learned embedding's cosine to its initialisation. Every metric
gets a 95 % t-interval over concepts, computed from the per-concept numbers stored next to it.

Output (`--output DIR`): `DIR/results.json` (or `sweep.json`), the markdown table (printed, `DIR/table.md`),
`DIR/identity_vs_alignment.png` (matplotlib when installed, else PIL), `DIR/grids/METHOD.png` (the same prompts and
seeds for every method: rows are prompts, columns concepts), and one JSON per (method, concept) under
`DIR/runs/` written atomically. Running again with the same `--output` reuses every finished run whose settings
match (a changed setting or base model retrains that run) instead of starting over.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import attndb_peft  # noqa: F401  (registers pipe.load_attndb)
from attndb_peft.config import RECIPES, STAGE3_LEARNING_RATES
from attndb_peft.inference import token_attention_maps
from attndb_peft.stages import random_token_embedding
from attndb_peft.trainer import Trainer
from attndb_peft.visualize import image_grid, load_font
from attndb_peft.world import scenes as W
from attndb_peft.world.evaluation import WORLD_GUIDANCE, WORLD_INFERENCE_STEPS, generate
from attndb_peft.world.model import (
    BASE_SETTINGS,
    SHIPPED_DIR,
    TEXTUAL_INVERSION_LEARNING_RATE,
    load_world_pipeline,
    world_config,
)
from attndb_peft.world.scenes import concept_folder
from attndb_peft.world.scorers import object_mask, score_image, summarize

__all__ = [
    "ABLATIONS",
    "EVAL_CONCEPTS",
    "EVAL_PROMPTS",
    "LR_GRID",
    "MAIN_METHODS",
    "METHODS",
    "METRICS",
    "QUICK_PROMPTS",
    "SWEEP_RANKS",
    "SWEEP_RATES",
    "TI_PAPER_STEPS",
    "TRAINING_TEMPLATE",
    "TUNING_CONCEPTS",
    "Method",
    "confidence_interval",
    "main",
    "markdown_table",
    "method_config",
    "parse_args",
    "run_benchmark",
    "run_jobs",
    "run_one",
    "run_sweep",
    "sample_grids",
    "scaled_steps",
    "scatter_plot",
    "t_quantile",
]

logger = logging.getLogger("world_quality")

#: Concepts the learning-rate grid (and `--sweep`) is run on; never evaluated.
TUNING_CONCEPTS = (900, 901)
#: Evaluation concepts of the full run (`--concepts` overrides; `--quick` takes the first two).
EVAL_CONCEPTS = tuple(range(8))
#: The paper's AttnDB steps (60/100/500): the reference the other budgets are scaled by.
PAPER_STEPS = (60, 100, 500)
#: Textual Inversion's usual long recipe (the diffusers textual_inversion example's 3000 steps).
TI_PAPER_STEPS = 3000
#: Learning-rate factors of the tuning grid (times each method's recipe rates). Widened upward from (1/3, 1, 3)
#: after 4 of the 5 tuned methods picked its top factor (3) at half steps, with no method learning identity.
LR_GRID = (1 / 3, 1.0, 3.0, 10.0, 30.0)
#: `--sweep`: LoRA ranks (stages 2 and 3) and factors on the recipe's stage-2/3 learning rates.
SWEEP_RANKS = (4, 8, 32)
SWEEP_RATES = (0.3, 1.0, 3.0, 10.0)
#: Evaluation prompts as (style, colour, context): the training prompt, new contexts, styles and colours.
EVAL_PROMPTS = (
    ("photo", None, None),
    ("photo", None, "grass"),
    ("photo", None, "beach"),
    ("photo", None, "snow"),
    ("photo", None, "night"),
    ("photo", None, "brick"),
    ("painting", None, None),
    ("painting", None, "beach"),
    ("sketch", None, None),
    ("photo", "red", None),
    ("photo", "blue", "snow"),
    ("photo", "yellow", "grass"),
)
#: `--quick`'s prompts: one context, one style and one colour change.
QUICK_PROMPTS = (("photo", None, "beach"), ("painting", None, None), ("photo", "purple", None))
#: The reported metrics: (key, label).
METRICS = (
    ("identity", "identity"),
    ("identity_ok", "identity beats distractors"),
    ("identity_ok_training_prompt", "beats distractors, training prompt"),
    ("identity_ok_new_prompts", "beats distractors, new prompts"),
    ("text_alignment", "text alignment"),
    ("presence", "presence"),
    ("attention_share", "[V] attention in mask"),
    ("embedding_cosine", "emb. cos to init"),
)
#: The training prompt's template (every method trains on it); the split metrics tell it from the new prompts.
TRAINING_TEMPLATE = "a photo of a [V] [category]"
_SAMPLE_SEED = 0  # pictures of image k use seeds _SAMPLE_SEED + 1000 k + prompt index
_UNLIMITED_RANK = 1 << 20  # full fine-tunes export their exact delta (lora_from_delta caps it at the matrix rank)
_FORMAT = 1


# ------------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: the `--methods` name.
        label: the table's name.
        group: `main` or `ablation`.
        tuned_as: whose learning-rate factor it uses (its own for the tuned methods).
        overrides: `(recipe, steps) -> dict` of `AttnDBConfig` fields (with `steps` the scaled stage steps).
    """

    name: str
    label: str
    group: str
    tuned_as: str
    overrides: Callable[[object, tuple[int, int, int]], dict]


def _stages(recipe, steps, **per_stage) -> dict:
    """stage1..3 of `recipe` with `steps` and per-stage changes (`stage3={"learning_rate": ...}`)."""
    return {
        f"stage{i}": dataclasses.replace(
            getattr(recipe, f"stage{i}"), steps=steps[i - 1], **per_stage.get(f"s{i}", {})
        )
        for i in (1, 2, 3)
    }


_NO_REG = {"lambda_mu": 0.0, "lambda_var": 0.0}


def _full_rate(recipe) -> float:

    return recipe.stage3.learning_rate * STAGE3_LEARNING_RATES["full"] / STAGE3_LEARNING_RATES["lora"]


def _attndb(recipe, steps) -> dict:
    return _stages(recipe, steps)


def _attndb_fast(recipe, steps) -> dict:
    """The authors' fast recipe carried into the world as the ratios `recipe="fast"` applies to the paper's: stage 3
    at 200/500 of the steps and 5x the LoRA rate (1e-4 / 2e-5), at half the images per step (4 / 8)."""
    fast, paper = RECIPES["fast"], RECIPES["paper"]
    s3_steps = max(1, round(steps[2] * fast["steps"] / paper["steps"])) if steps[2] else 0
    rate = recipe.stage3.learning_rate * fast["learning_rates"]["lora"] / paper["learning_rates"]["lora"]
    return {**_stages(recipe, (steps[0], steps[1], s3_steps), s3={"learning_rate": rate}),
            "batch_size": max(1, recipe.batch_size * fast["batch"] // 8), "recipe": "fast"}


def _attndb_full(recipe, steps) -> dict:
    return {**_stages(recipe, steps, s3={"learning_rate": _full_rate(recipe)}), "stage3_mode": "full",
            "full_export_rank": _UNLIMITED_RANK}


def _without(stage: int):
    def overrides(recipe, steps) -> dict:
        return _stages(recipe, tuple(0 if i == stage - 1 else s for i, s in enumerate(steps)))

    return overrides


def _no_regularizer(recipe, steps) -> dict:
    return _stages(recipe, steps, **{f"s{i}": _NO_REG for i in (1, 2, 3)})


def _pooled(recipe, steps) -> dict:
    return {**_stages(recipe, steps), "regularizer": "pooled"}


def _ti(recipe, steps) -> dict:

    ti_steps = max(1, round(sum(steps) * TI_PAPER_STEPS / sum(PAPER_STEPS)))
    return _stages(
        recipe,
        (ti_steps, 0, 0),
        s1={"learning_rate": TEXTUAL_INVERSION_LEARNING_RATE, **_NO_REG},
        s2=_NO_REG,
        s3=_NO_REG,
    )


def _db(recipe, steps) -> dict:
    return {
        **_stages(recipe, (0, 0, sum(steps)), s1=_NO_REG, s2=_NO_REG,
                  s3={"learning_rate": _full_rate(recipe), **_NO_REG}),
        "stage3_mode": "full",
        "full_export_rank": _UNLIMITED_RANK,
        "token_init": "random",
    }


def _ti_db(recipe, steps) -> dict:
    return {**_db(recipe, steps), "token_init": "category", "stage3_train_token": True}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ti", "Textual Inversion", "main", "ti", _ti),
        Method("db", "DreamBooth", "main", "db", _db),
        Method("ti_db", "TI+DB", "main", "ti_db", _ti_db),
        Method("attndb", "AttnDB (LoRA)", "main", "attndb", _attndb),
        Method("attndb_full", "AttnDB --stage3 full", "main", "attndb_full", _attndb_full),
        Method("attndb_fast", "AttnDB --recipe fast", "recipe", "attndb", _attndb_fast),
        Method("no_stage1", "AttnDB w/o stage 1", "ablation", "attndb", _without(1)),
        Method("no_stage2", "AttnDB w/o stage 2", "ablation", "attndb", _without(2)),
        Method("no_stage3", "AttnDB w/o stage 3", "ablation", "attndb", _without(3)),
        Method("no_reg", "AttnDB w/o regularizer", "ablation", "attndb", _no_regularizer),
        Method("pooled", "AttnDB pooled reg.", "ablation", "attndb", _pooled),
    )
}
MAIN_METHODS = tuple(n for n, m in METHODS.items() if m.group == "main")
ABLATIONS = tuple(n for n, m in METHODS.items() if m.group == "ablation")


def scaled_steps(recipe, steps_scale: float) -> tuple[int, int, int]:
    """The recipe's stage steps times `steps_scale` (rounded up; a stage the recipe runs keeps >= 1 step)."""
    return tuple(math.ceil(s.steps * steps_scale) if s.steps else 0 for s in recipe.stages)


def method_config(
    method: str,
    recipe,
    lr_factor: float = 1.0,
    steps_scale: float = 1.0,
    stage_lr_factors: tuple[float, float, float] = (1.0, 1.0, 1.0),
    **changes,
):
    """The `AttnDBConfig` one method trains with.

    Args:
        method (`str`): a `METHODS` name.
        recipe (`AttnDBConfig`): the world recipe for this concept (`world_config(model=..., images=..., ...)`).
        lr_factor (`float`): multiplies every learning rate the method uses (the tuning grid's factor).
        stage_lr_factors (`tuple`): further factors per stage (the sweep's rate on stages 2-3).
        steps_scale (`float`): multiplies the recipe's stage steps before the method's budget is derived.
        **changes: further fields (e.g. `stage2`/`stage3` dicts for the sweep) applied last.

    Returns:
        `AttnDBConfig`.
    """
    spec = METHODS[method]
    fields = spec.overrides(recipe, scaled_steps(recipe, steps_scale))
    for i in (1, 2, 3):
        stage = fields[f"stage{i}"]
        rate = stage.learning_rate * lr_factor * stage_lr_factors[i - 1]
        fields[f"stage{i}"] = dataclasses.replace(stage, learning_rate=rate)
    for key, value in changes.items():
        fields[key] = dataclasses.replace(fields[key], **value) if isinstance(value, dict) else value
    return dataclasses.replace(recipe, **fields)


# ------------------------------------------------------------------------------------------------ statistics
def _t_cdf_centre(x: float, df: int) -> float:
    """P(0 <= T <= x) for Student's t with `df` degrees of freedom (Simpson's rule on the density)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 400
    h = x / n
    total = 0.0
    for i in range(n + 1):
        t = i * h
        f = math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
        total += f * (1 if i in (0, n) else 4 if i % 2 else 2)
    return total * h / 3


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (p > 0.5) of Student's t with `df` >= 1 degrees of freedom (no scipy needed)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 < p < 1 and df >= 1, got p={p}, df={df}.")
    lo, hi = 0.0, 1.0
    while _t_cdf_centre(hi, df) < p - 0.5:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_centre(mid, df) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def confidence_interval(values, level: float = 0.95) -> dict:
    """Mean and `level` t-interval of per-concept values (None left out).

    Returns:
        `dict`: `mean`, `low`, `high`, `half_width`, `sd` (sample), `n`; bounds are None with fewer than two values.
    """
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if not n:
        return {"mean": None, "low": None, "high": None, "half_width": None, "sd": None, "n": 0}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "sd": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "sd": sd, "n": n}


# ------------------------------------------------------------------------------------------------ one run
def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable), encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _file_digest(folder: Path) -> str:
    """sha256 over the base model's weight and config files (a replaced base model retrains every run)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class _Eval:
    """How runs are scored (part of every run's fingerprint)."""

    prompts: tuple
    images: int
    inference_steps: int
    guidance: float
    attention: bool


def _settings_of(config) -> dict:
    """The training settings a run's result depends on (paths left out)."""
    data = config.to_dict()
    for key in ("model", "images", "output", "overwrite", "resume", "validation_prompts", "log_every"):
        data.pop(key, None)
    return data


def _fingerprint(settings: dict, evaluation: _Eval, base_digest: str) -> str:
    blob = json.dumps({"train": settings, "eval": dataclasses.asdict(evaluation), "base": base_digest,
                       "format": _FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _initial_embedding(base: Path, config):
    """The token's initial embedding (what stage 1 / TI+DB start from), recomputed from the base model."""


    tokenizer = CLIPTokenizer.from_pretrained(str(base), subfolder="tokenizer")
    weight = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder").get_input_embeddings().weight
    with torch.no_grad():
        if config.token_init == "random":
            return random_token_embedding(weight, config.seed)
        ids = tokenizer(config.category, add_special_tokens=False).input_ids
        return weight[ids].float().mean(0)


def _attention_share(pipe, prompt: str, token: str, seed: int, evaluation: _Eval) -> dict:
    """The [V] token's share of its cross-attention inside the object's mask (and the mask's share of the picture,
    what uniform attention would give), on one picture."""

    result = token_attention_maps(pipe, prompt, seed=seed, steps=evaluation.inference_steps,
                                  guidance=evaluation.guidance, height=W.SIZE, width=W.SIZE)
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    attention = result.maps[result.token_ids.index(token_id)]
    mask = object_mask(np.asarray(result.image))
    factor = mask.shape[0] // attention.shape[0]
    attention = np.kron(attention, np.ones((factor, factor))) if factor > 1 else attention
    if not mask.any() or attention.sum() <= 0:
        return {"share": None, "mask_fraction": float(mask.mean())}
    return {"share": float(attention[mask].sum() / attention.sum()), "mask_fraction": float(mask.mean())}


def _evaluate(base: Path, adapter: Path, concept, evaluation: _Eval, config) -> tuple[dict, list]:
    """Load the adapter into a fresh base pipeline with `pipe.load_attndb`, draw and score the prompts."""


    pipe = load_world_pipeline(base)
    token = pipe.load_attndb(str(adapter), adapter_name="concept")
    # Fused into the weights (diffusers' `fuse_lora`, what a user does for fast inference): the same scores (checked
    # to 4 digits on a DreamBooth run) in less than half the time on this CPU (112 s -> 51 s), where the unfused
    # full-rank LoRAs of the full fine-tunes cost as much as the U-Net itself.
    pipe.fuse_lora(adapter_names=["concept"])
    scenes = [W.Scene(concept.category, colour, context, style) for style, colour, context in evaluation.prompts]
    prompts = [W.caption(s, token) for s in scenes]
    records, sheet = [], []
    for k in range(evaluation.images):
        seed = _SAMPLE_SEED + 1000 * k
        pictures = generate(pipe, prompts, seed=seed, steps=evaluation.inference_steps, guidance=evaluation.guidance)
        sheet.append(pictures)
        for i, (scene, picture) in enumerate(zip(scenes, pictures)):
            score = score_image(picture, scene, concept)
            records.append({"prompt": i, "seed": seed + i, **{key: score[key] for key in (
                "style_ok", "context_ok", "colour_ok", "present", "identity", "identity_ok", "area")}})
    summary = summarize(records)
    shares = []
    if evaluation.attention:
        shares = [_attention_share(pipe, p, token, _SAMPLE_SEED + i, evaluation) for i, p in enumerate(prompts)]
    learned = load_file(str(adapter / "attndb_embedding.safetensors"))[token].reshape(-1).float()
    initial = _initial_embedding(base, config)
    cosine = float(torch.nn.functional.cosine_similarity(learned, initial, dim=0))
    values = {
        "identity": summary["identity"],
        "text_alignment": summary["text_alignment"],
        "presence": summary["present"],
        "identity_ok": summary["identity_ok"],
        "attention_share": _mean([s["share"] for s in shares]),
        "attention_mask_fraction": _mean([s["mask_fraction"] for s in shares]) if shares else None,
        "embedding_cosine": cosine,
        "embedding_norm_ratio": float(learned.norm() / initial.norm()),
    }
    templates = [W.caption(s, "[V]").replace(f"[V] {s.category}", "[V] [category]") for s in scenes]
    return {"values": values, "summary": summary, "records": records, "attention": shares,
            "prompts": [p.replace(token, "[V]") for p in prompts], "prompt_templates": templates}, sheet


def _mean(values) -> float | None:
    xs = [v for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def _save_sheet(path: Path, sheet: list) -> None:
    """The run's pictures, raw: one row per prompt, one column per image seed."""

    rows, cols = len(sheet[0]), len(sheet)
    size = sheet[0][0].shape[0]
    canvas = Image.new("RGB", (cols * size, rows * size))
    for c, pictures in enumerate(sheet):
        for r, picture in enumerate(pictures):
            canvas.paste(Image.fromarray(picture), (c * size, r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


def _concept_images(output: Path, seed: int) -> Path:
    """The concept's user photos under `output/concepts/SEED` (written once)."""

    images = output / "concepts" / str(seed)
    if not (images / "concept.json").is_file():
        shutil.rmtree(images, ignore_errors=True)
        concept_folder(seed, images)
    return images


def _run_job(job: tuple, ctx: dict, evaluation: _Eval, threads: int) -> tuple[dict, bool]:
    """`run_one` in a worker process (`--workers`): its own torch threads and log handler."""

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d]: %(message)s")
        logging.getLogger("attndb_peft").setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    return run_one(*job, ctx, evaluation)


def run_jobs(jobs: list[tuple], ctx: dict, evaluation: _Eval, counts: dict) -> list[dict]:
    """Run `(key, method, concept, changes)` jobs, in this process or in `ctx["workers"]` spawned processes (each
    job writes its own result file, so the order they finish in does not matter); results in job order."""
    workers = ctx.get("workers", 1)
    if workers > 1 and len(jobs) > 1:

        for seed in sorted({job[2] for job in jobs}):
            _concept_images(ctx["output"], seed)  # before the workers, which would race to write them
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=sys.path.insert,  # lets a worker import this file by name (also when not run as a script)
            initargs=(0, str(Path(__file__).resolve().parent)),
        )
        with pool:
            futures = [pool.submit(_run_job, job, ctx, evaluation, ctx["threads"]) for job in jobs]
            done = [f.result() for f in futures]
    else:
        done = [run_one(*job, ctx, evaluation) for job in jobs]
    for _, reused in done:
        counts["reused" if reused else "trained"] += 1
    return [result for result, _ in done]


def run_one(
    key: str,
    method: str,
    concept_seed: int,
    config_changes: dict,
    ctx: dict,
    evaluation: _Eval,
) -> tuple[dict, bool]:
    """Train (through `Trainer`), load back and score one (method, concept) run, or reuse its result file.

    Returns:
        `(result, reused)`: the run's JSON and whether it came from an earlier run's file.
    """

    out: Path = ctx["output"]
    result_file = out / "runs" / key / f"{method}-{concept_seed}.json"
    concept = W.make_concept(concept_seed)
    images = _concept_images(out, concept_seed)
    work = out / "work" / key / f"{method}-{concept_seed}"
    recipe = world_config(model=str(ctx["base"]), images=str(images), category=concept.category,
                          output=str(work), validation_prompts=(), overwrite=True, seed=ctx["seed"])
    config = method_config(method, recipe, steps_scale=ctx["steps_scale"], **config_changes)
    settings = _settings_of(config)
    fingerprint = _fingerprint(settings, evaluation, ctx["base_digest"])
    if result_file.is_file():
        try:
            previous = json.loads(result_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
        if previous.get("fingerprint") == fingerprint:
            return previous, True
        logger.info("%s: settings changed since it was written; training again", result_file)
    logger.info("training %s on concept %d (%s)", method, concept_seed, key)
    started = time.perf_counter()
    train_result = Trainer(config).run()
    train_seconds = time.perf_counter() - started
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the adapter stays; resume works from result files
    started = time.perf_counter()
    scores, sheet = _evaluate(ctx["base"], work, concept, evaluation, config)
    _save_sheet(result_file.with_suffix(".png"), sheet)
    result = {
        "method": method,
        "concept": concept_seed,
        "concept_description": concept.describe(),
        "key": key,
        "fingerprint": fingerprint,
        "settings": settings,
        "steps": [s.steps for s in config.stages],
        "learning_rates": [s.learning_rate for s in config.stages],
        "train_seconds": round(train_seconds, 2),
        "stage_seconds": {str(k): round(v, 2) for k, v in train_result.stage_seconds.items()},
        "eval_seconds": round(time.perf_counter() - started, 2),
        "sheet": result_file.with_suffix(".png").name,
        **scores,
    }
    _write_json_atomic(result_file, result)
    return result, False


# ------------------------------------------------------------------------------------------------ the benchmark
def _machine() -> dict:

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _report_header(benchmark: str, started: float, counts, args, ctx: dict) -> dict:
    """What every report of this script opens with: which benchmark, when, how long, on what, from what."""

    return {
        "benchmark": benchmark,
        "format": _FORMAT,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": counts,
        "machine": _machine(),
        "command": " ".join(["python benchmarks/world_quality.py", *args.argv]),
        "base_model": {"path": str(ctx["base"]), "digest": ctx["base_digest"]},
        "recipe": BASE_SETTINGS,
    }


def _tuning_score(values: dict) -> float | None:
    """The tuning criterion: the mean of `identity_ok` (the share of pictures in which the concept beats every
    distractor concept, the validated identity scorer) and text alignment, both in [0, 1].

    Not the continuous `identity` (1 - distance): on the tuning grid every run of every method sat at its floor
    (0.005-0.09) while `identity_ok` ranged 0.18-0.55, so the continuous value could not rank the settings and the
    criterion would have been text alignment alone, which favours learning nothing."""
    if values.get("identity_ok") is None or values.get("text_alignment") is None:
        return None
    return (values["identity_ok"] + values["text_alignment"]) / 2


def _tune(methods: list[str], ctx: dict, grid: tuple[float, ...], evaluation: _Eval, counts: dict) -> dict:
    """Run the learning-rate grid of every tuned method the selection needs on the tuning concepts; return, per
    tuned method, the grid's scores and the frozen factor."""
    tuned = sorted({METHODS[m].tuned_as for m in methods}, key=list(METHODS).index)
    jobs = [(f"tuning/x{factor:.4g}", name, seed, {"lr_factor": factor})
            for name in tuned for factor in grid for seed in ctx["tuning_concepts"]]
    results = iter(run_jobs(jobs, ctx, evaluation, counts))
    report = {}
    for name in tuned:
        points = []
        for factor in grid:
            runs = [next(results) for _ in ctx["tuning_concepts"]]
            per_concept = {str(r["concept"]): _tuning_score(r["values"]) for r in runs}
            scores = [s for s in per_concept.values() if s is not None]
            points.append({
                "lr_factor": factor,
                "learning_rates": runs[0]["learning_rates"],
                "identity": _mean([r["values"]["identity"] for r in runs]),
                "identity_ok": _mean([r["values"].get("identity_ok") for r in runs]),
                "text_alignment": _mean([r["values"]["text_alignment"] for r in runs]),
                "score": float(np.mean(scores)) if scores else None,
                "per_concept": per_concept,
            })
        scored = [p for p in points if p["score"] is not None]
        best = max(scored, key=lambda p: (round(p["score"], 6), -abs(math.log(p["lr_factor"])))) if scored else None
        report[name] = {"grid": points, "lr_factor": best["lr_factor"] if best else 1.0}
    return report


def _prompt_split(run: dict) -> dict:
    """`identity_ok` on the training prompt and on the other (new) prompts, from a run's per-picture records
    (derived, so finished runs need no retraining); None where a side has no scored picture."""
    training = {i for i, t in enumerate(run.get("prompt_templates", [])) if t == TRAINING_TEMPLATE}
    sides: dict[str, list] = {"identity_ok_training_prompt": [], "identity_ok_new_prompts": []}
    for record in run.get("records", []):
        if record.get("identity_ok") is not None:
            side = "identity_ok_training_prompt" if record["prompt"] in training else "identity_ok_new_prompts"
            sides[side].append(float(record["identity_ok"]))
    return {key: _mean(values) for key, values in sides.items()}


def _summarize_method(name: str, runs: list[dict], factor: float) -> dict:
    values = {str(r["concept"]): {**r["values"], **_prompt_split(r)} for r in runs}
    per_concept = {concept: {k: v.get(k) for k, _ in METRICS} for concept, v in values.items()}
    metrics = {k: confidence_interval([v[k] for v in per_concept.values()]) for k, _ in METRICS}
    first = runs[0]
    return {
        "label": METHODS[name].label,
        "group": METHODS[name].group,
        "lr_factor": factor,
        "settings": first["settings"],
        "steps": first["steps"],
        "learning_rates": first["learning_rates"],
        "per_concept": per_concept,
        "metrics": metrics,
        "attention_mask_fraction": confidence_interval(
            [r["values"].get("attention_mask_fraction") for r in runs]),
        "train_seconds_mean": _mean([r["train_seconds"] for r in runs]),
        "eval_seconds_mean": _mean([r["eval_seconds"] for r in runs]),
        "runs": [f"runs/{r['key']}/{r['method']}-{r['concept']}.json" for r in runs],
    }


def _fmt(ci: dict, digits: int = 3) -> str:
    if ci["mean"] is None:
        return "n/a"
    if ci["half_width"] is None:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} ± {ci['half_width']:.{digits}f}"


def markdown_table(methods: dict) -> str:
    """The results as a markdown table: mean ± the 95 % CI's half width over concepts."""
    head = "| method | " + " | ".join(label for _, label in METRICS) + " | lr factor | steps |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for result in methods.values():
        cells = [_fmt(result["metrics"][k]) for k, _ in METRICS]
        steps = "/".join(str(s) for s in result["steps"])
        lines.append(f"| {result['label']} | " + " | ".join(cells) + f" | {result['lr_factor']:.3g} | {steps} |")
    n = max((r["metrics"]["identity"]["n"] for r in methods.values()), default=0)
    lines.append(f"\nMean ± half width of the 95 % t-interval over {n} concepts.")
    return "\n".join(lines)


def scatter_plot(methods: dict, path: Path) -> str:
    """Identity against text alignment, one point per method with its 95 % CI bars; matplotlib when installed,
    else PIL. Returns which one drew it."""
    points = []
    for result in methods.values():
        x, y = result["metrics"]["text_alignment"], result["metrics"]["identity"]
        if x["mean"] is not None and y["mean"] is not None:
            points.append((result["label"], x, y))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _scatter_pil(points, path)
        return "pil"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for label, x, y in points:
        ax.errorbar(x["mean"], y["mean"], xerr=x["half_width"] or 0, yerr=y["half_width"] or 0, fmt="o", capsize=3)
        ax.annotate(label, (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("text alignment (mean of context, style, colour correct)")
    ax.set_ylabel("identity (1 - distance to the concept)")
    ax.set_title("World quality: 95 % CI over concepts")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "matplotlib"


def _scatter_pil(points: list, path: Path) -> None:


    width, height, margin = 640, 500, 60
    values_x = [v for _, x, _ in points for v in (x["low"], x["high"], x["mean"]) if v is not None]
    values_y = [v for _, _, y in points for v in (y["low"], y["high"], y["mean"]) if v is not None]
    x0, x1 = min(values_x + [0.0]), max(values_x + [1.0])
    y0, y1 = min(values_y + [0.0]), max(values_y + [1.0])

    def px(x, y):
        return (margin + (x - x0) / (x1 - x0 or 1) * (width - 2 * margin),
                height - margin - (y - y0) / (y1 - y0 or 1) * (height - 2 * margin))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = load_font(11)
    draw.rectangle([px(x0, y1), px(x1, y0)], outline="black")
    for i in range(6):
        fx, fy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        draw.text((px(fx, y0)[0] - 10, height - margin + 4), f"{fx:.2f}", fill="black", font=font)
        draw.text((4, px(x0, fy)[1] - 6), f"{fy:.2f}", fill="black", font=font)
    draw.text((width // 2 - 120, height - 24), "text alignment (context, style, colour correct)", fill="black",
              font=font)
    draw.text((4, 8), "identity (1 - distance to the concept); bars: 95 % CI over concepts", fill="black", font=font)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    for i, (label, x, y) in enumerate(points):
        colour = colours[i % len(colours)]
        cx, cy = px(x["mean"], y["mean"])
        if x["half_width"] is not None:
            draw.line([px(x["low"], y["mean"]), px(x["high"], y["mean"])], fill=colour, width=2)
        if y["half_width"] is not None:
            draw.line([px(x["mean"], y["low"]), px(x["mean"], y["high"])], fill=colour, width=2)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((cx + 6, cy - 14), label, fill=colour, font=font)
    image.save(path)


def sample_grids(methods: dict, runs: dict, output: Path, prompts: list[str]) -> dict[str, str]:
    """One grid per method: rows are the prompts, columns the concepts' first image seed (the same prompts and
    seeds for every method)."""


    files = {}
    (output / "grids").mkdir(exist_ok=True)
    for name in methods:
        columns, labels = [], []
        for result in runs[name]:
            sheet = Image.open(output / "runs" / result["key"] / result["sheet"]).convert("RGB")
            size = sheet.height // len(prompts)
            columns.append([sheet.crop((0, r * size, size, (r + 1) * size)).resize((96, 96), Image.NEAREST)
                            for r in range(len(prompts))])
            labels.append(f"concept {result['concept']}")
        rows = [[column[r] for column in columns] for r in range(len(prompts))]
        path = output / "grids" / f"{name}.png"
        image_grid(rows, row_labels=prompts, column_labels=labels,
                   title=f"{METHODS[name].label}: seed {_SAMPLE_SEED} + prompt index").save(path)
        files[name] = str(path.relative_to(output))
    return files


def _context(args: argparse.Namespace) -> dict:

    base = Path(args.model) if args.model else SHIPPED_DIR
    if not (base / "model_index.json").is_file():
        raise SystemExit(f"--model {base}: no diffusers pipeline folder (model_index.json missing).")
    return {
        "output": Path(args.output),
        "base": base,
        "base_digest": _file_digest(base),
        "steps_scale": args.steps_scale,
        "seed": args.seed,
        "tuning_concepts": tuple(args.tuning_concepts),
        "workers": args.workers,
        "threads": args.threads,
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    """Tune (unless `--no-tune`), train and score every (method, concept), aggregate, and write the outputs.

    Returns:
        `dict`: what `results.json` holds.
    """
    started = time.perf_counter()
    ctx = _context(args)
    output = ctx["output"]
    output.mkdir(parents=True, exist_ok=True)
    evaluation = _Eval(tuple(args.prompts), args.images, args.inference_steps, args.guidance, True)
    tuning_eval = dataclasses.replace(evaluation, images=max(1, args.images // 2), attention=False)
    counts = {"trained": 0, "reused": 0}
    if args.no_tune:
        tuning = {"skipped": "--no-tune: every method at its recipe rates (factor 1)"}
        factors = {m: 1.0 for m in METHODS}
    else:
        tuning = _tune(args.methods, ctx, tuple(args.grid), tuning_eval, counts)
        factors = {m: tuning[METHODS[m].tuned_as]["lr_factor"] for m in args.methods}
    # concept by concept, so that a run stopped early has finished every method on the same first concepts (run it
    # again, or with fewer --concepts, to report those)
    jobs = [("eval", name, seed, {"lr_factor": factors[name]}) for seed in args.concepts for name in args.methods]
    results = iter(run_jobs(jobs, ctx, evaluation, counts))
    by_concept = [{name: next(results) for name in args.methods} for _ in args.concepts]
    runs = {name: [done[name] for done in by_concept] for name in args.methods}
    methods = {name: _summarize_method(name, runs[name], factors[name]) for name in args.methods}
    prompts = runs[args.methods[0]][0]["prompt_templates"]
    table = markdown_table(methods)
    figure = output / "identity_vs_alignment.png"
    drawn_with = scatter_plot(methods, figure)
    grids = sample_grids(methods, runs, output, prompts)
    report = {
        **_report_header("world_quality", started, counts, args, ctx),
        "settings": {
            "quick": args.quick,
            "steps_scale": args.steps_scale,
            "training_seed": args.seed,
            "tuning_concepts": list(ctx["tuning_concepts"]),
            "evaluation_concepts": list(args.concepts),
            "lr_grid": None if args.no_tune else list(args.grid),
            "tuning_criterion": "mean over tuning concepts of (identity_ok + text_alignment) / 2; "
                                "ties: factor nearest 1",
            "tuning_images_per_prompt": tuning_eval.images,
            "prompts": prompts,
            "images_per_prompt": args.images,
            "sample_seeds": f"{_SAMPLE_SEED} + 1000 k + prompt index, k < {args.images}",
            "attention_seeds": f"{_SAMPLE_SEED} + prompt index (one picture per prompt)",
            "inference_steps": args.inference_steps,
            "workers": args.workers,
            "threads": args.threads,
            "guidance": args.guidance,
            "ti_steps_factor": TI_PAPER_STEPS / sum(PAPER_STEPS),
            "confidence": "95 % Student-t interval over concepts of the per-concept means",
        },
        "tuning": tuning,
        "methods": methods,
        "table": table,
        "figure": {"file": figure.name, "drawn_with": drawn_with},
        "grids": grids,
    }
    _write_json_atomic(output / "results.json", report)
    (output / "table.md").write_text(table + "\n", encoding="utf-8")
    return report


def run_sweep(args: argparse.Namespace) -> dict:
    """The LoRA rate x rank sweep of AttnDB on the tuning concepts, with `--stage3 full` as the reference."""
    started = time.perf_counter()
    ctx = _context(args)
    output = ctx["output"]
    output.mkdir(parents=True, exist_ok=True)
    evaluation = _Eval(tuple(args.prompts), args.images, args.inference_steps, args.guidance, False)
    counts = {"trained": 0, "reused": 0}
    points = []
    cases = [("attndb", rank, rate) for rank in args.sweep_ranks for rate in args.sweep_rates]
    cases.append(("attndb_full", None, 1.0))
    jobs = []
    for method, rank, rate in cases:
        if rank is None:
            key, changes = "sweep/full", {}
        else:
            key, changes = f"sweep/r{rank}-x{rate:.4g}", {"stage2": {"rank": rank}, "stage3": {"rank": rank},
                                                          "stage_lr_factors": (1.0, rate, rate)}
        jobs += [(key, method, seed, changes) for seed in ctx["tuning_concepts"]]
    results = iter(run_jobs(jobs, ctx, evaluation, counts))
    for method, rank, rate in cases:
        runs = [next(results) for _ in ctx["tuning_concepts"]]
        per_concept = {str(r["concept"]): {k: r["values"].get(k) for k in ("identity", "text_alignment", "presence")}
                       for r in runs}
        points.append({
            "method": method,
            "rank": rank,
            "rate_factor": rate,
            "learning_rates": runs[0]["learning_rates"],
            "per_concept": per_concept,
            **{k: confidence_interval([v[k] for v in per_concept.values()]) for k in
               ("identity", "text_alignment", "presence")},
        })
    lines = ["| stage 2/3 | rank | rate factor | lr (s1/s2/s3) | identity | text alignment | presence |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        lrs = "/".join(f"{v:.2g}" for v in p["learning_rates"])
        lines.append(f"| {'LoRA' if p['rank'] else 'full'} | {p['rank'] or '-'} | {p['rate_factor']:.3g} | {lrs} | "
                     f"{_fmt(p['identity'])} | {_fmt(p['text_alignment'])} | {_fmt(p['presence'])} |")
    table = "\n".join(lines)
    report = {
        **_report_header("world_quality --sweep", started, counts, args, ctx),
        "settings": {"tuning_concepts": list(ctx["tuning_concepts"]), "steps_scale": args.steps_scale,
                     "ranks": list(args.sweep_ranks), "rate_factors": list(args.sweep_rates),
                     "prompts": runs[0]["prompt_templates"], "images_per_prompt": args.images,
                     "note": "rate factors multiply the recipe's stage-2 and stage-3 learning rates; ranks set both "
                             "stages'; the full reference runs at the recipe's stage-3 rate x the full/LoRA ratio"},
        "curve": points,
        "table": table,
    }
    _write_json_atomic(output / "sweep.json", report)
    (output / "sweep.md").write_text(table + "\n", encoding="utf-8")
    return report


# ------------------------------------------------------------------------------------------------ CLI
def _seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            seeds += list(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected non-negative seeds such as 0-7 or 3,5,11.")
    return seeds


def _floats(text: str) -> list[float]:
    try:
        values = [float(fractions.Fraction(v.strip())) for v in text.split(",") if v.strip()]  # "1/3" exact
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas.") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers separated by commas.")
    return values


def _ints(text: str) -> list[int]:
    return [int(v) for v in _floats(text)]


def _methods(text: str) -> list[str]:
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        group = {"main": MAIN_METHODS, "ablations": ABLATIONS, "all": tuple(METHODS)}.get(part, (part,))
        for name in group:
            if name not in METHODS:
                raise argparse.ArgumentTypeError(
                    f"--methods: unknown method {name!r}; known: {', '.join(METHODS)}, or main, ablations, all.")
            if name not in names:
                names.append(name)
    return names


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring); `--quick` fills in what was not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="world-quality", help="Folder of results, figures and per-run files.")
    p.add_argument("--quick", action="store_true",
                   help="CI size: 2 concepts, the main methods, steps x 0.25, 3 prompts, 2 images, no tuning grid.")
    p.add_argument("--sweep", action="store_true", help="The LoRA rate x rank sweep on the tuning concepts.")
    p.add_argument("--methods", type=_methods, help="Comma-separated names or groups (main, ablations, all); "
                   "default all (--quick: main).")
    p.add_argument("--concepts", type=_seeds, help="Evaluation concept seeds, e.g. 0-7 or 3,5 (default 0-7; "
                   "--quick 0,1). The tuning concepts are refused.")
    p.add_argument("--tuning-concepts", type=_seeds, default=list(TUNING_CONCEPTS),
                   help="Concepts of the grid and the sweep (default %(default)s).")
    p.add_argument("--grid", type=_floats, default=list(LR_GRID), help="Learning-rate factors of the tuning grid.")
    p.add_argument("--no-tune", action="store_true", help="Skip the grid: every method at factor 1.")
    p.add_argument("--steps-scale", type=float, help="Multiplies the recipe's steps (default 1; --quick 0.25).")
    p.add_argument("--images", type=int, help="Images per prompt (default 4; --quick 2).")
    p.add_argument("--prompt-set", choices=("full", "quick"), help="EVAL_PROMPTS or QUICK_PROMPTS.")
    p.add_argument("--inference-steps", type=int, help="Denoising steps (default the world's).")
    p.add_argument("--guidance", type=float, help="Guidance scale (default the world's).")
    p.add_argument("--sweep-ranks", type=_ints, default=list(SWEEP_RANKS), help="--sweep: LoRA ranks.")
    p.add_argument("--sweep-rates", type=_floats, default=list(SWEEP_RATES),
                   help="--sweep: factors on the recipe's stage-2/3 learning rates.")
    p.add_argument("--model", help="Base model folder (default the shipped world base model).")
    p.add_argument("--seed", type=int, default=0, help="Training seed of every run.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the world's tiny operations do not gain from more).")
    p.add_argument("--workers", type=int, default=1,
                   help="Runs trained at once, each in its own process with --threads threads (default 1; on a "
                   "2-core machine --workers 2 roughly halves the wall time).")
    p.add_argument("-v", "--verbose", action="store_true", help="Log the trainer's progress too.")
    args = p.parse_args(argv)

    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.methods = args.methods or list(MAIN_METHODS if args.quick else METHODS)
    args.concepts = args.concepts or list(EVAL_CONCEPTS[:2] if args.quick else EVAL_CONCEPTS)
    args.steps_scale = args.steps_scale if args.steps_scale is not None else (0.25 if args.quick else 1.0)
    args.images = args.images or (2 if args.quick else 4)
    prompt_set = args.prompt_set or ("quick" if args.quick else "full")
    args.prompts = QUICK_PROMPTS if prompt_set == "quick" else EVAL_PROMPTS
    args.inference_steps = args.inference_steps or WORLD_INFERENCE_STEPS
    args.guidance = args.guidance if args.guidance is not None else WORLD_GUIDANCE
    args.no_tune = args.no_tune or (args.quick and "--grid" not in args.argv)
    clash = sorted(set(args.concepts) & set(args.tuning_concepts))
    if clash and not args.sweep:
        p.error(f"--concepts {clash}: these are tuning concepts; evaluate on concepts no setting was tuned on.")
    if args.steps_scale <= 0 or min(args.images, args.threads, args.workers) < 1:
        p.error("--steps-scale must be > 0, --images, --threads and --workers >= 1.")
    return args


def main(argv=None) -> int:
    """Run the benchmark (or the sweep), print the table; 0 on success."""

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("attndb_peft").setLevel(logging.INFO if args.verbose else logging.WARNING)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = run_sweep(args) if args.sweep else run_benchmark(args)
    finally:
        torch.set_num_threads(threads)
    print(report["table"])
    print(f"\n{report['runs']['trained']} runs trained, {report['runs']['reused']} reused, {report['seconds']:.0f} s; "
          f"results in {Path(args.output) / ('sweep.json' if args.sweep else 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
