# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Cross-attention capture for the U-Net's `attn2` layers.

Only the cross-attention layers get the capturing processor; self-attention keeps whatever processor the
model had (diffusers' SDPA by default). The processor keeps just the token columns it was asked for
(`[V]` and the category during training), never the whole 77-token maps, and the context manager puts
the original processors back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .amp import autocast_off

__all__ = ["AttentionStore", "CrossAttnCaptureProcessor", "capture_cross_attention", "cross_attention_names"]


class AttentionStore:
    """Holds the captured attention probabilities of one forward pass, one entry per `attn2` layer.

    Each entry is `probs[..., indices]` of shape `[batch, heads, pixels, len(indices)]`, where `probs` is the
    softmax over all text positions. Entries are keyed by processor name and the first one of a pass is kept
    (`keep`): under gradient checkpointing the backward pass runs each layer again, and its recomputed map, whose
    graph holds the layer's float32 scores, is then dropped at once instead of living until the store is cleared
    (for Flux at 1024 px about 350 MiB per block; the loss was computed from the first map anyway).
    """

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self.maps.clear()

    def keep(self, name: str, probs: torch.Tensor) -> None:
        """Store layer `name`'s map unless this pass already has one (a gradient-checkpointing recomputation)."""
        self.maps.setdefault(name, probs)

    def __len__(self) -> int:
        return len(self.maps)

    def concept_and_category(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Split training captures (indices `[v, c_1, ..., c_n]`) into the `[V]` maps and the category maps
        (the mean over the category's sub-tokens), each a list of `[batch, heads, pixels]` tensors."""
        concept = [m[..., 0] for m in self.maps.values()]
        category = [m[..., 1:].mean(-1) for m in self.maps.values()]
        return concept, category


class CrossAttnCaptureProcessor:
    r"""
    Attention processor for cross-attention layers that also keeps the softmax probabilities of selected text
    positions (with gradients) for the regularizer.

    The signature follows diffusers' `AttnProcessor2_0.__call__`. The kept columns come from an explicit
    softmax of the scores (its normalisation needs all 77 text positions, which are small next to
    self-attention), in at least float32. The layer's output is the same function either way:

    - `"sdpa"`: `scaled_dot_product_attention`, as without the capture. The output then skips the bf16 copy
      of the probabilities and their matmul with the values, forward and backward: fewer passes over the
      `[batch, heads, pixels, 77]` maps, which is what a memory-bound GPU step pays for.
    - `"explicit"`: `softmax(scores) @ value` from the same probabilities. Faster on CPUs (measured: one
      SD2.1-base attn2 layer at batch 8, 512 px, forward + backward, 491 ms against 576 ms; CPU SDPA is slow
      with 77 keys).
    - `"auto"` (default): `"sdpa"` on CUDA, `"explicit"` elsewhere. benchmarks/bench_train.py times both on
      the device at hand (`capture_sdpa_vs_explicit`).

    Both give the same outputs and gradients up to float rounding (tests/unit/test_attention.py).

    Args:
        store (`AttentionStore`): where the selected columns go.
        name (`str`): the processor's name in `unet.attn_processors`, used as the store key.
        indices (`Sequence[int]`): text positions to keep.
        output (`str`, *optional*, defaults to `"auto"`): how the attention output is computed, see above.
        device (`torch.device`, *optional*): where the index tensor of `indices` lives (the U-Net's device).
            It is built here, once: a processor that created it on its first call would change its own state
            between the first and the second forward, and `torch.compile` would recompile for that.
    """

    OUTPUTS = ("auto", "sdpa", "explicit")

    def __init__(
        self,
        store: AttentionStore,
        name: str,
        indices: Sequence[int],
        output: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        if output not in self.OUTPUTS:
            raise ValueError(f"output={output!r} is not supported; use one of {self.OUTPUTS}.")
        self.store = store
        self.name = name
        self.indices = list(indices)
        self.output = output
        self.index = torch.tensor(self.indices, dtype=torch.long, device=device)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        # The scores in float32 even under autocast ([batch, heads, pixels, 77] is small next to self-attention):
        # fp16 q.k^T overflows on models that need `upcast_attention` (SD 2.1-768) and the softmax turns into NaN,
        # and bf16 rounding of the scores adds noise to the small statistics the regularizer compares.
        dtype = torch.promote_types(query.dtype, torch.float32)
        with autocast_off(query.device.type):
            scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.to(dtype)
            probs = scores.softmax(dim=-1)  # [batch, heads, pixels, text]
        self.store.keep(self.name, probs.index_select(-1, self.index.to(probs.device)))

        if self.output == "sdpa" or (self.output == "auto" and query.device.type == "cuda"):
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )
        else:
            hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_names(unet) -> list[str]:
    """Processor names of the U-Net's cross-attention (`attn2`) layers (module order, not forward order)."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextmanager
def capture_cross_attention(
    unet, indices: Sequence[int], store: AttentionStore | None = None, output: str = "auto"
) -> Iterator[AttentionStore]:
    """Install `CrossAttnCaptureProcessor` on every `attn2` layer of `unet` for the duration of the block and
    restore the original processors afterwards (also when the block raises).

    Args:
        unet: a diffusers `UNet2DConditionModel` (PEFT adapters may be injected).
        indices (`Sequence[int]`): text positions whose attention columns are kept.
        store (`AttentionStore`, *optional*): reuse an existing store.
        output (`str`, *optional*, defaults to `"auto"`): see `CrossAttnCaptureProcessor`.

    Yields:
        `AttentionStore`: filled by every forward pass inside the block; call `clear()` between passes.
    """
    store = AttentionStore() if store is None else store
    device = next(unet.parameters()).device
    original = unet.attn_processors
    names = set(cross_attention_names(unet))
    if not names:
        raise ValueError("The U-Net has no cross-attention (attn2) layers to capture; is it a text-conditioned U-Net?")
    unet.set_attn_processor(
        {
            name: CrossAttnCaptureProcessor(store, name, indices, output, device) if name in names else proc
            for name, proc in original.items()
        }
    )
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
