# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""What each stage trains (a before/after comparison of every parameter), the attention capture, the token
set-up, and the LoRA algebra the exporter relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config
from hypothesis import given, settings
from hypothesis import strategies as st

from attndb_peft.attention import AttentionStore, capture_cross_attention, cross_attention_names
from attndb_peft.stages import (
    ADAPTER_STAGE2,
    ADAPTER_STAGE3,
    LoraFactors,
    add_concept_token,
    combine_loras,
    lora_from_delta,
)
from attndb_peft.testing import build_tiny_pipeline
from attndb_peft.trainer import Trainer


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _run(trainer: Trainer, stage: int) -> None:
    trainer.build_stage(stage)
    trainer.make_optimizer(stage)
    trainer.run_stage(stage, 0)


@pytest.mark.parametrize("stage3_mode", ["lora", "full"])
def test_each_stage_trains_exactly_its_parameters(tiny_model, instance_dir, tmp_path, stage3_mode):
    trainer = Trainer(make_config(tiny_model, instance_dir, tmp_path / "out", stage3_mode=stage3_mode))
    trainer.prepare()
    token_id = trainer.concept.token_id
    te0, vae0 = _snapshot(trainer.text_encoder), _snapshot(trainer.vae)
    unet0 = _snapshot(trainer.unet)
    embedding_key = next(k for k in te0 if k.endswith("token_embedding.weight"))

    # Stage 1: only the spliced vector moves; the text encoder (embedding matrix included) and U-Net do not.
    vector0 = trainer.splice.vector.detach().clone()
    _run(trainer, 1)
    assert not torch.equal(trainer.splice.vector, vector0)
    assert _changed(te0, _snapshot(trainer.text_encoder)) == set()
    assert _changed(unet0, _snapshot(trainer.unet)) == set()

    # Stage 2: the vector is written into its embedding row only; then only stage-2 LoRA tensors train.
    trainer.build_stage(2)
    te1 = _snapshot(trainer.text_encoder)
    assert _changed(te0, te1) == {embedding_key}
    rows_changed = (te1[embedding_key] != te0[embedding_key]).any(-1).nonzero().flatten().tolist()
    assert rows_changed == [token_id]
    unet1 = _snapshot(trainer.unet)
    vector1 = trainer.splice.vector.detach().clone()
    trainer.make_optimizer(2)
    trainer.run_stage(2, 0)
    unet2 = _snapshot(trainer.unet)
    changed = _changed(unet1, unet2)
    assert changed and all(f".{ADAPTER_STAGE2}." in k and ".attn2." in k for k in changed)
    assert any(".lora_B." in k for k in changed)
    assert torch.equal(trainer.splice.vector, vector1)
    assert _changed(te1, _snapshot(trainer.text_encoder)) == set()

    # Stage 3.
    trainer.build_stage(3)
    unet_start = _snapshot(trainer.unet)
    trainer.make_optimizer(3)
    trainer.run_stage(3, 0)
    unet3 = _snapshot(trainer.unet)
    changed = _changed(unet_start, unet3)
    if stage3_mode == "lora":
        assert changed and all(f".{ADAPTER_STAGE3}." in k for k in changed)
        assert {k for k in unet3 if f".{ADAPTER_STAGE2}." in k} and not any(
            f".{ADAPTER_STAGE2}." in k for k in changed
        )
        assert not any("lora_" not in k for k in changed)  # base weights untouched
    else:
        assert not any("lora_" in k for k in unet3)  # stage 2 was merged and the adapter removed
        assert any(k.endswith("attn1.to_q.weight") for k in changed)  # the whole U-Net trains
    assert _changed(te1, _snapshot(trainer.text_encoder)) == set()
    assert _changed(vae0, _snapshot(trainer.vae)) == set()


def test_capture_keeps_outputs_and_restores_processors():
    pipe = build_tiny_pipeline()
    unet = pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    states = torch.randn(2, 77, 32)
    with torch.no_grad():
        reference = unet(x, t, states).sample
        with capture_cross_attention(unet, [5, 6, 7]) as store:
            captured = unet(x, t, states).sample
    torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    names = cross_attention_names(unet)
    assert sorted(store.maps) == sorted(names) and len(names) == 7
    for m in store.maps.values():
        assert m.shape[0] == 2 and m.shape[-1] == 3  # [batch, heads, pixels, selected positions]
    concept, category = store.concept_and_category()
    assert concept[0].shape == category[0].shape == store.maps[names[0]].shape[:-1]
    torch.testing.assert_close(category[0], store.maps[names[0]][..., 1:].mean(-1))


def test_captured_maps_are_the_softmax_columns():
    """The kept columns equal softmax(q k^T / sqrt(d)) computed independently from the layer's weights."""
    pipe = build_tiny_pipeline()
    unet = pipe.unet
    name = cross_attention_names(unet)[0]
    attn = unet.get_submodule(name.removesuffix(".processor"))
    seen = {}
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(
            h=args[0] if args else kwargs["hidden_states"], e=kwargs.get("encoder_hidden_states")
        ),
        with_kwargs=True,
    )
    states = torch.randn(1, 77, 32)
    with torch.no_grad(), capture_cross_attention(unet, [3, 9]) as store:
        unet(torch.randn(1, 4, 8, 8), torch.tensor([100]), states)
    handle.remove()
    h, e = seen["h"], seen["e"]
    q = attn.to_q(h).view(1, -1, attn.heads, attn.to_q.out_features // attn.heads).transpose(1, 2)
    k = attn.to_k(e).view(1, -1, attn.heads, attn.to_k.out_features // attn.heads).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), dim=-1)
    torch.testing.assert_close(store.maps[name], probs[..., [3, 9]], rtol=1e-5, atol=1e-6)


def test_concept_token_setup():
    pipe = build_tiny_pipeline()
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    vocab_size = len(tokenizer)
    category_ids = tokenizer("teddy bear", add_special_tokens=False).input_ids
    assert len(category_ids) == 2
    concept = add_concept_token(tokenizer, text_encoder, "<t>", "teddy bear", "a photo of a <t> teddy bear")
    assert len(tokenizer) == vocab_size + 1 and concept.token_id == vocab_size
    weight = text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(weight[concept.token_id], weight[category_ids].mean(0))
    ids = concept.prompt_ids[0].tolist()
    assert ids[concept.concept_position] == concept.token_id
    assert [ids[p] for p in concept.category_positions] == category_ids
    assert concept.capture_indices == [concept.concept_position, *concept.category_positions]
    with pytest.raises(ValueError, match="already exists"):
        add_concept_token(tokenizer, text_encoder, "<t>", "dog", "a photo of a <t> dog")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        add_concept_token(tokenizer, text_encoder, "<u>", "   ", "a photo of a <u>")


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(2, 9),
    st.integers(2, 9),
    st.booleans(),
    st.floats(0.1, 4.0),
    st.floats(0.1, 4.0),
    st.integers(0, 1000),
)
def test_combined_lora_is_exactly_the_sum(r2, r3, d_in, d_out, conv, s2, s3, seed):
    g = torch.Generator().manual_seed(seed)

    def factors(r, scale):
        if conv:
            return LoraFactors(
                torch.randn(r, d_in, 3, 3, generator=g), torch.randn(d_out, r, 1, 1, generator=g), scale
            )
        return LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale)

    a, b, only_b = factors(r2, s2), factors(r3, s3), factors(r3, s3)
    combined = combine_loras({"m": a, "n": only_b}, {"m": b})
    assert combined["m"].rank == r2 + r3 and combined["m"].scale == 1.0
    torch.testing.assert_close(combined["m"].delta(), a.delta() + b.delta(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(combined["n"].delta(), only_b.delta())
    # independent formula for the conv case: apply both as convolutions to an input
    if conv:
        x = torch.randn(1, d_in, 5, 5, generator=g)
        conv_out = torch.nn.functional.conv2d(x, combined["m"].delta(), padding=1)
        expect = sum(
            f.scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, f.down, padding=1), f.up)
            for f in (a, b)
        )
        torch.testing.assert_close(conv_out, expect, rtol=1e-4, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.integers(1, 12), st.booleans(), st.integers(0, 1000))
def test_svd_export_is_the_best_low_rank_approximation(d_out, d_in, rank, conv, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (d_out, d_in, 3, 3) if conv else (d_out, d_in)
    delta = torch.randn(shape, generator=g, dtype=torch.float64).float()
    factors, retained = lora_from_delta(delta, rank)
    s = np.linalg.svd(delta.double().reshape(d_out, -1).numpy(), compute_uv=False)
    k = min(rank, s.size)
    np.testing.assert_allclose(retained, (s[:k] ** 2).sum() / (s**2).sum(), rtol=1e-4)
    err = (factors.delta() - delta).reshape(d_out, -1).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(err) ** 2, (s[k:] ** 2).sum(), rtol=1e-3, atol=1e-3)
    # an exactly low-rank delta comes back exactly
    low = LoraFactors(
        torch.randn(2, *shape[1:], generator=g), torch.randn(d_out, 2, *(1, 1)[: len(shape) - 2], generator=g)
    )
    back, kept = lora_from_delta(low.delta(), max(rank, 2))
    torch.testing.assert_close(back.delta(), low.delta(), rtol=1e-4, atol=1e-4)
    assert kept == pytest.approx(1.0, abs=1e-5)


def test_attention_store_is_keyed_by_layer():
    store = AttentionStore()
    first = torch.zeros(1, 1, 2, 2)
    store.keep("a", first)
    store.keep("a", torch.ones(1, 1, 2, 2))  # a recomputation (gradient checkpointing) is dropped
    assert len(store) == 1 and store.maps["a"] is first
    store.clear()
    assert len(store) == 0


def test_a_checkpointing_recomputation_keeps_the_forward_maps_and_the_gradients():
    """Under gradient checkpointing the backward pass recomputes every attn2 layer; the store keeps the maps the
    loss was computed from (the recomputed ones are dropped, with their graphs) and the gradients are those of
    the run without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        unet = build_tiny_pipeline().unet.double()
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        states = torch.randn(2, 77, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with capture_cross_attention(unet, [5, 6]) as store:
            out = unet(x, torch.tensor([10, 500]), states).sample
            kept = dict(store.maps)
            loss = out.square().mean() + sum(m.square().sum() for m in store.maps.values())
            loss.backward()
            assert store.maps.keys() == kept.keys() and all(store.maps[k] is v for k, v in kept.items())
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-9, atol=1e-12)
