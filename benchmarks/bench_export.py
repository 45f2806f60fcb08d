# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Time the `--stage3 full` export: the rank-`full_export_rank` factorization of every U-Net weight delta.

The deltas are random (seeded) and shaped like SD2.1-base's 282 linear/conv weights (the U-Net is built on the
`meta` device, so nothing is downloaded and no memory is spent on it); one delta exists at a time. Methods:

- `before`: what the exporter did before it factorized in the tall orientation: a full `torch.linalg.svd` of
  the `[out, in * k * k]` matrix as it comes (wide for most 3x3 convs).
- `exact`: `lora_from_delta(method="exact")`, the default: the same SVD in the tall orientation.
- `randomized`: `lora_from_delta(method="randomized")`: randomized subspace iteration.

Random deltas have a flat spectrum, the worst case for the randomized method and the lowest energy a rank-r
LoRA can keep; a real fine-tune's delta is more concentrated. The time depends on the thread count:
`accelerate launch` runs each process with one thread, the default here.

    python benchmarks/bench_export.py                      # all methods, 1 thread, SD2.1-base shapes
    python benchmarks/bench_export.py --methods exact --limit 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SD21_UNET  # noqa: E402

from attndb_peft.stages import lora_from_delta  # noqa: E402

__all__ = ["delta_shapes", "factorize_before", "main"]

METHODS = ("before", "exact", "randomized")


def delta_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every SD2.1-base U-Net weight the full fine-tune changes (linear and conv weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD21_UNET)
    return [
        (name, tuple(tensor.shape))
        for name, tensor in unet.state_dict().items()
        if name.endswith(".weight") and tensor.ndim in (2, 4)
    ]


def factorize_before(delta: torch.Tensor, rank: int) -> float:
    """The earlier export: full SVD of the matrix in its own orientation. Returns the energy kept."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    _, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    return float(s[:rank].square().sum() / s.square().sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    parser.add_argument("--rank", type=int, default=64, help="full_export_rank (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (accelerate launch uses 1)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N weights (0: all)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        shapes = delta_shapes()
        if args.limit:
            shapes = shapes[: args.limit]
        lora_params = sum(min(args.rank, s[0], prod(s[1:])) * (s[0] + prod(s[1:])) for _, s in shapes)
        report: dict = {
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
            "threads": args.threads,
            "rank": args.rank,
            "weights": len(shapes),
            "delta_params": sum(prod(s) for _, s in shapes),
            "lora_params": lora_params,
            "lora_file_mb_fp16": round(lora_params * 2 / 1e6, 1),
            "methods": {},
        }
        print(f"{len(shapes)} SD2.1-base weight deltas, rank {args.rank}, {args.threads} thread(s)")
        for method in methods:
            seconds, kept, total = 0.0, 0.0, 0.0
            for i, (_, shape) in enumerate(shapes):
                delta = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 1e-3
                started = time.perf_counter()
                if method == "before":
                    retained = factorize_before(delta, args.rank)
                else:
                    retained = lora_from_delta(delta, args.rank, method=method)[1]
                seconds += time.perf_counter() - started
                norm = float(delta.square().sum())
                kept, total = kept + retained * norm, total + norm
            report["methods"][method] = {"seconds": round(seconds, 1), "energy_kept": round(kept / total, 4)}
            print(f"  {method:10s} {seconds:8.1f} s   energy kept {kept / total:.4f}", flush=True)
        mb = lora_params * 2 / 1e6
        print(f"  LoRA at rank {args.rank}: {lora_params / 1e6:.1f} M params, {mb:.1f} MB per fp16 copy")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
    finally:
        torch.set_num_threads(threads)
    return 0


def prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


if __name__ == "__main__":
    sys.exit(main())
