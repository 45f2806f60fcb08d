# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The latent cache of a run: every augmentation view of every image encoded once by the VAE, so the VAE never
runs in the training loop."""

from __future__ import annotations

import logging

import torch

from ..config import AttnDBConfig
from ..data import (
    LatentCache,
    encode_views,
    image_views,
    latent_masks,
    load_image,
    load_subject_mask,
    mask_views,
    scan_image_folder,
    scan_masks,
)
from ..errors import arg
from ..families import ModelFamily

__all__ = ["build_latent_cache"]

logger = logging.getLogger(__name__)


def build_latent_cache(config: AttnDBConfig, family: ModelFamily, vae) -> tuple[LatentCache, int]:
    """Encode every view of the run's images (flips and random crops, each image seeded `seed + i`) and, with
    `masked_loss`, the same views of the subject masks.

    Returns:
        `(LatentCache, int)`: the cache and the number of images.
    """
    cfg = config
    views, owner, masks = [], [], []
    paths = scan_image_folder(cfg.images, cfg.resolution).images
    sources = scan_masks(paths, cfg.masks).sources if cfg.masked_loss else []
    for i, path in enumerate(paths):
        image_views_i = image_views(load_image(path), cfg.resolution, cfg.flip, cfg.random_crops, seed=cfg.seed + i)
        views += image_views_i
        owner += [i] * len(image_views_i)
        if cfg.masked_loss:  # the same views of the subject mask (same crop boxes, resize and flips)
            subject = load_subject_mask(path, sources[i])
            masks += mask_views(subject, cfg.resolution, cfg.flip, cfg.random_crops, seed=cfg.seed + i)
    upcast = family.vae_fp32_encode and vae.dtype == torch.float16  # the SDXL VAE overflows in fp16
    if upcast:
        vae.to(torch.float32)
    mean, std = encode_views(vae, views, batch_size=cfg.batch_size)
    if upcast:
        vae.to(torch.float16)
    mask = latent_masks(masks, tuple(mean.shape[-2:])).to(mean.device) if cfg.masked_loss else None
    cache = LatentCache(
        mean,
        std,
        owner,
        vae.config.scaling_factor,
        getattr(vae.config, "shift_factor", None) or 0.0,
        mask=mask,
    )
    logger.info("Cached %d views of %d images", len(views), len(paths))
    if mask is not None:
        masked = sum(source is not None for source in sources)
        logger.info(
            "Masked loss: %d of %d images masked (%s); mean subject share of the views %.2f",
            masked,
            len(paths),
            f"{arg('masks')} {cfg.masks}" if cfg.masks else "alpha channel",
            float(mask.mean()),
        )
    return cache, len(paths)
