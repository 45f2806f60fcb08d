# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Counting what a training step holds on a GPU without one: real-size models on PyTorch's `meta` device (shapes
and dtypes, no storage), every tensor's bytes counted as it is allocated and freed (`PeakCounter`, which agrees
with torch's `MemTracker` and is faster) and every FLOP by torch's `FlopCounterMode`, in a pass of its own.

Two things make a `meta` step allocate what a CUDA step allocates rather than what a CPU step would:

- **Autocast.** `torch.autocast` has no `meta` backend, so `CudaAutocast` applies CUDA autocast's policy itself,
  as a torch-function mode (above autograd, where autocast sits, so the casts it adds are recorded and saved the
  way autocast's are): matmuls, linears, convolutions and attention in the low-precision dtype; normalisations,
  softmax, losses and reductions in float32 (e.g. `group_norm` and `layer_norm` return float32 under CUDA
  autocast, which doubles those activations); the low-precision copy of a float32 parameter that requires grad
  is made once per autocast region and reused, as autocast's cast cache does. The op lists are PyTorch's
  (`aten/src/ATen/autocast_mode.cpp`, the "CUDA Op-Specific Behavior" of the AMP docs).
- **Attention.** `F.scaled_dot_product_attention` on `meta` or the CPU takes its math path and materialises the
  `[batch, heads, queries, keys]` matrix, which CUDA's fused kernels never do. `fused_attention` calls the kernel
  CUDA's dispatcher would pick by its own op: FlashAttention-2 (`_scaled_dot_product_flash_attention`) for
  fp16/bf16 without a mask, memory-efficient attention otherwise; both keep only the output and a float32
  log-sum-exp per query for the backward. For checks on the CPU, `target="cpu"` uses the CPU's flash kernel.
  CUDA's fp16 softmax under autocast writes float32 straight from its fp16 input (`half_to_float`), as here.

What the counters do not see is modelled in `gpus.py`: the cuBLAS workspaces (allocated by the caching allocator,
so inside `max_memory_allocated`) and, for whether a run fits a card, the CUDA context and the allocator's cache.
Nothing is rounded here; the caching allocator counts whole blocks (requests rounded up to 512 bytes, a cached
large block not split when less than 1 MiB would remain), of the order of the 0.04-0.11 GiB by which the
prediction of the H100's fused-attention steps is low (docs/performance.md); left out.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from ..amp import autocast_suspended

__all__ = ["CATEGORIES", "CudaAutocast", "PeakCounter", "StepCount", "count_step", "fused_attention"]

#: The breakdown of a peak, in the order it is shown; MemTracker's categories map onto them. The peak also says
#: how much of the activations the attention capture holds (`attention_capture`, part of `activations`).
CATEGORIES = ("weights", "gradients", "optimizer", "activations")

_LOW_PRECISION = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
    torch.addmm,
    torch.Tensor.addmm,
    torch.addbmm,
    torch.addmv,
    torch.mv,
    torch.einsum,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.prelu,
    F.prelu,
}
_FLOAT32 = {
    F.group_norm,
    torch.group_norm,
    F.layer_norm,
    torch.layer_norm,
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    F.log_softmax,
    torch.log_softmax,
    torch.Tensor.log_softmax,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.cross_entropy,
    F.nll_loss,
    F.cosine_similarity,
    F.normalize,
    torch.exp,
    torch.Tensor.exp,
    torch.log,
    torch.Tensor.log,
    torch.pow,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.sum,
    torch.Tensor.sum,
    torch.prod,
    torch.cumsum,
    torch.Tensor.cumsum,
    torch.norm,
    torch.Tensor.norm,
    F.softplus,
    torch.erfinv,
    torch.expm1,
    torch.log1p,
    torch.reciprocal,
}
_ATTENTION = {F.scaled_dot_product_attention}
#: The softmaxes whose fp16 CUDA kernel returns float32 itself (ATen's `softmax(x, dim, dtype=float)` on CUDA).
_SOFTMAX = {
    F.softmax: torch._softmax,
    torch.softmax: torch._softmax,
    torch.Tensor.softmax: torch._softmax,
    F.log_softmax: torch._log_softmax,
    torch.log_softmax: torch._log_softmax,
    torch.Tensor.log_softmax: torch._log_softmax,
}


def fused_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, target="cuda", **kwargs
):
    """`F.scaled_dot_product_attention` by the fused kernel the target's dispatcher picks (see the module
    docstring); the same function of the inputs, without the attention matrix.

    Args:
        query, key, value, attn_mask, dropout_p, is_causal, scale: as in `F.scaled_dot_product_attention`.
        target (`str`): `"cuda"` (FlashAttention-2 for fp16/bf16 without a mask and head size <= 256, else
            memory-efficient attention) or `"cpu"` (the CPU flash kernel).
    """
    if kwargs.get("enable_gqa"):
        raise NotImplementedError("fused_attention: grouped-query attention is not modelled")
    needs_grad = any(t.requires_grad for t in (query, key, value))
    if target == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel takes an additive bias
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale
    )[0]


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casting policy as a torch-function mode (it works on `meta` and CPU tensors alike), with
    `F.scaled_dot_product_attention` replaced by `fused_attention`.

    Enter it once per autocast region (the trainer enters autocast once per forward pass): the cast cache lives
    as long as the region. Enter one with `cache=False` around the backward pass: gradient checkpointing
    recomputes its blocks there under the autocast state of the forward (`torch.utils.checkpoint` restores it),
    each recomputation with its own short-lived casts.

    Args:
        dtype (`torch.dtype`, *optional*): the low-precision dtype (`torch.bfloat16`, `torch.float16`); None:
            no autocast, only the attention substitution.
        target (`str`): the device whose attention kernel is modelled, `"cuda"` or `"cpu"`.
        cache (`bool`): keep one low-precision copy per float32 parameter for the region (autocast's cast cache).
    """

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, target: str = "cuda", cache: bool = True) -> None:
        super().__init__()
        self.dtype, self.target, self.cache = dtype, target, cache
        self._cache: dict[int, torch.Tensor] = {}

    def __enter__(self):
        self._cache = {}
        return super().__enter__()

    def __exit__(self, *exc):
        self._cache = {}
        return super().__exit__(*exc)

    def _cast(self, value, dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or value.dtype == dtype:
            return value
        if value.dtype == torch.float64 and dtype != torch.float32:
            return value  # autocast leaves float64 alone
        if self.cache and value.is_leaf and value.requires_grad and dtype == self.dtype:  # autocast's cast cache
            key = id(value)
            if key not in self._cache:
                self._cache[key] = value.to(dtype)
            return self._cache[key]
        return value.to(dtype)

    def _half_to_float(self, args) -> bool:
        x = args[0] if args else None
        return self.target == "cuda" and isinstance(x, torch.Tensor) and x.dtype == torch.float16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if autocast_suspended() and func not in _ATTENTION:
            return func(*args, **kwargs)
        if func in _ATTENTION:
            if self.dtype is not None:
                args, kwargs = self._cast(args, self.dtype), {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
            return fused_attention(*args, target=self.target, **kwargs)
        if self.dtype is not None and func in _LOW_PRECISION:
            args, kwargs = self._cast(args, self.dtype), {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        elif self.dtype is not None and func in _SOFTMAX and self._half_to_float(args):
            # CUDA's fp16 softmax under autocast writes float32 straight from the fp16 input (`half_to_float`):
            # no float32 copy of the input, and its gradient comes back in fp16
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            return _SOFTMAX[func](args[0], dim, True)
        elif self.dtype is not None and func in _FLOAT32:
            args = self._cast(args, torch.float32)
            kwargs = {k: (self._cast(v, torch.float32) if k != "dtype" else v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _FrozenParameterHooks(TorchFunctionMode):
    """MemTracker hooks the gradient of every parameter of a module it sees run, which torch refuses for frozen
    ones; a frozen parameter never gets a gradient, so it gets a handle that does nothing instead."""

    _HOOKS = {torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._HOOKS and not args[0].requires_grad:
            from collections import OrderedDict

            from torch.utils.hooks import RemovableHandle

            return RemovableHandle(OrderedDict())
        return func(*args, **(kwargs or {}))


@dataclass
class StepCount:
    """What one counted step held and computed.

    Attributes:
        peak (`dict[str, int]`): bytes at the peak by `CATEGORIES`, and `"total"`.
        flops (`int`): FLOPs of one step (forward, backward, optimizer).
    """

    peak: dict[str, int] = field(default_factory=dict)
    flops: int = 0

    @property
    def total(self) -> int:
        return self.peak.get("total", 0)


class PeakCounter(TorchDispatchMode):
    """Live bytes of a device and their peak, by category, counted as the step runs: what `MemTracker` reports,
    at a fraction of its cost (it also keeps per-module statistics, which cost 5-10x a meta step on a U-Net;
    tests/unit/test_estimator.py checks that the two agree).

    Every storage an op returns is counted until it is freed (a weak-reference finaliser on the storage); the
    storages alive before the step (weights, optimizer state, caches) are counted by `resident`. Gradients are
    told apart by a hook on each trainable parameter (a gradient is new bytes the first time it is written in a
    step, as the trainer sets them to None after each update). What the attention capture (attn2, or SD3's and
    Flux's joint attention) computes in float32 for the regularizer (inside `amp.autocast_off`: the scores,
    probabilities, log-sum-exps and the float32 copies of queries and keys) is the `attention_capture` share of
    the activations.

    Args:
        device (`torch.device`): the device counted.
        resident (`dict[str, Iterable[torch.Tensor]]`): tensors alive before the step, by category.
        trainable (`Iterable[torch.Tensor]`): the parameters whose gradients count as gradients.
    """

    def __init__(self, device, resident: dict, trainable: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._seen: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, made by the capture)
        self.capture = self.grads = 0
        base = {name: 0 for name in CATEGORIES}
        for name, tensors in resident.items():
            for t in tensors:
                base[name] += self._adopt(t)
        self.resident = base
        self.live = sum(base.values())
        self.peak = dict(base, attention_capture=0, total=self.live)
        self._graded: set[int] = set()
        self._handles = [
            p.register_post_accumulate_grad_hook(self._grad_written) for p in trainable if p.requires_grad
        ]

    def _adopt(self, t: torch.Tensor) -> int:
        """Count `t`'s storage from now until it is freed; returns the new bytes (0 when already counted)."""
        if t.device != self.device:
            return 0
        if is_traceable_wrapper_subclass(t):  # a quantized weight (torchao's Int8Tensor): its int8 data and scales
            inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
            return sum(self._adopt(x) for x in inner if x is not None)
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return 0
        size, capture = storage.nbytes(), autocast_suspended()
        self._seen[key] = (size, capture)
        self.capture += size if capture else 0
        weakref.finalize(storage, self._freed, key)
        return size

    def _freed(self, key: int) -> None:
        size, capture = self._seen.pop(key, (0, False))
        self.live -= size
        self.capture -= size if capture else 0

    def _grad_written(self, param: torch.Tensor) -> None:
        if id(param) not in self._graded and param.grad is not None:
            self._graded.add(id(param))
            self.grads += param.grad.untyped_storage().nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.live += self._adopt(t)
        if self.live > self.peak["total"]:
            grads = self.resident["gradients"] + min(self.grads, self.live - sum(self.resident.values()))
            fixed = self.resident["weights"] + self.resident["optimizer"] + grads
            self.peak = {
                "weights": self.resident["weights"],
                "gradients": grads,
                "optimizer": self.resident["optimizer"],
                "activations": self.live - fixed,
                "attention_capture": self.capture,
                "total": self.live,
            }
        return out

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)


def count_step(
    step: Callable[[], None],
    modules: Iterable[torch.nn.Module],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    device: torch.device | str = "meta",
    warmup: int = 1,
    extra: Iterable[torch.Tensor] = (),
    tracker: str = "peak",
    flops: bool = True,
) -> StepCount:
    """Count the peak bytes and the FLOPs of `step` (one optimizer step: forward, backward, update).

    The step runs `warmup` times first (uncounted, except for what they leave: the optimizer's state appears at
    the first update), then once with its bytes counted, then (`flops`) once more under `FlopCounterMode`. The
    FLOPs are counted apart because the counter's module tracking keeps tensors alive that the step would have
    freed (measured: +0.9 GiB per accumulated pass on SD 2.1-base with gradient checkpointing), which would
    inflate the peak.

    Args:
        step (`Callable[[], None]`): runs one step; enters `CudaAutocast` itself where the trainer enters
            autocast.
        modules (`Iterable[nn.Module]`): every model whose weights are on the device (their parameters and
            buffers count as weights, trainable or not).
        optimizers (`Iterable[Optimizer]`): their states count as optimizer memory.
        device: the device whose bytes are counted (`"meta"`, or `"cpu"` to count a real CPU step).
        warmup (`int`): steps run before the counted one.
        extra (`Iterable[torch.Tensor]`): other tensors resident on the device (a latent cache), counted as
            activations.
        tracker (`str`): `"peak"` (`PeakCounter`) or `"memtracker"` (torch's `MemTracker`, slower; for checks).
        flops (`bool`): also count the step's FLOPs (one more step).
    """
    modules, optimizers, extra = list(modules), list(optimizers), list(extra)
    for _ in range(warmup):
        step()
    device = torch.device(device)
    if tracker == "memtracker":
        from torch.distributed._tools.mem_tracker import MemTracker

        mem = MemTracker()
        mem.track_external(*modules, *optimizers, *extra)
        with _FrozenParameterHooks(), mem:
            step()
        snapshot = {torch.device(k): v for k, v in mem.get_tracker_snapshot("peak").items()}
        peak = _categories(snapshot.get(device, {}))
    else:
        weights = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        # the moments; AdamW's 0-dim step counters are left out (fused AdamW keeps them on the device: one
        # 512-byte block each, below 0.1 % of any step here)
        state = [
            v
            for o in optimizers
            for s in o.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ]
        counter = PeakCounter(
            device,
            {
                "weights": weights,
                "optimizer": state,
                "gradients": [p.grad for p in weights if p.grad is not None],
                "activations": extra,
            },
            trainable=[p for m in modules for p in m.parameters() if p.requires_grad],
        )
        with counter:
            step()
        peak = dict(counter.peak)
    return StepCount(peak=peak, flops=count_flops(step) if flops else 0)


def count_flops(step: Callable[[], None]) -> int:
    """The FLOPs of one run of `step` (torch's `FlopCounterMode`: matmuls, convolutions and attention, forward
    and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def _categories(snapshot: dict) -> dict[str, int]:
    """MemTracker's peak snapshot in `CATEGORIES`."""
    by = {getattr(k, "value", k): int(v) for k, v in snapshot.items()}
    names = {
        "weights": ("Parameter", "Buffer"),
        "gradients": ("Gradient",),
        "optimizer": ("Optstate",),
        "activations": ("Activation", "Temp", "Other"),
    }
    out = {name: sum(by.get(k, 0) for k in keys) for name, keys in names.items()}
    out["total"] = sum(out.values())
    return out
