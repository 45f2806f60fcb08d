# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""attention_regularizer against an independent float64 NumPy implementation of the formulas in its
docstring: values of both reductions, and gradients against the closed-form derivative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attndb_peft import attention_regularizer
from attndb_peft.regularizer import diffusion_target


def _np_mean_var(x: np.ndarray) -> tuple[float, float]:
    n = x.size
    mu = sum(float(v) for v in x.ravel()) / n
    var = sum((float(v) - mu) ** 2 for v in x.ravel()) / (n - 1)  # unbiased
    return mu, var


def reference_per_layer(concept, category, lm, lv) -> float:
    layers = []
    for v, c in zip(concept, category):
        total = 0.0
        for b in range(v.shape[0]):  # sum over the batch of per-sample terms over heads x pixels
            mv, vv = _np_mean_var(v[b])
            mc, vc = _np_mean_var(c[b])
            total += lm * (mv - mc) ** 2 + lv * (vv - vc) ** 2
        layers.append(total)
    return sum(layers) / len(layers)


def reference_pooled(concept, category, lm, lv) -> float:
    mv, vv = _np_mean_var(np.concatenate([v.ravel() for v in concept]))
    mc, vc = _np_mean_var(np.concatenate([c.ravel() for c in category]))
    return lm * (mv - mc) ** 2 + lv * (vv - vc) ** 2


def reference_grad_per_layer(concept, category, lm, lv) -> list[np.ndarray]:
    """d L / d concept_maps, closed form: d mu / dx_i = 1/n, d var / dx_i = 2 (x_i - mu) / (n - 1)."""
    grads = []
    for v, c in zip(concept, category):
        g = np.zeros_like(v)
        for b in range(v.shape[0]):
            n = v[b].size
            mv, vv = _np_mean_var(v[b])
            mc, vc = _np_mean_var(c[b])
            g[b] = (2 * lm * (mv - mc) / n + 2 * lv * (vv - vc) * 2 * (v[b] - mv) / (n - 1)) / len(concept)
        grads.append(g)
    return grads


def reference_grad_pooled(concept, category, lm, lv) -> list[np.ndarray]:
    flat = np.concatenate([v.ravel() for v in concept])
    n = flat.size
    mv, vv = _np_mean_var(flat)
    mc, vc = _np_mean_var(np.concatenate([c.ravel() for c in category]))
    return [2 * lm * (mv - mc) / n + 2 * lv * (vv - vc) * 2 * (v - mv) / (n - 1) for v in concept]


maps_strategy = st.builds(
    lambda batch, heads, pixels, seed: (batch, heads, pixels, seed),
    st.integers(1, 3),
    st.integers(1, 4),
    st.lists(st.integers(2, 12), min_size=1, max_size=4),  # unbiased variance needs two values per sample
    st.integers(0, 2**16),
)


def _make_maps(batch, heads, pixels, seed):
    rng = np.random.default_rng(seed)
    concept = [rng.dirichlet(np.ones(5), size=(batch, heads, p))[..., 0] for p in pixels]
    category = [rng.dirichlet(np.ones(5), size=(batch, heads, p))[..., 1] for p in pixels]
    return concept, category


@settings(max_examples=40, deadline=None)
@given(maps_strategy, st.sampled_from([(0.1, 0.0), (2.0, 5.0), (0.0, 1.0)]))
def test_per_layer_matches_reference(shape, lambdas):
    concept, category = _make_maps(*shape)
    lm, lv = lambdas
    tc = [torch.tensor(m, dtype=torch.float64, requires_grad=True) for m in concept]
    tk = [torch.tensor(m, dtype=torch.float64) for m in category]
    loss = attention_regularizer(tc, tk, lm, lv, reduction="per_layer")
    assert loss.ndim == 0
    np.testing.assert_allclose(loss.item(), reference_per_layer(concept, category, lm, lv), rtol=1e-5, atol=1e-12)
    loss.backward()
    for got, want in zip(tc, reference_grad_per_layer(concept, category, lm, lv)):
        np.testing.assert_allclose(got.grad.numpy(), want, rtol=1e-4, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(maps_strategy, st.sampled_from([(0.1, 0.0), (2.0, 5.0), (0.0, 1.0)]))
def test_pooled_matches_reference(shape, lambdas):
    concept, category = _make_maps(*shape)
    lm, lv = lambdas
    tc = [torch.tensor(m, dtype=torch.float64, requires_grad=True) for m in concept]
    tk = [torch.tensor(m, dtype=torch.float64) for m in category]
    loss = attention_regularizer(tc, tk, lm, lv, reduction="pooled")
    np.testing.assert_allclose(loss.item(), reference_pooled(concept, category, lm, lv), rtol=1e-5, atol=1e-12)
    loss.backward()
    for got, want in zip(tc, reference_grad_pooled(concept, category, lm, lv)):
        np.testing.assert_allclose(got.grad.numpy(), want, rtol=1e-4, atol=1e-9)


def test_reductions_differ_and_agree_where_they_should():
    # One layer, batch 1: both reductions compute the same statistics.
    concept, category = _make_maps(1, 2, [6], seed=3)
    tc = [torch.tensor(m) for m in concept]
    tk = [torch.tensor(m) for m in category]
    assert torch.allclose(
        attention_regularizer(tc, tk, 2.0, 5.0, "per_layer"), attention_regularizer(tc, tk, 2.0, 5.0, "pooled")
    )
    # Several layers: per-layer statistics are not the pooled ones.
    concept, category = _make_maps(2, 2, [3, 9], seed=4)
    tc = [torch.tensor(m) for m in concept]
    tk = [torch.tensor(m) for m in category]
    assert not torch.allclose(
        attention_regularizer(tc, tk, 2.0, 5.0, "per_layer"), attention_regularizer(tc, tk, 2.0, 5.0, "pooled")
    )


def test_identical_maps_cost_nothing_and_half_precision_is_upcast():
    maps = [torch.rand(2, 3, 16, dtype=torch.bfloat16) for _ in range(3)]
    for reduction in ("per_layer", "pooled"):
        loss = attention_regularizer(maps, maps, 2.0, 5.0, reduction)
        assert loss.dtype == torch.float32 and loss.item() == 0.0


@pytest.mark.parametrize(
    "concept, category, match",
    [
        ([], [], "empty"),
        ([torch.rand(1, 2, 4)], [], "one category map per concept map"),
        ([torch.rand(1, 2, 4)], [torch.rand(1, 2, 5)], "same shape"),
        ([torch.rand(2, 4)], [torch.rand(2, 4)], r"\[batch, heads, pixels\]"),
    ],
)
def test_bad_maps_are_refused(concept, category, match):
    with pytest.raises(ValueError, match=match):
        attention_regularizer(concept, category, 1.0, 1.0)


def test_unknown_reduction_is_refused():
    maps = [torch.rand(1, 2, 4)]
    with pytest.raises(ValueError, match="per_layer"):
        attention_regularizer(maps, maps, 1.0, 1.0, reduction="mean")


def test_diffusion_target_follows_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), expected)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


# -- Min-SNR weighting: against float64 NumPy from the scheduler's alphas_cumprod, and diffusers' compute_snr ---
def _np_min_snr(alphas_cumprod, timesteps, gamma, prediction_type):
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[np.asarray(timesteps)]
    snr = abar / (1.0 - abar)  # the signal-to-noise ratio of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    capped = np.minimum(snr, gamma)
    return capped / (snr + 1.0) if prediction_type == "v_prediction" else capped / snr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_an_independent_formula(prediction_type, gamma):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from attndb_peft.regularizer import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)  # SD's schedule
    t = torch.tensor([0, 1, 10, 100, 250, 500, 999])
    got = min_snr_weights(scheduler.alphas_cumprod, t, gamma, prediction_type)
    assert got.shape == (7,) and got.dtype == torch.float32
    want = _np_min_snr(scheduler.alphas_cumprod.numpy(), t.numpy(), gamma, prediction_type)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # diffusers' train_text_to_image.py: min(snr, gamma) / snr (epsilon) or / (snr + 1) (v-prediction)
    snr = compute_snr(scheduler, t)
    capped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(got, capped / (snr + 1 if prediction_type == "v_prediction" else snr))
    if prediction_type == "epsilon":  # the noisy timesteps (SNR <= gamma) keep weight 1, the clean ones less
        assert got[-1] == 1.0 and got[0] < 0.01
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(scheduler.alphas_cumprod, t, gamma, "sample")


def test_weighted_diffusion_losses_are_per_sample_means_weighted_then_averaged():
    from attndb_peft.regularizer import diffusion_loss, masked_diffusion_loss

    torch.manual_seed(0)
    pred, target, weights = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.2, 1.0, 3.0])
    per_sample = [float(((pred[b].double() - target[b].double()) ** 2).mean()) for b in range(3)]
    want = sum(w * e for w, e in zip(weights.tolist(), per_sample)) / 3
    assert abs(float(diffusion_loss(pred, target, weights=weights)) - want) < 1e-5
    torch.testing.assert_close(diffusion_loss(pred, target, weights=torch.ones(3)), diffusion_loss(pred, target))
    mask = (torch.rand(3, 1, 2, 2) > 0.3).float()
    mask[:, :, 0, 0] = 1.0  # every sample shows some subject
    unweighted = [masked_diffusion_loss(pred[b : b + 1], target[b : b + 1], mask[b : b + 1]) for b in range(3)]
    want = sum(w * float(e) for w, e in zip(weights.tolist(), unweighted)) / 3
    assert abs(float(masked_diffusion_loss(pred, target, mask, weights=weights)) - want) < 1e-5
    torch.testing.assert_close(
        masked_diffusion_loss(pred, target, mask, weights=torch.ones(3)), masked_diffusion_loss(pred, target, mask)
    )
