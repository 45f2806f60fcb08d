# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The capture processor computes the kept columns with an explicit softmax and the layer's output with SDPA
(CUDA default) or from the same probabilities (CPU default); both are checked against the straightforward
explicit-softmax processor of attndb_peft 0.1.0: same outputs, same maps and the same gradients (through both
the output and the maps), in float64, with and without an attention mask, and close under bf16 autocast.
Also that gradient checkpointing (the low-memory setting) keeps the regularizer's gradient."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from attndb_peft.attention import AttentionStore, CrossAttnCaptureProcessor, capture_cross_attention
from attndb_peft.regularizer import attention_regularizer


class ExplicitCaptureProcessor:
    """The previous capture processor (attndb_peft 0.1.0): `softmax(q k^T * scale) @ v`, computed explicitly,
    keeping the selected probability columns. The reference the current processor must match."""

    def __init__(self, store: AttentionStore, name: str, indices) -> None:
        self.store, self.name, self.indices = store, name, list(indices)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        encoder_hidden_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size)
            scores = scores + attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        # CUDA autocast runs softmax in float32 (where this processor ran in bf16 training); CPU autocast would
        # not, so the reference pins it
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        self.store.maps[self.name] = probs.index_select(-1, torch.tensor(self.indices, device=probs.device))
        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _run(processor_cls, attn, hidden, context, mask, autocast: bool):
    """Output, kept maps and the gradients of a loss that depends on both (as in training)."""
    store = AttentionStore()
    attn.set_processor(processor_cls(store, "layer", [5, 6, 7]))
    for p in [hidden, context, *attn.parameters()]:
        p.grad = None
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = attn(hidden, context, attention_mask=mask)
        maps = store.maps["layer"]
        loss = out.float().square().mean() + attention_regularizer([maps[..., 0]], [maps[..., 1:].mean(-1)], 2.0, 5.0)
    loss.backward()
    grads = [hidden.grad.clone(), context.grad.clone(), *(p.grad.clone() for p in attn.parameters())]
    return out.detach(), maps.detach(), grads


def _attention(dtype):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).to(dtype)


@pytest.mark.parametrize("output", ["sdpa", "explicit"])
@pytest.mark.parametrize("masked", [False, True])
def test_capture_equals_the_explicit_processor_in_float64(masked, output):
    attn = _attention(torch.float64)
    hidden = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 77, 24, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:  # additive mask hiding the padding after position 20 of the second sample
        mask = torch.zeros(2, 1, 77, dtype=torch.float64)
        mask[1, :, 20:] = -1e4
    ref = _run(ExplicitCaptureProcessor, attn, hidden, context, mask, autocast=False)
    new = _run(partial(CrossAttnCaptureProcessor, output=output), attn, hidden, context, mask, autocast=False)
    torch.testing.assert_close(new[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new[1], ref[1], rtol=1e-12, atol=1e-12)
    assert new[1].dtype == torch.float64
    for g_new, g_ref in zip(new[2], ref[2]):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("output", ["sdpa", "explicit"])
def test_capture_matches_under_bf16_autocast(output):
    attn = _attention(torch.float32)
    hidden = torch.randn(2, 16, 32, requires_grad=True)
    context = torch.randn(2, 77, 24, requires_grad=True)
    ref = _run(ExplicitCaptureProcessor, attn, hidden, context, None, autocast=True)
    new = _run(partial(CrossAttnCaptureProcessor, output=output), attn, hidden, context, None, autocast=True)
    assert new[1].dtype == torch.float32  # maps stay float32 under autocast, as before
    torch.testing.assert_close(new[0].float(), ref[0].float(), rtol=2e-2, atol=2e-2)
    # The kept scores are computed in float32 from the bf16 q and k, not rounded to bf16 like the
    # reference's: the maps are closer to the float32 run's than the reference's are.
    exact = _run(ExplicitCaptureProcessor, attn, hidden, context, None, autocast=False)
    torch.testing.assert_close(new[1], ref[1], rtol=0, atol=1e-2)
    assert (new[1] - exact[1]).abs().max() < (ref[1] - exact[1]).abs().max()
    for g_new, g_ref in zip(new[2], ref[2]):
        torch.testing.assert_close(g_new, g_ref, rtol=5e-2, atol=5e-3)


def test_unknown_output_is_refused():
    with pytest.raises(ValueError, match="output="):
        CrossAttnCaptureProcessor(AttentionStore(), "layer", [5], output="flash")


def test_gradient_checkpointing_keeps_the_regularizer_gradient():
    """The low-memory setting recomputes the U-Net blocks in the backward pass; the maps kept in the forward
    pass must still carry their gradient (diffusers checkpoints with use_reentrant=False)."""
    from attndb_peft.testing import build_tiny_pipeline

    unet = build_tiny_pipeline().unet.double()
    sample = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    states = torch.randn(2, 77, 32, dtype=torch.float64)

    def grads(checkpointing: bool):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        unet.train()
        unet.zero_grad(set_to_none=True)
        with capture_cross_attention(unet, [5, 6]) as store:
            unet(sample, torch.tensor([10, 500]), states)
            reg = attention_regularizer(*store.concept_and_category(), 2.0, 5.0)
            reg.backward()
        return reg.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    reg_plain, plain = grads(False)
    reg_ckpt, ckpt = grads(True)
    torch.testing.assert_close(reg_ckpt, reg_plain)
    assert plain.keys() == ckpt.keys() and any("attn2.to_k" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-10, atol=1e-14)
