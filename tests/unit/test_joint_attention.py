# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The joint-attention capture (SD3, Flux): `key_logsumexp` / `key_column_probs` against a naive softmax over all
keys (values and gradients, fused kernel and chunked fallback, float32/float64/bf16, autocast), and the capture
processors on tiny diffusers transformers: the stock outputs (bitwise), maps equal to a naive softmax of the stock
q/k, gradients reaching the parameters and the text (also with gradient checkpointing), processors restored,
SD3.5's self-attention-only `attn2` left alone."""

from __future__ import annotations

import diffusers.models.attention_processor as attention_processor
import diffusers.models.transformers.transformer_flux as transformer_flux
import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from attndb_peft.joint_attention import (
    FluxAttnCaptureProcessor,
    JointAttnCaptureProcessor,
    _fused_forward,
    capture_joint_attention,
    joint_attention_names,
    key_column_probs,
    key_logsumexp,
)

INDICES = [4, 5, 6]
TEXT = 9  # text tokens


def _naive(q, k, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)


def _qk(dtype=torch.float32, queries=13, keys=21):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, queries, 8, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(2, 3, keys, 8, generator=gen).to(dtype).requires_grad_()
    return q, k


def _grads(out, q, k):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return torch.autograd.grad((out * upstream).sum(), (q, k))


def test_fused_kernel_runs_on_cpu_float32():
    # Guard against the "fused" tests silently exercising the fallback: the CPU kernel returns a natural-log lse.
    q, k = _qk()
    out, lse, _ = _fused_forward(q.detach(), k.detach(), 0.6)
    naive = _naive(q, k, 0.6)
    torch.testing.assert_close(lse, torch.logsumexp(0.6 * q @ k.transpose(-1, -2), -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, naive @ k, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("shape", [(13, 21), (21, 13)])
def test_key_logsumexp_and_column_probs_match_naive(impl, shape):
    q, k = _qk(queries=shape[0], keys=shape[1])
    lse = key_logsumexp(q, k, 0.6, impl=impl, chunk_size=4)
    ref = torch.logsumexp(0.6 * q @ k.transpose(-1, -2), dim=-1)
    assert lse.shape == (2, 3, shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref, rtol=0, atol=1e-5)
    for got, want in zip(_grads(lse, q, k), _grads(ref, q, k)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    columns = [0, 3, shape[1] - 1]
    probs = key_column_probs(q, k, columns, 0.6, impl=impl, chunk_size=4)
    naive = _naive(q, k, 0.6)[..., columns]
    assert probs.shape == (2, 3, shape[0], 3)
    torch.testing.assert_close(probs, naive, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(probs, q, k), _grads(naive, q, k)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_key_column_probs_float64_and_bf16(impl):
    q, k = _qk(torch.float64)
    probs = key_column_probs(q, k, [1, 2], impl=impl)
    naive = _naive(q, k, 8**-0.5)[..., [1, 2]]
    torch.testing.assert_close(probs, naive, rtol=0, atol=1e-12)
    for got, want in zip(_grads(probs, q, k), _grads(naive, q, k)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # bf16 inputs are computed in float32 (bf16 gradients back)
    qb, kb = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k))
    probs = key_column_probs(qb, kb, [1, 2], impl=impl)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, _naive(qb.float(), kb.float(), 8**-0.5)[..., [1, 2]], rtol=0, atol=1e-6)
    assert all(g.dtype == torch.bfloat16 for g in _grads(probs, qb, kb))
    # and autocast does not lower the float32 math
    q32, k32 = (t.detach().float() for t in (q, k))
    with torch.autocast("cpu", torch.bfloat16):
        autocast = key_column_probs(q32, k32, [1, 2], impl=impl)
    torch.testing.assert_close(autocast, key_column_probs(q32, k32, [1, 2], impl=impl), rtol=0, atol=0)


def _sd3(**kwargs):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4, **kwargs,
    )  # fmt: skip
    text = torch.randn(2, TEXT, 32, requires_grad=True)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=text,
        pooled_projections=torch.randn(2, 16), timestep=torch.tensor([10.0, 500.0]),
    )  # fmt: skip
    return model, inputs, 16  # 16 image tokens (8x8 latents, patch 2)


def _flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    img_ids = torch.zeros(4, 4, 3)  # as FluxPipeline._prepare_latent_image_ids: (row, column) per latent patch
    img_ids[..., 1] += torch.arange(4)[:, None]
    img_ids[..., 2] += torch.arange(4)[None, :]
    text = torch.randn(2, TEXT, 32, requires_grad=True)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=text, pooled_projections=torch.randn(2, 16),
        timestep=torch.tensor([0.1, 0.9]), img_ids=img_ids.reshape(16, 3), txt_ids=torch.zeros(TEXT, 3),
    )  # fmt: skip
    return model, inputs, 16


def _record_stock(monkeypatch, flux: bool) -> list:
    """Record the q/k ([batch, heads, tokens, dim]) the stock processors attend with, in call order."""
    calls = []
    if flux:
        original = transformer_flux.dispatch_attention_fn

        def dispatch(query, key, value, **kwargs):
            calls.append((query.transpose(1, 2).detach(), key.transpose(1, 2).detach()))
            return original(query, key, value, **kwargs)

        monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", dispatch)
    else:
        original = attention_processor.F.scaled_dot_product_attention

        def sdpa(query, key, value, **kwargs):
            calls.append((query.detach(), key.detach()))
            return original(query, key, value, **kwargs)

        monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", sdpa)
    return calls


@pytest.mark.parametrize("flux", [False, True], ids=["sd3", "flux"])
def test_capture_keeps_outputs_and_maps_match_naive(flux, monkeypatch):
    model, inputs, n_image = _flux() if flux else _sd3()
    before = model.attn_processors
    with torch.no_grad(), monkeypatch.context() as patch:
        calls = _record_stock(patch, flux)
        reference = model(**inputs).sample
    names = joint_attention_names(model)
    assert len(names) == len(calls) == 2
    with torch.no_grad(), capture_joint_attention(model, INDICES, TEXT) as store:
        output = model(**inputs).sample
    torch.testing.assert_close(output, reference, rtol=0, atol=0)  # the same ops: bitwise
    assert list(store.maps) == names
    for name, (q, k) in zip(names, calls):  # module order is the forward order here
        probs = _naive(q, k, 8**-0.5)
        # SD3: [image, text]; Flux: [text, image]
        image, columns = (slice(TEXT, None), INDICES) if flux else (slice(0, n_image), [n_image + i for i in INDICES])
        assert store.maps[name].shape == (2, 2, n_image, len(INDICES))
        torch.testing.assert_close(store.maps[name], probs[:, :, image][..., columns], rtol=0, atol=1e-6)
    after = model.attn_processors
    assert [type(p) for p in after.values()] == [type(p) for p in before.values()]
    assert all(after[n] is before[n] for n in before)


@pytest.mark.parametrize("flux", [False, True], ids=["sd3", "flux"])
def test_gradients_reach_parameters_and_text(flux):
    model, inputs, _ = _flux() if flux else _sd3()
    with capture_joint_attention(model, INDICES, TEXT) as store:
        model(**inputs)
        concept, category = store.concept_and_category()
        loss = sum(((v.mean() - c.mean()) ** 2 + v.var() * c.mean()) for v, c in zip(concept, category))
        loss.backward()
    text = inputs["encoder_hidden_states"].grad
    assert text is not None and torch.isfinite(text).all() and text.abs().sum() > 0
    for name in ("to_q", "to_k", "add_k_proj"):
        grad = getattr(model.transformer_blocks[0].attn, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    if flux:  # the single-stream block's q/k projections see the maps too
        assert model.single_transformer_blocks[0].attn.to_k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flux", [False, True], ids=["sd3", "flux"])
def test_gradient_checkpointing_keeps_gradients(flux):
    results = []
    for checkpointing in (False, True):
        model, inputs, _ = _flux() if flux else _sd3()
        if checkpointing:
            model.enable_gradient_checkpointing()
        with capture_joint_attention(model, INDICES, TEXT) as store:
            output = model(**inputs).sample
            (sum(m[..., 0].var() for m in store.maps.values()) + output.square().mean()).backward()
        results.append((inputs["encoder_hidden_states"].grad, model.transformer_blocks[0].attn.to_k.weight.grad))
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-8)


def test_blocks_selection_and_processor_classes():
    flux, inputs, _ = _flux()
    assert joint_attention_names(flux, "double") == ["transformer_blocks.0.attn.processor"]
    assert joint_attention_names(flux, "single") == ["single_transformer_blocks.0.attn.processor"]
    with capture_joint_attention(flux, INDICES, TEXT, blocks="double") as store:
        assert isinstance(flux.transformer_blocks[0].attn.processor, FluxAttnCaptureProcessor)
        assert not isinstance(flux.single_transformer_blocks[0].attn.processor, FluxAttnCaptureProcessor)
        with torch.no_grad():
            flux(**inputs)
    assert list(store.maps) == ["transformer_blocks.0.attn.processor"]
    with pytest.raises(ValueError, match="text_length"):
        with capture_joint_attention(flux, INDICES, None):
            pass
    with pytest.raises(ValueError, match="text_length=10"), torch.no_grad():  # a wrong text length is caught
        with capture_joint_attention(flux, INDICES, TEXT + 1):
            flux(**inputs)
    assert type(flux.transformer_blocks[0].attn.processor) is transformer_flux.FluxAttnProcessor  # restored


def test_sd35_dual_attention_attn2_is_not_captured():
    model, inputs, _ = _sd3(dual_attention_layers=(0,))
    stock_attn2 = model.transformer_blocks[0].attn2.processor
    with torch.no_grad():
        reference = model(**inputs).sample
    assert joint_attention_names(model) == [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    with torch.no_grad(), capture_joint_attention(model, INDICES, None) as store:
        assert model.transformer_blocks[0].attn2.processor is stock_attn2
        assert isinstance(model.transformer_blocks[0].attn.processor, JointAttnCaptureProcessor)
        output = model(**inputs).sample
    torch.testing.assert_close(output, reference, rtol=0, atol=0)  # the same ops: bitwise
    assert len(store) == 2 and all("attn2" not in name for name in store.maps)
