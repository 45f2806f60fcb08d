#!/usr/bin/env python
# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Scored checkpoints and automatic selection, measured in the toy world: each method's identity / alignment curve
over its own checkpoints, `select auto` against the fixed final step, and where a concept's pattern spreads.

    python benchmarks/world_checkpoints.py --tune --output wc-tune            # fix the margin on 900, 901
    python benchmarks/world_checkpoints.py --margin M --output wc --workers 2  # the 8 evaluation concepts

Every run is the project's `Trainer` with `score_checkpoints` on, as a user runs it (`attndb train
--score-checkpoints`): the world's scorer (found through its entry point) draws the world's score prompts
(`world.scoring.WORLD_SCORE_PROMPTS`, `--score-images` seeds from the run's seed) at every `--checkpoints`-th of
the last stage's steps and at its start. Those training-time scores are each method's curve (one training run
gives it; only scoring costs) and what the selection rule reads. The rule (`scoring.select_checkpoint`) is
applied offline at every margin of `--margins`, so one run serves every margin.

Held-out evaluation: the final checkpoint and the checkpoint the rule picks (at `--margin`) are exported
(`Trainer.export_checkpoint`), loaded back with `pipe.load_attndb` and scored as `world_quality.py` scores a run
(its 12 prompts, `--images` seeds from 0, other seeds than the score prompts'; identity split into the training
prompt and new prompts). For AttnDB (LoRA) also the ends of stages 1 and 2, with the `[V]` token's share of
cross-attention inside the object: at which stage the concept's pattern appears and where it goes.

Methods: `world_quality.METHODS` (default the main five) at the learning-rate factors `world_quality.py` tuned on
the tuning concepts (`TUNED_FACTORS`, frozen from `benchmarks/results/world_quality_2026-11-28/`), plus
`attndb_attn2` and `attndb_unet`: AttnDB with stage 3's LoRA on the attn2 layers only, or on every linear and
convolution of the U-Net (`stage3_targets`).

`--tune` runs AttnDB on the tuning concepts and picks the margin whose selected checkpoints score best on the
held-out prompt set by `world_quality.py`'s tuning criterion (mean of `identity_ok` and text alignment; ties: the
smaller margin). The evaluation concepts are never used to choose anything.

Output (`--output DIR`): `DIR/results.json`, `DIR/table.md`, `DIR/curves.png` and one JSON per run under
`DIR/runs/` (reused when its settings match: runs can be resumed by running the same command again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world_quality as wq  # noqa: E402

from attndb_peft.checkpoints import CHECKPOINT_DIR, read_json  # noqa: E402
from attndb_peft.config import SELECT_MARGIN  # noqa: E402
from attndb_peft.scoring import SCORES_DIR, SCORES_FILE, select_checkpoint  # noqa: E402
from attndb_peft.trainer import Trainer  # noqa: E402
from attndb_peft.visualize import curve_plot  # noqa: E402
from attndb_peft.world import scenes as W  # noqa: E402
from attndb_peft.world.model import load_world_pipeline, world_config  # noqa: E402
from attndb_peft.world.scorers import score_image  # noqa: E402

logger = logging.getLogger("world_checkpoints")

#: The learning-rate factors `world_quality.py` tuned on the tuning concepts (frozen).
TUNED_FACTORS = {"ti": 10.0, "db": 10.0, "ti_db": 10.0, "attndb": 1.0, "attndb_full": 1.0}
#: Stage-3 target sets compared for AttnDB (`stage3_targets`), tuned as `attndb`.
TARGET_METHODS = {"attndb_attn2": "attn2", "attndb_unet": "unet"}
DEFAULT_METHODS = ("ti", "db", "ti_db", "attndb", "attndb_full")
MARGINS = (0.0, 0.1, 0.25, 0.5, 1.0)
_FORMAT = 1


def _config(method: str, concept_seed: int, args, work: Path):
    concept = W.make_concept(concept_seed)
    images = wq._concept_images(args.output, concept_seed)
    recipe = world_config(model=str(args.base), images=str(images), category=concept.category, output=str(work),
                          validation_prompts=(), overwrite=True, seed=args.seed)
    base_method = "attndb" if method in TARGET_METHODS else method
    config = wq.method_config(base_method, recipe, lr_factor=TUNED_FACTORS[base_method],
                              steps_scale=args.steps_scale)
    changes = {"stage3_targets": TARGET_METHODS[method]} if method in TARGET_METHODS else {}
    scored = max(i for i, s in enumerate(config.stages, 1) if s.steps > 0)
    every = max(1, math.ceil(config.stages[scored - 1].steps / args.checkpoints))
    return dataclasses.replace(config, score_checkpoints=True, score_images=args.score_images,
                               checkpointing_steps=every, validation_inference_steps=args.inference_steps,
                               **changes), concept


def _checkpoint_path(work: Path, config, stage: int, step: int) -> Path | None:
    """The checkpoint holding the models at (stage, step); step 0 is the previous stage's end (None for stage 1)."""
    if step == 0:
        if stage == 1:
            return None
        stage, step = stage - 1, config.stages[stage - 2].steps
    return work / CHECKPOINT_DIR / f"stage{stage}-step{step}"


def _evaluate_checkpoint(path: Path, config, concept, args, attention: bool) -> dict:
    """Export the checkpoint (all three stages rebuilt, later stages untrained) and score it on the held-out set."""
    out = path.parent.parent / "exports" / path.name
    shutil.rmtree(out, ignore_errors=True)
    export_config = dataclasses.replace(config, output=str(out), score_checkpoints=False, select="last")
    Trainer(export_config).export_checkpoint(path, 3)
    evaluation = wq._Eval(prompts=wq.EVAL_PROMPTS, images=args.images, inference_steps=args.inference_steps,
                          guidance=wq.WORLD_GUIDANCE, attention=attention)
    scores, _ = wq._evaluate(args.base, out, concept, evaluation, config)
    split = wq._prompt_split(scores)
    new = [r for r in scores["records"] if scores["prompt_templates"][r["prompt"]] != wq.TRAINING_TEMPLATE]
    context = [float(r["context_ok"]) for r in new if r.get("context_ok") is not None]
    presence = [float(r["present"]) for r in new]
    shutil.rmtree(out, ignore_errors=True)
    return {**scores["values"], **split, "context_new_prompts": float(np.mean(context)) if context else None,
            "presence_new_prompts": float(np.mean(presence)) if presence else None}


def _vae_ceiling(concept, args) -> float:
    """The share of the held-out new prompts' ground-truth renders of the concept that still beat the distractors
    after the world's VAE encodes and decodes them: what a perfect denoiser could reach."""
    pipe = load_world_pipeline(args.base)
    rng = np.random.default_rng([concept.seed, 77])
    oks = []
    for style, colour, context in wq.EVAL_PROMPTS:
        scene = W.Scene(concept.category, colour, context, style)
        if W.caption(scene, "[V]") == f"a photo of a [V] {concept.category}" or style == "sketch":
            continue
        pictures = np.stack([W.render(scene, rng, concept=concept)[0] for _ in range(args.images)])
        x = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        out = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        oks += [bool(score_image(p, scene, concept)["identity_ok"]) for p in out]
    return float(np.mean(oks))


def base_model_scores(args, category: str) -> dict:
    """The base model alone on the held-out new prompts with the category and no token (same seeds as the
    evaluation): the context and presence a personalized model starts from."""
    pipe = load_world_pipeline(args.base)
    scenes = [W.Scene(category, colour, context, style) for style, colour, context in wq.EVAL_PROMPTS
              if (style, colour, context) != ("photo", None, None)]
    records = []
    for k in range(args.images):
        pictures = wq.generate(pipe, [W.caption(s) for s in scenes], seed=wq._SAMPLE_SEED + 1000 * k,
                               steps=args.inference_steps, guidance=wq.WORLD_GUIDANCE)
        records += [score_image(p, s) for p, s in zip(pictures, scenes)]
    context = [float(r["context_ok"]) for r in records if r["context_ok"] is not None]
    return {"context_new_prompts": float(np.mean(context)),
            "presence_new_prompts": float(np.mean([float(r["present"]) for r in records]))}


def run_one(method: str, concept_seed: int, args) -> dict:
    """Train one (method, concept) with scored checkpoints, evaluate its final and selected checkpoints."""
    result_file = args.output / "runs" / f"{method}-{concept_seed}.json"
    work = args.output / "work" / f"{method}-{concept_seed}"
    config, concept = _config(method, concept_seed, args, work)
    evaluated = [args.margin] if not args.tune else args.margins
    fingerprint = wq._fingerprint({**wq._settings_of(config), "images": args.images, "format": _FORMAT,
                                   "evaluated": evaluated}, wq._Eval(wq.EVAL_PROMPTS, args.images, 0, 0, True),
                                  args.base_digest)
    if result_file.is_file():
        previous = json.loads(result_file.read_text(encoding="utf-8"))
        if previous.get("fingerprint") == fingerprint:
            return previous
    logger.info("training %s on concept %d", method, concept_seed)
    started = time.perf_counter()
    trained = Trainer(config).run()
    train_seconds = time.perf_counter() - started
    scores = read_json(work / SCORES_DIR / SCORES_FILE)
    records = scores["checkpoints"]
    stage = records[-1]["stage"]
    chosen = {m: select_checkpoint(records, m)["checkpoint"] for m in args.margins}
    started = time.perf_counter()
    # tuning reads every margin's choice on the held-out set; an evaluation only the frozen margin's
    wanted = {records[-1]["checkpoint"], *(chosen.values() if args.tune else [chosen[args.margin]])}
    jobs = {}  # checkpoint name -> (path, with attention)
    for name in sorted(wanted):
        record = next(r for r in records if r["checkpoint"] == name)
        jobs[name] = (_checkpoint_path(work, config, record["stage"], record["step"]), False)
    ends = {}
    if method == "attndb":  # where the pattern appears: after stage 1, after stage 2, at the end (with attention)
        ends = {f"stage {s}": f"stage{s}-step{config.stages[s - 1].steps}" for s in (1, 2, 3)}
        jobs.update({name: (work / CHECKPOINT_DIR / name, True) for name in ends.values()})
    done = {name: _evaluate_checkpoint(path, config, concept, args, attention)
            for name, (path, attention) in jobs.items()}
    evaluated = {name: done[name] for name in wanted}
    stage_ends = {label: done[name] for label, name in ends.items()}
    result = {
        "method": method, "concept": concept_seed, "fingerprint": fingerprint,
        "settings": wq._settings_of(config), "scored_stage": stage,
        "curve": [{"checkpoint": r["checkpoint"], "step": r["step"], "training": r["training"], "new": r["new"]}
                  for r in records],
        "selected": chosen, "evaluated": evaluated, "stage_ends": stage_ends,
        "vae_ceiling": _vae_ceiling(concept, args),
        "train_seconds": round(train_seconds, 1), "scoring_seconds": scores["seconds"],
        "stage_seconds": {str(k): round(v, 1) for k, v in trained.stage_seconds.items()},
        "eval_seconds": round(time.perf_counter() - started, 1),
    }
    wq._write_json_atomic(result_file, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _worker(job):
    method, seed, args = job
    torch.set_num_threads(args.threads)
    logging.getLogger("attndb_peft").setLevel(logging.WARNING)
    return run_one(method, seed, args)


def run_all(args, methods, concepts) -> list[dict]:
    jobs = [(m, c, args) for m in methods for c in concepts]  # method by method: a stopped run keeps whole methods
    for seed in concepts:
        wq._concept_images(args.output, seed)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            return list(pool.map(_worker, jobs))
    return [_worker(job) for job in jobs]


# ------------------------------------------------------------------------------------------------ the report
def _goal(values: dict, ceiling: float) -> bool | None:
    """The goal on one run: context and presence >= 0.75 on new prompts and beating the distractors in >= 30 % of
    them; None where the concept's own renders through the VAE beat them in < 70 % (not asked there)."""
    if ceiling < 0.7:
        return None
    return (values["context_new_prompts"] >= 0.75 and values["presence_new_prompts"] >= 0.75
            and values["identity_ok_new_prompts"] >= 0.3)


def summarize(runs: list[dict], methods, margin: float) -> dict:
    ci = wq.confidence_interval
    out = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        n = len(mine[0]["curve"])
        curve = []
        for i in range(n):
            point = {"step": mine[0]["curve"][i]["step"]}
            for part in ("training", "new"):
                for axis in ("identity", "text_alignment"):
                    point[f"{axis}_{part}"] = ci([r["curve"][i][part].get(axis) for r in mine])
            curve.append(point)
        keys = ("identity_ok_new_prompts", "identity_ok_training_prompt", "text_alignment", "context_new_prompts",
                "presence_new_prompts")
        final = {k: ci([r["evaluated"][r["curve"][-1]["checkpoint"]][k] for r in mine]) for k in keys}
        picked = {k: ci([r["evaluated"][_chosen(r, margin)][k] for r in mine]) for k in keys}
        differences = {k: ci([r["evaluated"][_chosen(r, margin)][k] - r["evaluated"][r["curve"][-1]["checkpoint"]][k]
                              for r in mine]) for k in keys}
        goals = [_goal(r["evaluated"][r["curve"][-1]["checkpoint"]], r["vae_ceiling"]) for r in mine]
        goals_sel = [_goal(r["evaluated"][_chosen(r, margin)], r["vae_ceiling"]) for r in mine]
        stage_ends = {}
        if all(r["stage_ends"] for r in mine):
            for label in mine[0]["stage_ends"]:
                stage_ends[label] = {k: ci([r["stage_ends"][label][k] for r in mine]) for k in
                                     (*keys, "attention_share", "attention_mask_fraction")}
        out[method] = {
            "label": _label(method),
            "runs": len(mine), "curve": curve, "final": final, "selected": picked,
            "selected_minus_final": differences,
            "selected_steps": [_chosen(r, margin) for r in mine],
            "goal_met_final": goals, "goal_met_selected": goals_sel,
            "stage_ends": stage_ends,
            "train_seconds": ci([r["train_seconds"] for r in mine]),
            "scoring_seconds": ci([r["scoring_seconds"] for r in mine]),
        }
    return out


def _label(method: str) -> str:
    return f"AttnDB {TARGET_METHODS[method]} LoRA" if method in TARGET_METHODS else wq.METHODS[method].label


def _chosen(run: dict, margin: float) -> str:
    selected = run["selected"]
    return selected[str(margin)] if str(margin) in selected else selected[margin]


def tune(runs: list[dict], margins) -> dict:
    """Each margin's tuning score: the mean over tuning concepts of (identity_ok + text alignment) / 2 of the
    checkpoint it selects, on the held-out prompt set (the selected checkpoints are evaluated in `run_one`)."""
    scores = {}
    for m in margins:
        values = [r["evaluated"][_chosen(r, m)] for r in runs]
        scores[str(m)] = float(np.mean([(v["identity_ok"] + v["text_alignment"]) / 2 for v in values]))
    best = max(scores.values())
    chosen = min(float(m) for m, s in scores.items() if s >= best - 1e-12)
    return {"scores": scores, "margin": chosen}


def _fmt(c: dict) -> str:
    return "-" if c["mean"] is None else (f"{c['mean']:.3f}" if c["half_width"] is None
                                          else f"{c['mean']:.3f} ± {c['half_width']:.3f}")


def markdown(summary: dict) -> str:
    """The report's tables: held-out scores at the final and the selected checkpoint, selected minus final
    (paired per concept), the training-time curves, the stage ends and the base model's own context and presence;
    mean ± half width of the 95 % t-interval over concepts."""
    keys = ("identity_ok_new_prompts", "identity_ok_training_prompt", "text_alignment", "context_new_prompts",
            "presence_new_prompts")
    head = "beats distractors, new | training prompt | text alignment | context, new | presence, new"
    out = [f"| method | n | checkpoint | {head} | goal met |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        for which, goals in (("final", s["goal_met_final"]), ("selected", s["goal_met_selected"])):
            asked = [g for g in goals if g is not None]
            cells = " | ".join(_fmt(s[which][k]) for k in keys)
            out.append(f"| {s['label']} | {s['runs']} | {which} | {cells} | {sum(asked)} of {len(asked)} |")
    out += ["", "Selected minus final, per concept:", "", f"| method | {head} |", "|---|---|---|---|---|---|"]
    for s in summary.values():
        out.append(f"| {s['label']} | " + " | ".join(_fmt(s["selected_minus_final"][k]) for k in keys) + " |")
    out += ["", "Training-time scores (the score prompts; identity = beats distractors), by step of the last stage:",
            "", "| method | step | identity, new | text alignment, new | identity, training "
            "| text alignment, training |", "|---|---|---|---|---|---|"]
    for s in summary.values():
        for p in s["curve"]:
            cells = " | ".join(_fmt(p[k]) for k in ("identity_new", "text_alignment_new", "identity_training",
                                                    "text_alignment_training"))
            out.append(f"| {s['label']} | {p['step']} | {cells} |")
    for s in summary.values():
        if s["stage_ends"]:
            out += ["", f"{s['label']} at each stage's end (held-out prompts):", "",
                    f"| stage | {head} | [V] attention in mask | mask's share of the picture |",
                    "|---|---|---|---|---|---|---|---|"]
            for label, v in s["stage_ends"].items():
                cells = " | ".join(_fmt(v[k]) for k in (*keys, "attention_share", "attention_mask_fraction"))
                out.append(f"| {label} | {cells} |")
    first = next(iter(summary.values()))
    out += ["", "The base model alone (no concept, the category's word) on the same new prompts: context "
            f"{_fmt(first['base_model']['context_new_prompts'])}, presence "
            f"{_fmt(first['base_model']['presence_new_prompts'])} (over the first method's concepts)."]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> None:
    series = []
    for s in summary.values():
        points = [(p["text_alignment_new"]["mean"], p["identity_new"]["mean"], str(p["step"]),
                   p["text_alignment_new"]["half_width"], p["identity_new"]["half_width"]) for p in s["curve"]]
        series.append((s["label"], [p for p in points if None not in p[:2]]))
    curve_plot(series, path, x_label="text alignment, new score prompts",
               y_label="beats distractors, new score prompts",
               title="Scored checkpoints in the world (labels: step; bars: 95 % CI over concepts)")


def _margins(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers in [0, 1] separated by commas.") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers in [0, 1] separated by commas.")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("world-checkpoints"))
    p.add_argument("--tune", action="store_true", help="Fix the margin on the tuning concepts.")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--concepts", type=wq._seeds, help="Default 0-7 (--tune: the tuning concepts).")
    p.add_argument("--margin", type=float, default=SELECT_MARGIN,
                   help="The margin the evaluation selects with (default the frozen SELECT_MARGIN).")
    p.add_argument("--margins", type=_margins, default=list(MARGINS), help="Margins the rule is applied at.")
    p.add_argument("--checkpoints", type=int, default=4, help="Scored checkpoints after the last stage's start.")
    p.add_argument("--score-images", type=int, default=4)
    p.add_argument("--images", type=int, default=4, help="Held-out evaluation seeds per prompt.")
    p.add_argument("--steps-scale", type=float, default=1.0, help="Multiplies the recipe's steps (tests: 0.01).")
    p.add_argument("--inference-steps", type=int, default=wq.WORLD_INFERENCE_STEPS,
                   help="Denoising steps of the scores and the evaluation (default the world's).")
    p.add_argument("--model", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true",
                   help="Write the report from the run files already in --output (a method's missing concepts left "
                   "out: its n says how many); train nothing.")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.base = args.model or wq.SHIPPED_DIR
    args.base_digest = wq._file_digest(args.base)
    args.methods = args.methods.split(",")
    if args.tune:
        args.concepts = args.concepts or list(wq.TUNING_CONCEPTS)
        args.margins = sorted(set(args.margins))
    else:
        args.concepts = args.concepts or list(wq.EVAL_CONCEPTS)
        if set(args.concepts) & set(wq.TUNING_CONCEPTS):
            p.error("--concepts: the tuning concepts are not evaluated; give others.")
    args.margins = sorted(set(args.margins) | {args.margin})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("attndb_peft").setLevel(logging.WARNING)
    started = time.perf_counter()
    methods = ["attndb"] if args.tune else args.methods
    if args.report_only:
        files = [args.output / "runs" / f"{m}-{c}.json" for m in methods for c in args.concepts]
        runs = [json.loads(f.read_text(encoding="utf-8")) for f in files if f.is_file()]
        methods = [m for m in methods if any(r["method"] == m for r in runs)]
        if not methods:
            raise SystemExit(f"--report-only: no run files of {', '.join(args.methods)} in {args.output / 'runs'}.")
    else:
        runs = run_all(args, methods, args.concepts)
    report = {"benchmark": "world_checkpoints", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": " ".join(["python benchmarks/world_checkpoints.py", *args.argv]),
              "machine": wq._machine(), "concepts": args.concepts, "margins": args.margins,
              "tuned_factors": TUNED_FACTORS,
              "runs": {m: sorted(r["concept"] for r in runs if r["method"] == m) for m in methods}}
    if args.tune:
        report["tuning"] = tune(runs, args.margins)
        print(json.dumps(report["tuning"], indent=1))
    categories = sorted({W.make_concept(c).category for c in args.concepts})
    report["base_model"] = {c: base_model_scores(args, c) for c in categories}
    report["summary"] = summarize(runs, methods, args.margin)
    for method, s in report["summary"].items():  # the base model's own context and presence, over the same concepts
        mine = [W.make_concept(r["concept"]).category for r in runs if r["method"] == method]
        s["base_model"] = {k: wq.confidence_interval([report["base_model"][c][k] for c in mine])
                           for k in ("context_new_prompts", "presence_new_prompts")}
    report["margin"] = args.margin
    report["table"] = markdown(report["summary"])  # after base_model: the table reads it
    plot(report["summary"], args.output / "curves.png")
    report["seconds"] = round(time.perf_counter() - started, 1)
    wq._write_json_atomic(args.output / "results.json", report)
    (args.output / "table.md").write_text(report["table"], encoding="utf-8")
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
