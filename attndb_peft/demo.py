# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""`attndb demo`: the whole job on the built-in offline default.

By default the demo runs in the toy world (`attndb_peft.world`), whose small base model was pretrained on
captioned scenes and really composes (contexts, styles, colours), so its pictures mean something:

1. writes the shipped world base model as a diffusers folder, and the "user photos" of a world concept (an object
   with a two-colour pattern that the base model never saw);
2. trains the three AttnDreamBooth stages on them, and a Textual-Inversion-only run of the same length (in a
   second process when the machine has a core to spare);
3. loads both adapters back with `pipe.load_attndb`, draws the same prompts (new contexts, a style, a colour) with
   the same seeds, scores every picture with the world's pixel scorers, and writes a side-by-side grid, per-token
   attention figures and `scores.json`.

`random_weights=True` keeps the few-second smoke path: the tiny random pipeline of `attndb_peft.testing` and a
striped-ball image set, three stages, export, reload, samples; its pictures are noise. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image, ImageDraw

from .adapter_format import MODEL_CARD_NAME
from .config import DEFAULT_VALIDATION_PROMPTS, AttnDBConfig
from .errors import UsageError, arg
from .families import FAMILIES
from .inference import expand_prompt, generate_images, inspect_prompt
from .testing import TINY_RESOLUTION, make_instance_images, save_tiny_pipeline, save_tiny_sdxl_pipeline
from .trainer import Trainer
from .visualize import image_grid, labelled_cells, load_font
from .world import scenes as W
from .world.evaluation import WORLD_GUIDANCE, WORLD_INFERENCE_STEPS, generate
from .world.model import load_world_pipeline, textual_inversion_config, world_config, write_base
from .world.scenes import concept_folder
from .world.scorers import score_image, summarize

__all__ = ["DEMO_STEPS", "WORLD_DEMO_CONCEPT", "WORLD_DEMO_PROMPTS", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

#: Steps of stages 1, 2, 3 in the random-weights demo (the paper's are 60, 100, 500 at batch 8 on real photos).
DEMO_STEPS = (30, 30, 30)
#: The world demo's concept (any seed gives a new one: `attndb world concept --seed S`).
WORLD_DEMO_CONCEPT = 3
#: The world demo's prompts as (style, colour, context): the training prompt, new contexts, styles and a colour.
WORLD_DEMO_PROMPTS = (
    ("photo", None, None),
    ("photo", None, "beach"),
    ("photo", None, "snow"),
    ("painting", None, "brick"),
    ("sketch", None, None),
    ("photo", "purple", "grass"),
)
#: Pictures per prompt and method in the world demo (seeds seed, seed + 1, ...).
WORLD_DEMO_IMAGES = 2
#: Learning rates that visibly move the tiny random model in a few dozen steps (not for real models).
DEMO_LEARNING_RATES = (5e-2, 1e-2, 1e-2)
_MARKER = ".attndb-demo"
_TI_LOG = "ti-adapter.log"  # the background Textual Inversion run's log, moved to ti-adapter/train.log at its end
_PARTS = ("base-model", "instance-images", "adapter", "reloaded", "ti-adapter", "compare", _TI_LOG)


@dataclass
class DemoResult:
    """Where the demo put things (the world demo also fills the comparison fields)."""

    output_dir: Path
    base_model: Path
    instance_images: Path
    adapter: Path
    token: str
    samples: Path
    attention: Path
    seconds: float = 0.0
    training_samples: list[Path] = field(default_factory=list)
    ti_adapter: Path | None = None
    scores: dict | None = None
    concept: str | None = None

    def describe(self) -> str:
        """The lines `attndb demo` prints."""
        world = self.ti_adapter is not None
        lines = [f"attndb demo finished in {self.seconds:.0f} s; everything is under {self.output_dir}:"]
        if world:
            lines += [
                f"  base model (the toy world's, pretrained)       {self.base_model}",
                f"  instance images ({self.concept})",
                f"                                                 {self.instance_images}",
                f"  AttnDB adapter (load with pipe.load_attndb)    {self.adapter}",
                f"  Textual-Inversion-only adapter, same length    {self.ti_adapter}",
                f"  samples + attention maps after each stage      {self.adapter / 'samples'}",
                f"  side by side, same prompts and seeds, scored   {self.samples}",
                f"  per-token attention maps (AttnDB, then TI)     {self.attention}",
                f"  every picture's scores                         {self.samples.parent / 'scores.json'}",
                "Scores (share of pictures; identity: mean similarity to the concept, 0..1):",
            ]
            for method, summary in (self.scores or {}).items():
                parts = [f"{k} {summary[k]:.2f}" for k in _SHOWN if summary.get(k) is not None]
                lines.append(f"  {method:<20} " + ", ".join(parts))
        else:
            lines += [
                f"  base model (tiny random SD, built in code)   {self.base_model}",
                f"  instance images (procedural)                 {self.instance_images}",
                f"  adapter (load with pipe.load_attndb)         {self.adapter}",
                f"  model card                                   {self.adapter / MODEL_CARD_NAME}",
                f"  samples + attention maps after each stage    {self.adapter / 'samples'}",
                f"  reloaded adapter: sample grid                {self.samples}",
                f"  reloaded adapter: per-token attention maps   {self.attention}",
                "The pictures are noise (random weights); the flow is the real one.",
            ]
        place = "in the snow" if world else "in the jungle"  # words the model knows
        lines += [
            "Try next:",
            f'  attndb generate --model {self.base_model} --adapter {self.adapter} --prompt "a photo of a {{}} '
            f'on the beach" --num-images 2 --output {self.output_dir / "generated"}',
            f'  attndb inspect --model {self.base_model} --adapter {self.adapter} --prompt "a photo of a {{}} '
            f'{place}" --output {self.output_dir / "attn.png"}',
        ]
        return "\n".join(lines)


def _short_scores(record: dict) -> str:
    """One picture's scores in a few characters: `ctx+ sty+ id 0.83`."""
    parts = [f"{name}{'+' if record[key] else '-'}" for key, name in
             (("context_ok", "ctx"), ("style_ok", "sty"), ("colour_ok", "col"), ("present", "obj"))
             if record.get(key) is not None]
    if record.get("identity") is not None:
        parts.append(f"id {record['identity']:.2f}")
    return " ".join(parts)


def _stack(blocks: list, title: str):
    """Blocks (PIL images) one under the other under a title line."""
    font = load_font(13)
    width = max(b.width for b in blocks)
    canvas = Image.new("RGB", (width, 22 + sum(b.height for b in blocks)), "white")
    ImageDraw.Draw(canvas).text((4, 4), title, fill="black", font=font)
    y = 22
    for b in blocks:
        canvas.paste(b, (0, y))
        y += b.height
    return canvas


_SHOWN = ("text_alignment", "context_ok", "style_ok", "colour_ok", "present", "identity_ok", "identity")


def _spare_cores() -> int:
    """CPU cores this process may use beyond the one the demo's main run takes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores - 1


def _train_logged(config, log_file: str) -> None:
    """`Trainer(config).run()` in a spawned process, on one thread, its progress and log lines going to `log_file`."""
    torch.set_num_threads(1)
    streams = sys.stdout, sys.stderr
    with open(log_file, "w", encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        try:
            logging.basicConfig(stream=log, level=logging.INFO, format="%(message)s", force=True)
            Trainer(config).run()
        finally:
            sys.stdout, sys.stderr = streams


def _prepare(output: Path) -> None:
    """Use an empty or new folder, or replace an earlier demo's output; refuse anything else."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"{arg('output')} {output}: exists and is not a folder; choose another path.")
    if output.is_dir() and any(output.iterdir()):
        if not (output / _MARKER).is_file():
            raise UsageError(
                f"{arg('output')} {output}: folder is not empty and holds no earlier demo; choose a new or empty "
                "folder."
            )
        for part in _PARTS:
            if (output / part).is_dir():
                shutil.rmtree(output / part)
            else:
                (output / part).unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / _MARKER).write_text("written by attndb demo; a new demo run replaces this folder's content\n")


def run_demo(
    output: str | os.PathLike = "attndb-demo",
    steps: tuple[int, int, int] | None = None,
    seed: int = 0,
    inference_steps: int | None = None,
    random_weights: bool = False,
    concept_seed: int = WORLD_DEMO_CONCEPT,
    num_images: int = WORLD_DEMO_IMAGES,
    family: str = "sd",
) -> DemoResult:
    """Run the offline demo (see the module docstring).

    Args:
        output: the demo's folder; must be new, empty, or an earlier demo's (which is replaced).
        steps (`tuple[int, int, int]`, *optional*): training steps of stages 1, 2, 3; default the world recipe's
            (`DEMO_STEPS` with `random_weights`). The Textual-Inversion run gets their sum.
        seed (`int`): seed of training and sampling (and of the tiny model with `random_weights`).
        inference_steps (`int`, *optional*): denoising steps of the pictures (default 25 in the world, 10 else).
        random_weights (`bool`): the few-second smoke path on a tiny random model instead of the world.
        concept_seed (`int`): the world concept to learn.
        num_images (`int`): world pictures per prompt and method.
        family (`str`): with `random_weights`, the tiny model's family: `"sd"` or `"sdxl"`.

    Returns:
        `DemoResult`: the paths written (and the world demo's scores).
    """
    started = time.perf_counter()
    if family not in FAMILIES:
        raise UsageError(f"{arg('family')} {family!r}: choose one of {', '.join(FAMILIES)}.")
    if family != "sd" and not random_weights:
        raise UsageError(
            f"{arg('family')} {family} runs with {arg('random_weights')} (the toy world's base model is SD-shaped)."
        )
    output = Path(output)
    _prepare(output)
    # The small models' operations are far too small to split across threads: on a busy 2-core machine, torch's
    # default intra-op threads spin against each other and the demo ran ~10x slower than on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if random_weights:
            return _run_random(output, steps or DEMO_STEPS, seed, inference_steps or 10, started, FAMILIES[family])
        return _run_world(output, steps, seed, inference_steps, concept_seed, num_images, started)
    finally:
        torch.set_num_threads(threads)


def _run_random(output: Path, steps, seed: int, inference_steps: int, started: float, family) -> DemoResult:
    base_model = output / "base-model"
    images = output / "instance-images"
    adapter = output / "adapter"
    reloaded = output / "reloaded"

    logger.info("Building the tiny random %s pipeline in %s", family.name.upper(), base_model)
    (save_tiny_sdxl_pipeline if family.is_sdxl else save_tiny_pipeline)(base_model, seed=seed)
    make_instance_images(images, num_images=4, size=48, seed=seed)
    config = AttnDBConfig(
        model=str(base_model),
        images=str(images),
        category="toy",
        output=str(adapter),
        resolution=TINY_RESOLUTION,
        batch_size=2,
        gradient_accumulation_steps=1,  # SDXL's default (4) is for 1024 px on a GPU; this is a few-second smoke run
        seed=seed,
        save_dtype="fp32",
        log_every=5,
        validation_inference_steps=inference_steps,
    ).with_stage_values(steps=steps, learning_rates=DEMO_LEARNING_RATES)
    result = Trainer(config).run()

    logger.info("Loading the adapter back into a fresh pipeline with pipe.load_attndb")
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(str(base_model))
    pipe.set_progress_bar_config(disable=True)
    token = pipe.load_attndb(str(adapter))  # registered on the SD and SDXL pipelines by `import attndb_peft`
    reloaded.mkdir(parents=True, exist_ok=True)
    prompts = [expand_prompt(p, token, config.category) for p in DEFAULT_VALIDATION_PROMPTS]
    rows = [generate_images(pipe, p, num_images=2, seed=seed, steps=inference_steps) for p in prompts]
    samples = reloaded / "samples.png"
    image_grid(rows, row_labels=prompts, column_labels=[f"seed {seed + j}" for j in range(2)]).save(samples)
    attention = reloaded / "attention.png"
    jungle = expand_prompt("a photo of a {} in the jungle", token, config.category)
    inspect_prompt(pipe, jungle, attention, seed=seed, steps=inference_steps)
    return DemoResult(
        output_dir=output,
        base_model=base_model,
        instance_images=images,
        adapter=adapter,
        token=token,
        samples=samples,
        attention=attention,
        seconds=time.perf_counter() - started,
        training_samples=result.sample_files,
    )


def _run_world(output: Path, steps, seed, inference_steps, concept_seed, num_images, started) -> DemoResult:
    inference_steps = inference_steps or WORLD_INFERENCE_STEPS
    base_model, images, adapter = output / "base-model", output / "instance-images", output / "adapter"
    ti_adapter, compare = output / "ti-adapter", output / "compare"
    concept = W.make_concept(concept_seed)
    logger.info("World concept %d: %s", concept_seed, concept.describe())
    write_base(base_model)
    concept_folder(concept_seed, images)

    scenes = [W.Scene(concept.category, col, ctx, sty) for sty, col, ctx in WORLD_DEMO_PROMPTS]
    common = dict(model=str(base_model), images=str(images), category=concept.category, seed=seed)
    # one sample per validation prompt at each stage end: the side-by-side grid below is the demo's main picture
    config = world_config(
        output=str(adapter), validation_inference_steps=inference_steps, validation_images=1, **common
    )
    if steps is not None:
        config = config.with_stage_values(steps=steps)
    ti_config = textual_inversion_config(
        sum(s.steps for s in config.stages), output=str(ti_adapter), validation_prompts=(), **common
    )
    # The two runs are independent and each uses one thread (see `run_demo`): with a core to spare, Textual
    # Inversion trains beside AttnDB in a second process (about a minute less on 2 cores), logging to a file.
    stages = "/".join(str(s.steps) for s in config.stages)
    if _spare_cores() > 0:
        ti_log = output / _TI_LOG
        logger.info("Training AttnDreamBooth (stages %s steps), and beside it Textual Inversion alone for %d steps "
                    "(the same length) in a second process; its log: %s", stages, ti_config.stage1.steps, ti_log)
        # leaving the block waits for the second process, also when the AttnDB run raises
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            ti_run = pool.submit(_train_logged, ti_config, str(ti_log))
            result = Trainer(config).run()
            logger.info("Waiting for the Textual Inversion run (log: %s)", ti_log)
            ti_run.result()  # re-raises the run's error here
        shutil.move(ti_log, ti_adapter / "train.log")
    else:
        logger.info("Training AttnDreamBooth (stages %s steps)", stages)
        result = Trainer(config).run()
        logger.info("Training Textual Inversion alone for %d steps (the same length)", ti_config.stage1.steps)
        Trainer(ti_config).run()

    compare.mkdir(parents=True)
    records, scores = [], {}
    pictures: dict[str, list] = {}
    for method, folder in (("AttnDB", adapter), ("Textual Inversion", ti_adapter)):
        pipe = load_world_pipeline(base_model)
        token = pipe.load_attndb(str(folder), adapter_name="concept")
        prompts = [W.caption(s, token) for s in scenes]
        method_records = []
        for k in range(num_images):
            drawn = generate(pipe, prompts, seed=seed + 1000 * k, steps=inference_steps, guidance=WORLD_GUIDANCE)
            for prompt, scene, picture in zip(prompts, scenes, drawn):
                record = {"method": method, "prompt": prompt, "seed": seed + 1000 * k,
                          **score_image(picture, scene, concept)}
                method_records.append(record)
                pictures.setdefault(prompt.replace(token, "{}"), []).append((method, picture, record))
        records += method_records
        scores[method] = summarize(method_records)
        figure = compare / f"attention-{'attndb' if method == 'AttnDB' else 'ti'}.png"
        inspect_prompt(pipe, prompts[1], figure, seed=seed, steps=inference_steps, guidance=WORLD_GUIDANCE)
    blocks = [
        labelled_cells(
            [Image.fromarray(np.asarray(p)) for _, p, _ in cells],
            [f"{'AttnDB' if m == 'AttnDB' else 'TI'}: {_short_scores(r)}" for m, _, r in cells],
            columns=len(cells),
            cell_size=112,
            title=prompt,
        )
        for prompt, cells in pictures.items()
    ]
    grid = compare / "grid.png"
    _stack(blocks, "Same prompts and seeds: AttnDB (left) vs Textual Inversion alone (right); "
           "+/- = scorer says right/wrong, id = identity 0..1").save(grid)
    (compare / "scores.json").write_text(
        json.dumps({"concept": concept.to_dict(), "summary": scores, "pictures": records}, indent=1),
        encoding="utf-8",
    )
    return DemoResult(
        output_dir=output,
        base_model=base_model,
        instance_images=images,
        adapter=adapter,
        token=config.token,
        samples=grid,
        attention=compare / "attention-attndb.png",
        seconds=time.perf_counter() - started,
        training_samples=result.sample_files,
        ti_adapter=ti_adapter,
        scores=scores,
        concept=concept.describe(),
    )
