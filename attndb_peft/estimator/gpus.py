# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The GPUs the estimate speaks about: memory, published dense tensor throughput and memory bandwidth, and what
a CUDA process holds beyond its tensors.

Throughput is the vendors' dense (no sparsity) bf16/fp16 tensor-core figure with float32 accumulation, the
mode PyTorch's matmuls use (GeForce cards run it at half their fp16-accumulate rate). Figures are from the
vendors' data sheets and architecture whitepapers.

Beyond the tensors a step's counters see:
- **cuBLAS workspaces**: PyTorch gives each (cuBLAS handle, stream) pair a workspace from the caching allocator,
  so it is inside `torch.cuda.max_memory_allocated`: 32 MiB on Hopper (compute capability 9.0), 8 MiB + 128 KiB
  elsewhere (PyTorch's `CublasHandlePool.cpp` defaults), one for the forward thread and one for the autograd
  engine's device thread, which runs the backward.
- **The CUDA context** (kernels, cuBLAS/cuDNN handles): outside the allocator, about 0.5 GiB on recent cards with
  lazy module loading (CUDA >= 11.7).
- **The caching allocator's reserve**: memory the allocator holds in cached, partly used blocks. The estimate
  keeps `ALLOCATOR_HEADROOM` of the peak free for it when it says whether a run fits a card. Not measured here;
  reserved/allocated ratios of 1.05-1.2 are what PyTorch's memory snapshots of training loops commonly show.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ALLOCATOR_HEADROOM", "CUDA_CONTEXT_GIB", "GPUS", "Gpu", "local_gpu"]

#: Share of the predicted peak kept free for the caching allocator's fragmentation (see the module docstring).
ALLOCATOR_HEADROOM = 0.10
#: The CUDA context and library handles, outside the allocator (GiB).
CUDA_CONTEXT_GIB = 0.5
_MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    """One GPU model.

    Attributes:
        key (`str`): its name on the command line (`--gpu`).
        name (`str`): how tables name it.
        memory_gib (`float`): its memory as `torch.cuda.get_device_properties().total_memory` reads, in GiB.
        tflops (`float`): dense bf16 (fp16 without bf16) tensor throughput with fp32 accumulation, TFLOP/s.
        bandwidth_gbs (`float`): memory bandwidth, GB/s.
        capability (`tuple[int, int]`): CUDA compute capability.
    """

    key: str
    name: str
    memory_gib: float
    tflops: float
    bandwidth_gbs: float
    capability: tuple[int, int]

    @property
    def workspace_bytes(self) -> int:
        """The cuBLAS workspaces of a training process (forward and backward threads)."""
        per_handle = 32 * _MIB if self.capability == (9, 0) else 8 * _MIB + 128 * 1024
        return 2 * per_handle

    @property
    def mixed_precision(self) -> str:
        """What `mixed_precision="auto"` trains in there (`training.runtime.resolve_mixed_precision`)."""
        return "bf16" if self.capability >= (8, 0) else "fp16"

    def usable_gib(self) -> float:
        """What the tensors of a run may take: the memory less the CUDA context."""
        return self.memory_gib - CUDA_CONTEXT_GIB


GPUS: dict[str, Gpu] = {
    g.key: g
    for g in (
        Gpu("h100", "H100 SXM 80GB", 79.2, 989.0, 3350.0, (9, 0)),
        Gpu("a100", "A100 SXM 80GB", 79.2, 312.0, 2039.0, (8, 0)),
        Gpu("a100-40gb", "A100 40GB", 39.4, 312.0, 1555.0, (8, 0)),
        Gpu("l4", "L4 24GB", 22.0, 121.0, 300.0, (8, 9)),
        Gpu("rtx4090", "RTX 4090 24GB", 23.6, 82.6, 1008.0, (8, 9)),
        Gpu("rtx3090", "RTX 3090 24GB", 23.6, 35.6, 936.0, (8, 6)),
        Gpu("t4", "T4 16GB", 14.6, 65.0, 320.0, (7, 5)),
    )
}


def local_gpu() -> Gpu | None:
    """This machine's first CUDA device as a `Gpu`, or None without one: its memory and capability as torch reads
    them, and the throughput and bandwidth of the `GPUS` entry whose name it carries and whose memory it has (0
    for a card not listed: its time is not predicted)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory / 2**30
    for gpu in GPUS.values():
        model = gpu.name.split()[0] if not gpu.name.startswith("RTX") else " ".join(gpu.name.split()[:2])
        if model.lower() in props.name.lower() and abs(gpu.memory_gib - memory) < 0.1 * memory:
            return dataclasses.replace(gpu, name=props.name, memory_gib=memory)
    return Gpu("local", props.name, memory, 0.0, 0.0, (props.major, props.minor))
