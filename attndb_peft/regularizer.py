# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Pure tensor functions for the AttnDreamBooth objective: the cross-attention map regularizer and the
diffusion loss. Nothing here knows about models, processors or stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "MASK_MEAN_FLOOR",
    "REDUCTIONS",
    "attention_regularizer",
    "diffusion_loss",
    "diffusion_target",
    "flow_matching_pair",
    "flow_matching_sigmas",
    "masked_diffusion_loss",
    "min_snr_weights",
]

REDUCTIONS = ("per_layer", "pooled")

#: Smallest mask mean `masked_diffusion_loss` divides by: a view that shows less than this share of subject (a
#: random crop that cut it off) weighs proportionally less instead of blowing a sliver up to a whole sample.
MASK_MEAN_FLOOR = 0.05


def _check_maps(concept_maps: Sequence[torch.Tensor], category_maps: Sequence[torch.Tensor]) -> None:
    if len(concept_maps) == 0:
        raise ValueError(
            "attention_regularizer got no attention maps: `concept_maps` is empty. Install the capture processor "
            "(attndb_peft.attention.capture_cross_attention) around the U-Net forward pass."
        )
    if len(concept_maps) != len(category_maps):
        raise ValueError(
            f"attention_regularizer needs one category map per concept map, got {len(concept_maps)} concept maps "
            f"and {len(category_maps)} category maps."
        )
    for i, (v, c) in enumerate(zip(concept_maps, category_maps)):
        if v.shape != c.shape or v.ndim != 3:
            raise ValueError(
                f"attention map {i}: expected two tensors of the same shape [batch, heads, pixels], got "
                f"concept {tuple(v.shape)} and category {tuple(c.shape)}."
            )


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Statistics of maps that came out of bf16/fp16 autocast are taken in float32 (float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def attention_regularizer(
    concept_maps: Sequence[torch.Tensor],
    category_maps: Sequence[torch.Tensor],
    lambda_mu: float,
    lambda_var: float,
    reduction: str = "per_layer",
) -> torch.Tensor:
    r"""
    The AttnDreamBooth cross-attention regularizer: pulls the mean and the variance of the new token's
    cross-attention map towards those of its category token.

    Args:
        concept_maps (`Sequence[torch.Tensor]`):
            One tensor per cross-attention layer, shape `[batch, heads, pixels]`: the softmax attention
            probabilities at the position of the new token `[V]`.
        category_maps (`Sequence[torch.Tensor]`):
            The same layers at the category position (the mean over the category's sub-token positions when
            the category has several tokens). Same shapes as `concept_maps`.
        lambda_mu (`float`): weight of the squared difference of the means.
        lambda_var (`float`): weight of the squared difference of the (unbiased) variances.
        reduction (`str`, *optional*, defaults to `"per_layer"`):
            `"per_layer"` (the reference code): for every layer and sample, mean and unbiased variance over
            heads x pixels; `L_l = sum_batch [lambda_mu (mu_V - mu_C)^2 + lambda_var (var_V - var_C)^2]`; the
            result is the mean of `L_l` over layers. `"pooled"` (the paper's Eq. 2): mean and unbiased variance
            over every value of every layer and sample at once.

    Returns:
        `torch.Tensor`: a scalar (float32, or float64 for float64 maps), differentiable with respect to the maps.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {REDUCTIONS}.")
    _check_maps(concept_maps, category_maps)
    if reduction == "pooled":
        v = torch.cat([_upcast(m).reshape(-1) for m in concept_maps])
        c = torch.cat([_upcast(m).reshape(-1) for m in category_maps])
        return lambda_mu * (v.mean() - c.mean()).square() + lambda_var * (v.var() - c.var()).square()

    per_layer = []
    for v, c in zip(concept_maps, category_maps):
        v = _upcast(v).flatten(1)  # [batch, heads * pixels]
        c = _upcast(c).flatten(1)
        term = lambda_mu * (v.mean(1) - c.mean(1)).square()
        if lambda_var != 0:  # the variance term costs a second pass over the maps; skip it when unused
            term = term + lambda_var * (v.var(1) - c.var(1)).square()
        per_layer.append(term.sum())
    return torch.stack(per_layer).mean()


def flow_matching_sigmas(normal: torch.Tensor, scheduler_config) -> torch.Tensor:
    """Rectified-flow noise levels in (0, 1) from standard-normal draws `normal`, as diffusers' SD3 and Flux
    DreamBooth scripts sample them: logit-normal (`sigmoid(normal)`, SD3's default `logit_normal` density with
    mean 0 and std 1), then the scheduler's static `shift` (`shift * s / (1 + (shift - 1) * s)`, 3.0 for SD3) unless
    it shifts by resolution at generation (`use_dynamic_shifting`, Flux), where the training sigmas stay unshifted."""
    sigmas = torch.sigmoid(normal.float())
    shift = float(dict(scheduler_config).get("shift", 1.0))
    if not dict(scheduler_config).get("use_dynamic_shifting", False) and shift != 1.0:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


def flow_matching_pair(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(noisy, target)` of rectified flow at noise levels `sigmas` `[batch]`: `noisy = (1 - s) x + s noise` and the
    velocity the denoiser predicts, `noise - x` (`FlowMatchEulerDiscreteScheduler` integrates it from s=1 to 0)."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise, noise - latents


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict, following the scheduler's `prediction_type`
    (`epsilon` for SD 1.x / 2.x-base, `v_prediction` for SD 2.x-768)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"The scheduler's prediction_type={prediction_type!r} is not supported; attndb trains 'epsilon' and "
        "'v_prediction' models (Stable Diffusion 1.x and 2.x)."
    )


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"),
    as diffusers' train_text_to_image.py computes them (`diffusers.training_utils.compute_snr`).

    With `SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t])`, a sample's weight is `min(SNR, gamma) / SNR` for
    epsilon prediction and `min(SNR, gamma) / (SNR + 1)` for v-prediction: the nearly noise-free timesteps, whose
    easy targets otherwise dominate the gradient, are weighed down; a timestep with SNR <= gamma keeps weight 1
    (epsilon).

    Args:
        alphas_cumprod (`torch.Tensor`): the noise schedule's cumulative alphas, `[num_train_timesteps]`.
        timesteps (`torch.Tensor`): the samples' timesteps, `[batch]`.
        gamma (`float`): the SNR cap (> 0; 5 in the paper).
        prediction_type (`str`): the scheduler's, `epsilon` or `v_prediction`.

    Returns:
        `torch.Tensor`: `[batch]` float32 weights on the timesteps' device.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"min_snr_weights: prediction_type={prediction_type!r}; use 'epsilon' or 'v_prediction'.")
    alpha = alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    snr = alpha / (1.0 - alpha)
    capped = snr.clamp(max=gamma)
    return capped / (snr + 1.0) if prediction_type == "v_prediction" else capped / snr


def _weighted_mean(error: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of each sample's mean `error` times its weight."""
    return (error.mean(dim=tuple(range(1, error.ndim))) * weights.float()).mean()


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in float32 (the prediction may come out of bf16/fp16 autocast).

    Args:
        model_pred, target (`torch.Tensor`): `[batch, ...]`.
        weights (`torch.Tensor`, *optional*): `[batch]` per-sample weights (`min_snr_weights`): each sample's mean
            squared error is weighted, then the batch averaged. None: the plain mean.
    """
    if weights is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return _weighted_mean((model_pred.float() - target.float()).square(), weights)


def masked_diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    floor: float = MASK_MEAN_FLOOR,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion loss weighted by a subject mask, in float32 (an addition to the paper's method).

    Each sample's squared error is weighted by its mask divided by the mask's mean (at least `floor`), so a
    sample's loss is the mean squared error over its subject and the loss keeps the scale of `diffusion_loss`
    (an all-ones mask gives the unmasked MSE); background pixels (mask 0) contribute nothing.

    Args:
        model_pred, target (`torch.Tensor`): `[batch, C, h, w]`.
        mask (`torch.Tensor`): `[batch, 1, h, w]` in [0, 1] at latent resolution (1 = subject).
        floor (`float`): the smallest mask mean divided by.
        weights (`torch.Tensor`, *optional*): `[batch]` per-sample weights on top of the mask's (`min_snr_weights`).

    Returns:
        `torch.Tensor`: a scalar, the mean over the batch of the samples' weighted MSE.
    """
    mask = mask.float()
    if mask.shape[0] != model_pred.shape[0] or mask.shape[-2:] != model_pred.shape[-2:]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match the prediction {tuple(model_pred.shape)}: expected "
            "[batch, 1, h, w] at latent resolution."
        )
    weight = mask / mask.mean(dim=(1, 2, 3), keepdim=True).clamp_min(floor)
    error = (model_pred.float() - target.float()).square()
    if weights is None:
        return (error * weight).mean()
    return _weighted_mean(error * weight, weights)
