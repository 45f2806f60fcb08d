"""The diagnostics behind budget_diagnostic.json and rank_curve.json (run on 2026-11-27, 2-core CPU, 1 thread):
AttnDB and the baselines on the tuning concepts 900-901 (never evaluated), scored like the tuning grid (12 prompts
x 2 images, no attention maps), through `world_quality.run_one`, so each run is reused when its settings match.

    python diagnostics.py budget OUT   # every main method at the frozen factor 3, --steps-scale 2 (4x the budget)
    python diagnostics.py stage1 OUT   # AttnDB, factor 3 on stages 2-3, stage 1 at 1/3 and 1/9 of it, half steps
    python diagnostics.py rank OUT     # AttnDB, stage-2/3 LoRA rank 4 and 32 at factors 1 and 3, half steps

The session ran `budget` on (db, attndb, attndb_full, ti_db) x 900 and (attndb, db) x 901 only.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/, for world_quality

import torch  # noqa: E402
import world_quality as wq  # noqa: E402

BUDGET_JOBS = [("db", 900), ("attndb", 900), ("attndb_full", 900), ("ti_db", 900), ("attndb", 901), ("db", 901)]


def jobs(kind: str):
    if kind == "budget":
        return 2.0, [("diag/steps2-x3", m, s, {"lr_factor": 3.0}) for m, s in BUDGET_JOBS]
    if kind == "stage1":
        return 0.5, [(f"diag/stage1x{f:.3g}", "attndb", s, {"lr_factor": 3.0, "stage_lr_factors": (f, 1.0, 1.0)})
                     for f in (1 / 3, 1 / 9) for s in (900, 901)]
    if kind == "rank":
        return 0.5, [(f"rank/r{r}-x{f:.3g}", "attndb", s,
                      {"lr_factor": f, "stage2": {"rank": r}, "stage3": {"rank": r}})
                     for f in (3.0, 1.0) for r in (4, 32) for s in (900, 901)]
    raise SystemExit(f"unknown diagnostic {kind!r}: budget, stage1 or rank")


def main() -> None:
    kind, output = sys.argv[1], sys.argv[2]
    steps_scale, todo = jobs(kind)
    torch.set_num_threads(1)
    args = wq.parse_args(["--output", output, "--steps-scale", str(steps_scale)])
    ctx = wq._context(args)
    evaluation = wq._Eval(tuple(args.prompts), 2, args.inference_steps, args.guidance, False)  # tuning scoring
    for key, method, seed, changes in todo:
        started = time.time()
        result, _ = wq.run_one(key, method, seed, changes, ctx, evaluation)
        print(key, method, seed, result["steps"], result["values"], round(time.time() - started), flush=True)


if __name__ == "__main__":
    main()
