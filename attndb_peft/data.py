# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Instance images: discovery, validation, decoding (EXIF, odd modes), augmentation views and the latent cache.

Augmentation is done once, up front: each image becomes a small set of views (the center crop, its mirror
image, and optionally extra random crops), each view is encoded by the VAE once, and training samples a
view per image per step and draws a fresh latent from the cached posterior (mean + std * noise), so the
VAE's sampling noise stays as in the reference code while the VAE never runs in the loop. Rotations of the
reference code are not kept: they add black corners and resampling blur to few-shot data.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageFolderReport",
    "LatentCache",
    "batch_indices",
    "encode_views",
    "image_views",
    "load_image",
    "scan_image_folder",
]

logger = logging.getLogger(__name__)

#: File extensions treated as images; other files in the folder (captions, .DS_Store) are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: Background that transparent pixels are composited onto.
ALPHA_BACKGROUND = (255, 255, 255)


class DataError(ValueError):
    """The instance images cannot be used. The message lists every problem found."""


@dataclass
class ImageFolderReport:
    """What `scan_image_folder` found: usable images, problems that stop the run, warnings, ignored files."""

    images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def load_image(path: str | os.PathLike):
    """Open an image as 8-bit RGB the way a viewer shows it.

    EXIF orientation is applied; transparency (RGBA, LA, P with a transparent colour) is composited onto a
    white background; 16-bit and 32-bit integer images are scaled to 8 bits (not clipped); CMYK, L, P and
    WebP decode to RGB.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(image):
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16-bit PNG/TIFF open as I;16* or I (32-bit int). Scale by the format's range instead of clipping.
        array = np.asarray(image).astype(np.float64)
        if mode == "F":
            top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        elif mode.startswith("I;16") or array.max(initial=0) > 255:
            top = 65535.0
        else:
            top = 255.0
        array = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")  # 2-D uint8 -> L
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def scan_image_folder(folder: str | os.PathLike, resolution: int) -> ImageFolderReport:
    """Find and check the instance images without loading any model.

    Problems (the run cannot start): the folder is missing or holds no images; a file with an image
    extension does not decode; an image is smaller than half the resolution. Warnings: an image is smaller
    than the resolution (it will be upscaled). Files without an image extension are ignored and logged.
    """
    from PIL import Image

    report = ImageFolderReport()
    folder = Path(folder)
    if not folder.is_dir():
        report.problems.append(f"--images {folder}: no such folder; point --images at the folder with your photos.")
        return report
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            if path.is_file() or path.name.startswith("."):
                report.ignored.append(path)
            continue
        try:
            with Image.open(path) as image:
                image.load()
                width, height = image.size
        except Exception as exc:  # PIL raises many types for broken files
            report.problems.append(
                f"{path}: cannot be decoded as an image ({type(exc).__name__}); remove or replace it."
            )
            continue
        shorter = min(width, height)
        if shorter < resolution / 2:
            report.problems.append(
                f"{path}: {width}x{height} is smaller than half the training resolution ({resolution}); use a "
                f"larger photo or lower --resolution."
            )
            continue
        if shorter < resolution:
            report.warnings.append(
                f"{path}: {width}x{height} is smaller than --resolution {resolution}; it will be upscaled."
            )
        report.images.append(path)
    for path in report.ignored:
        logger.info("Ignoring %s (not an image file)", path)
    if not report.images and not report.problems:
        report.problems.append(
            f"--images {folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); add 3-20 photos."
        )
    return report


def _resize_crop(image, resolution: int, box: tuple[float, float, float, float] | None):
    from PIL import Image

    if box is not None:
        image = image.crop(tuple(round(v) for v in box))
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, resample=Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_views(image, resolution: int, flip: bool = True, random_crops: int = 0, seed: int = 0) -> list[torch.Tensor]:
    """The augmentation views of one RGB image, each `[3, resolution, resolution]` in [-1, 1].

    View 0 is the center crop of the image resized so its shorter side is `resolution`. `random_crops` adds
    crops covering 80-100% of the shorter side at random positions (seeded). With `flip`, every view is
    followed by its mirror image, so sampling views uniformly flips with probability 1/2.
    """
    rng = random.Random(seed)
    width, height = image.size
    boxes: list[tuple[float, float, float, float] | None] = [None]
    for _ in range(random_crops):
        side = min(width, height) * rng.uniform(0.8, 1.0)
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        boxes.append((left, top, left + side, top + side))
    views = []
    for box in boxes:
        view = _to_tensor(_resize_crop(image, resolution, box))
        views.append(view)
        if flip:
            views.append(view.flip(-1))
    return views


@torch.no_grad()
def encode_views(vae, views: list[torch.Tensor], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode views with the VAE once; returns the posterior mean and std, `[num_views, C, h, w]` float32."""
    means, stds = [], []
    for start in range(0, len(views), batch_size):
        pixels = torch.stack(views[start : start + batch_size]).to(vae.device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


class LatentCache:
    """Cached VAE posteriors of every view of every image, on the training device.

    Args:
        mean, std (`torch.Tensor`): `[num_views_total, C, h, w]` from `encode_views`.
        view_owner (`list[int]`): for each cached view, the index of its image.
        scaling_factor (`float`), shift_factor (`float`): the VAE's latent normalisation.
    """

    def __init__(self, mean, std, view_owner, scaling_factor: float, shift_factor: float = 0.0):
        self.mean, self.std = mean, std
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.num_images = max(view_owner) + 1
        self.views_of = [[v for v, owner in enumerate(view_owner) if owner == i] for i in range(self.num_images)]
        self.views_per_image = len(self.views_of[0])

    def sample(self, view_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents for the given cached views: `(mean + std * eps - shift) * scaling`."""
        mean, std = self.mean[view_ids], self.std[view_ids]
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps - self.shift_factor) * self.scaling_factor

    def view_ids(self, image_ids: list[int], choices: list[int], device=None) -> torch.Tensor:
        """Cached-view ids of (image, view choice) pairs, on `device` (default: the cache's)."""
        ids = [self.views_of[i][c % self.views_per_image] for i, c in zip(image_ids, choices)]
        return torch.tensor(ids, device=self.mean.device if device is None else device)


def batch_indices(
    step: int,
    batch_size: int,
    num_images: int,
    views_per_image: int,
    seed: int,
    process_index: int = 0,
    num_processes: int = 1,
) -> tuple[list[int], list[int]]:
    """Which images (and which of their views) a process trains on at `step`: a pure function of its
    arguments, so resuming at a step needs no sampler state.

    The global stream walks through a fresh seeded permutation of the images every epoch; each step takes the
    next `batch_size * num_processes` entries and every process its own contiguous slice of them.
    """
    global_batch = batch_size * num_processes
    start = step * global_batch + process_index * batch_size
    images, views = [], []
    cache: dict[int, tuple[list[int], list[int]]] = {}
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, num_images)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = (
                torch.randperm(num_images, generator=g).tolist(),
                torch.randint(views_per_image, (num_images,), generator=g).tolist(),
            )
        order, choice = cache[epoch]
        images.append(order[pos])
        views.append(choice[pos])
    return images, views
