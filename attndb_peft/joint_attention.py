# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Attention capture for the joint-attention transformers of SD3 and Flux.1.

An image query there attends to text AND image tokens in one softmax, so its probability for a text token is
`exp(s q.k_t - lse(q))` with the log-sum-exp over all keys (thousands of image tokens). `key_logsumexp` takes it
from the fused SDPA kernels (or query chunks) with an exact backward: the `[queries, keys]` matrix is never
materialised. The processors keep the stock outputs and fill an `AttentionStore` like `capture_cross_attention`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,
)

from .amp import autocast_off
from .attention import AttentionStore

__all__ = [
    "BLOCKS",
    "FluxAttnCaptureProcessor",
    "JointAttnCaptureProcessor",
    "capture_joint_attention",
    "joint_attention_names",
    "key_column_probs",
    "key_logsumexp",
]

BLOCKS = ("all", "double", "single")
_IMPLS = ("auto", "fused", "chunked")
# Score elements of one query chunk in the fallback (all batch x heads together): 64 MiB of float32.
_CHUNK_ELEMENTS = 1 << 24
# CPU flash attention takes float32/64, CUDA's memory-efficient kernel float32 (no float64); ROCm's kernels are
# other code, whose lse convention is unchecked here.
_FUSED_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": () if torch.version.hip else (torch.float32,)}


def _fused_forward(q: torch.Tensor, k: torch.Tensor, scale: float):
    """`(P @ k, lse [batch, heads, queries] natural log, extra)` from one fused SDPA call with `value=k`; `extra`
    ends with the raw lse the kernel's backward wants."""
    if q.device.type == "cpu":
        # -> (output, logsumexp): lse [B, H, Q] with [B, Q, H] strides, natural log, dtype of q.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=scale)
        extra = (lse,)
    else:
        # -> (output, log_sumexp, philox_seed, philox_offset): lse float32 [B, H, ceil(Q / 32) * 32], natural log.
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, k, None, True, 0.0, False, scale=scale
        )
        extra = (seed, offset, lse)
    if lse.shape[:2] != q.shape[:2] or lse.shape[-1] < q.shape[-2]:
        raise RuntimeError(f"unexpected log-sum-exp shape {tuple(lse.shape)} for queries {tuple(q.shape)}")
    return out, lse[..., : q.shape[-2]].to(q.dtype).contiguous(), extra


def _fused_pt(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, extra, scale: float):
    """`P^T x`: the fused backward's gradient of the value (`dV = P^T dO`), P rebuilt from the saved lse."""
    if q.device.type == "cpu":
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        return op(x, q, k, k, out, extra[-1], 0.0, False, scale=scale)[2]
    op, (seed, offset, lse) = torch.ops.aten._scaled_dot_product_efficient_attention_backward, extra
    return op(x, q, k, k, None, out, lse, seed, offset, 0.0, [False, False, True, False], False, scale=scale)[2]


def _chunked_grads(q, k, g, lse, scale: float, chunk: int, need_q: bool, need_k: bool):
    """`s g * (P k)` and `s P^T (g q)`, exact, from `P_c = exp(s q_c k^T - lse_c)`: chunk x keys at a time."""
    grad_q = torch.empty_like(q) if need_q else None
    grad_k = torch.zeros_like(k) if need_k else None
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        p = torch.exp(q[..., rows, :] @ k.mT * scale - lse[..., rows].unsqueeze(-1))
        if need_q:
            grad_q[..., rows, :] = scale * g[..., rows, :] * (p @ k)
        if need_k:
            grad_k += scale * (p.mT @ (g[..., rows, :] * q[..., rows, :]))
    return grad_q, grad_k


class _KeyLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, scale, impl, chunk):
        # At least float32: bf16 scores and lse would put noise into the small probabilities the regularizer
        # compares; float64 stays float64 (tests). Dtypes only, no `result_type`: a graph break under torch.compile.
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), torch.float32)
        q, k = query.to(dtype), key.to(dtype)
        out = extra = None
        with autocast_off(q.device.type):
            if impl != "chunked" and q.dtype in _FUSED_DTYPES.get(q.device.type, ()):
                try:
                    out, lse, extra = _fused_forward(q, k, scale)
                except (RuntimeError, NotImplementedError) as err:
                    if impl == "fused":
                        raise
                    warnings.warn(f"key_logsumexp: fused SDPA failed ({err}); using query chunks.", stacklevel=3)
            elif impl == "fused":
                raise ValueError(f"key_logsumexp: no fused kernel for {q.dtype} on {q.device.type}.")
            if out is None:
                lse = q.new_empty(q.shape[:-1])
                for start in range(0, q.shape[-2], chunk):
                    rows = slice(start, start + chunk)
                    lse[..., rows] = torch.logsumexp(q[..., rows, :] @ k.mT * scale, dim=-1)
        # The inputs are saved, not their float32 copies: bf16 activations stay small until the backward.
        ctx.save_for_backward(query, key, lse, *((out, *extra) if out is not None else ()))
        ctx.fused, ctx.scale, ctx.impl, ctx.chunk = out is not None, scale, impl, chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        query, key, lse, *rest = ctx.saved_tensors
        q, k, g = query.to(lse.dtype), key.to(lse.dtype), grad_lse.to(lse.dtype).unsqueeze(-1)
        s, need_q, need_k = ctx.scale, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_q = grad_k = None
        with autocast_off(q.device.type):
            if ctx.fused:
                # d lse_i / d q_i = s sum_j p_ij k_j = s SDPA(q, k, v=k)_i: the forward's own output.
                grad_q = s * g * rest[0] if need_q else None
                try:  # d lse_i / d k_j = s p_ij q_i, so grad_k = s P^T (g q): the kernel's dV for dO = g q
                    grad_k = s * _fused_pt((g * q).contiguous(), q, k, rest[0], rest[1:], s) if need_k else None
                except (RuntimeError, NotImplementedError) as err:
                    if ctx.impl == "fused":
                        raise
                    warnings.warn(f"key_logsumexp: fused SDPA backward failed ({err}); using chunks.", stacklevel=2)
            missing_q, missing_k = need_q and grad_q is None, need_k and grad_k is None
            if missing_q or missing_k:
                cq, ck = _chunked_grads(q, k, g, lse, s, ctx.chunk, missing_q, missing_k)
                grad_q, grad_k = (cq if missing_q else grad_q), (ck if missing_k else grad_k)
        grad_q = None if grad_q is None else grad_q.to(query.dtype)
        grad_k = None if grad_k is None else grad_k.to(key.dtype)
        return grad_q, grad_k, None, None, None


def _prepare(query: torch.Tensor, key: torch.Tensor, scale: float | None, impl: str, chunk_size: int | None):
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; use one of {_IMPLS}.")
    if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"expected [batch, heads, tokens, dim] query and key, got {query.shape} and {key.shape}.")
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, query.shape[0] * query.shape[1] * key.shape[-2]))
    return (query.shape[-1] ** -0.5 if scale is None else float(scale)), chunk


def key_logsumexp(
    query: torch.Tensor, key: torch.Tensor, scale: float | None = None, *, impl: str = "auto", chunk_size=None
) -> torch.Tensor:
    r"""
    `log sum_j exp(scale * q_i . k_j)` over all keys, without materialising the `[queries, keys]` scores;
    differentiable with respect to `query` and `key` (exact first derivatives; no double backward).

    Args:
        query (`torch.Tensor`): `[batch, heads, queries, dim]`.
        key (`torch.Tensor`): `[batch, heads, keys, dim]`.
        scale (`float`, *optional*): the score scale, `dim ** -0.5` by default (as SDPA).
        impl (`str`, *optional*, defaults to `"auto"`): `"fused"` (the log-sum-exp of the fused SDPA kernel: CPU
            flash attention, CUDA memory-efficient attention; raises where there is none), `"chunked"` (query
            chunks, exact) or `"auto"` (fused where available, else chunked, with a warning if the kernel fails).
        chunk_size (`int`, *optional*): queries per chunk of the chunked path (default: 2**24 scores per chunk).

    Returns:
        `torch.Tensor`: `[batch, heads, queries]`, float32 (float64 for float64 inputs), also under autocast.
    """
    scale, chunk = _prepare(query, key, scale, impl, chunk_size)
    return _KeyLogSumExp.apply(query, key, scale, impl, chunk)


def key_column_probs(
    query: torch.Tensor, key: torch.Tensor, columns, scale: float | None = None, *, impl: str = "auto", chunk_size=None
) -> torch.Tensor:
    r"""
    Columns of `softmax(scale * q k^T)` (the softmax over ALL keys), as `exp(scale * q . k_c - key_logsumexp)`.

    Args:
        query (`torch.Tensor`): `[batch, heads, queries, dim]`.
        key (`torch.Tensor`): `[batch, heads, keys, dim]`.
        columns (`Sequence[int]` or `torch.LongTensor`): the key positions to keep.
        scale, impl, chunk_size: as in `key_logsumexp`.

    Returns:
        `torch.Tensor`: `[batch, heads, queries, len(columns)]`, float32 (float64 for float64 inputs),
        differentiable with respect to `query` and `key`.
    """
    scale, _ = _prepare(query, key, scale, impl, chunk_size)
    lse = key_logsumexp(query, key, scale, impl=impl, chunk_size=chunk_size)
    keys = key.index_select(-2, torch.as_tensor(columns, dtype=torch.long).to(key.device))
    with autocast_off(query.device.type):
        return torch.exp(query.to(lse.dtype) @ keys.to(lse.dtype).mT * scale - lse.unsqueeze(-1))


class _Capture:
    """What both capture processors share: the store, the kept text positions, the text length."""

    def __init__(self, store: AttentionStore, name: str, indices: Sequence[int], text_length=None, device=None):
        self.store, self.name, self.indices, self.text_length = store, name, list(indices), text_length
        if not self.indices or min(self.indices) < 0:
            raise ValueError(f"indices must be non-empty text positions >= 0, got {self.indices}.")
        # Built once, like `CrossAttnCaptureProcessor.index`: no processor state changes between forwards.
        self.index = torch.tensor(self.indices, dtype=torch.long, device=device)

    def _store(self, query, key, text_offset: int, image: slice | None, encoder_hidden_states, attention_mask):
        """Keep `probs[:, :, image][..., text_offset + indices]` (`image=None`: the tokens after the text) of
        `query`, `key` (`[batch, heads, tokens, dim]`)."""
        if attention_mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not capture masked attention.")
        text_length = self.text_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if text_length is None:
            raise ValueError(f"{self.name}: a single-stream layer needs `text_length` to find its text tokens.")
        # A wrong `text_length` would silently misplace the single-stream maps: the joint layers catch it first.
        if self.text_length is not None and text_length != self.text_length:
            raise ValueError(f"{self.name}: text_length={self.text_length}, but the layer got {text_length}.")
        if max(self.indices) >= text_length:
            raise ValueError(f"{self.name}: indices {self.indices} are outside the {text_length} text tokens.")
        image = slice(text_length, None) if image is None else image
        columns = self.index.to(key.device) + text_offset
        # computed even when a checkpointing recomputation drops it (`AttentionStore.keep`): the recomputation must
        # save the tensors the first pass saved
        self.store.keep(self.name, key_column_probs(query[:, :, image], key, columns))


class JointAttnCaptureProcessor(_Capture):
    r"""
    diffusers' `JointAttnProcessor2_0` (SD3, sequence `[image, text]`) that also stores, for every image token, the
    probability its softmax over all keys gives the text positions `indices`: `store.maps[name]`, shaped
    `[batch, heads, image_tokens, len(indices)]`. Same outputs; a call without text (SD3.5's `attn2`) stores
    nothing.

    Args:
        store (`AttentionStore`): where the maps go.
        name (`str`): the processor's name in `transformer.attn_processors`, the store key.
        indices (`Sequence[int]`): positions within the text tokens (e.g. `[V]` at 4, the category at 5).
        text_length (`int`, *optional*): the number of text tokens; needed by Flux's single-stream layers,
            checked against `encoder_hidden_states` by the joint ones.
        device (`torch.device`, *optional*): where the index tensor of `indices` lives (the model's device).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch_size, n_image = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            context = [
                p(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for p in projections
            ]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query, key, value = (torch.cat([x, c], dim=2) for x, c in zip((query, key, value), context))
            # [image, text]: the text columns start after the image tokens.
            self._store(query, key, n_image, slice(0, n_image), encoder_hidden_states, attention_mask)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class FluxAttnCaptureProcessor(_Capture):
    r"""
    diffusers' `FluxAttnProcessor` (sequence `[text, image]`, RoPE on q and k) that also stores, for every image
    token, the probability its softmax over all keys gives the text positions `indices`: `store.maps[name]`,
    `[batch, heads, image_tokens, len(indices)]`. Same outputs, through the same `dispatch_attention_fn` backend.
    Double-stream calls read the text length off `encoder_hidden_states`; single-stream calls (the text already
    prepended, `encoder_hidden_states=None`) need `text_length`. Args: as `JointAttnCaptureProcessor`.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # [text, image] in both kinds of block: the text columns come first, the image queries after the text.
        self._store(query.transpose(1, 2), key.transpose(1, 2), 0, None, encoder_hidden_states, attention_mask)

        backend, config = self._attention_backend, self._parallel_config
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=backend, parallel_config=config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_text, hidden_states.shape[1] - n_text], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def _kind(module) -> str | None:
    if isinstance(module, (JointTransformerBlock, FluxTransformerBlock)):
        return "double"
    return "single" if isinstance(module, FluxSingleTransformerBlock) else None


def joint_attention_names(transformer, blocks: str = "all") -> list[str]:
    """Processor names of the joint (text + image) attention layers of an SD3 or Flux transformer, in module
    order. `blocks`: `"all"`, `"double"` (SD3's joint blocks, Flux's double-stream blocks) or `"single"` (Flux's
    single-stream blocks). SD3.5's `attn2` layers (self-attention only, no text) are never listed."""
    if blocks not in BLOCKS:
        raise ValueError(f"blocks={blocks!r} is not supported; use one of {BLOCKS}.")
    kinds = ("double", "single") if blocks == "all" else (blocks,)
    return [f"{name}.attn.processor" for name, module in transformer.named_modules() if _kind(module) in kinds]


@contextmanager
def capture_joint_attention(
    transformer,
    indices: Sequence[int],
    text_length: int | None,
    store: AttentionStore | None = None,
    blocks: str = "all",
) -> Iterator[AttentionStore]:
    """Install the capture processors on the joint attention layers of `transformer` for the duration of the block
    and restore the original processors afterwards (also when the block raises).

    Args:
        transformer: a diffusers `SD3Transformer2DModel` or `FluxTransformer2DModel` (PEFT adapters may be
            injected).
        indices (`Sequence[int]`): positions within the text tokens whose columns are kept.
        text_length (`int`, *optional*): the number of text tokens (Flux: the T5 `max_sequence_length`; SD3:
            77 + T5 length); required for Flux's single-stream blocks, checked in the joint ones.
        store (`AttentionStore`, *optional*): reuse an existing store.
        blocks (`str`, *optional*, defaults to `"all"`): see `joint_attention_names`.

    Yields:
        `AttentionStore`: one `[batch, heads, image_tokens, len(indices)]` map per layer after a forward pass.
    """
    store = AttentionStore() if store is None else store
    names = joint_attention_names(transformer, blocks)
    if not names:
        raise ValueError(f"{type(transformer).__name__} has no joint attention layers for blocks={blocks!r}.")
    if text_length is not None and max(indices, default=0) >= text_length:
        raise ValueError(f"indices {list(indices)} are outside the {text_length} text tokens.")
    device = next(transformer.parameters()).device
    original = transformer.attn_processors
    processors = dict(original)
    for name in names:
        block = transformer.get_submodule(name.removesuffix(".attn.processor"))
        if text_length is None and _kind(block) == "single":
            raise ValueError("Flux's single-stream blocks need `text_length` to split their [text, image] input.")
        cls = JointAttnCaptureProcessor if isinstance(block, JointTransformerBlock) else FluxAttnCaptureProcessor
        processors[name] = cls(store, name, indices, text_length, device)
        for attr in ("_attention_backend", "_parallel_config"):  # the backend the model was set to
            if getattr(original[name], attr, None) is not None:
                setattr(processors[name], attr, getattr(original[name], attr))
    transformer.set_attn_processor(processors)
    try:
        yield store
    finally:
        transformer.set_attn_processor(original)
