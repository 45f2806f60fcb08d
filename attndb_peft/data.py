# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Instance images: discovery, validation, decoding (EXIF, odd modes), augmentation views and the latent cache.

Augmentation is done once, up front: each image becomes a small set of views (the center crop, its mirror
image, and optionally extra random crops), each view is encoded by the VAE once, and training samples a
view per image per step and draws a fresh latent from the cached posterior (mean + std * noise), so the
VAE's sampling noise stays as in the reference code while the VAE never runs in the loop. Rotations of the
reference code are not kept: they add black corners and resampling blur to few-shot data.

Subject masks (opt-in, `masked_loss`): from a masks folder (one mask per image, same file stem) or else from the
images' alpha channel. A mask goes through exactly the geometry of its image's views (crop box, resize, flip) and
is then area-averaged to latent resolution and cached beside the latents (`LatentCache.mask`).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError, arg

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageFolderReport",
    "LatentCache",
    "MaskReport",
    "batch_indices",
    "encode_views",
    "image_views",
    "latent_masks",
    "load_alpha",
    "load_image",
    "load_mask",
    "load_subject_mask",
    "mask_views",
    "scan_image_folder",
    "scan_masks",
]

logger = logging.getLogger(__name__)

#: File extensions treated as images; other files in the folder (captions, .DS_Store) are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: Background that transparent pixels are composited onto.
ALPHA_BACKGROUND = (255, 255, 255)


class DataError(UsageError):
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


def scan_image_folder(folder: str | os.PathLike, resolution: int | None) -> ImageFolderReport:
    """Find and check the instance images without loading any model.

    Problems (the run cannot start): the folder is missing or holds no images; a file with an image
    extension does not decode; an image is smaller than half the resolution. Warnings: an image is smaller
    than the resolution (it will be upscaled). Files without an image extension are ignored and logged.
    `resolution=None` (the base model's size, not known when its configs cannot be read) skips the size checks.
    """
    from PIL import Image

    report = ImageFolderReport()
    folder = Path(folder)
    if not folder.is_dir():
        report.problems.append(
            f"{arg('images')} {folder}: no such folder; point {arg('images')} at the folder with your photos."
        )
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
        if resolution is None:
            report.images.append(path)
            continue
        if shorter < resolution / 2:
            report.problems.append(
                f"{path}: {width}x{height} is smaller than half the training resolution ({resolution}); use a "
                f"larger photo or lower {arg('resolution')}."
            )
            continue
        if shorter < resolution:
            report.warnings.append(
                f"{path}: {width}x{height} is smaller than {arg('resolution')} {resolution}; it will be upscaled."
            )
        report.images.append(path)
    for path in report.ignored:
        logger.info("Ignoring %s (not an image file)", path)
    if not report.images and not report.problems:
        report.problems.append(
            f"{arg('images')} {folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); add 3-20 photos."
        )
    return report


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _alpha_channel(image):
    """The alpha channel of a decoded image as mode "L", or None when it has none or it is fully opaque."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in _ALPHA_MODES:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def load_alpha(path: str | os.PathLike):
    """The transparency of an image as a mode "L" mask (255 = opaque = subject), oriented like `load_image`;
    None when the image has no alpha channel or is fully opaque."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    return _alpha_channel(image)


def load_mask(path: str | os.PathLike):
    """A mask file as mode "L" (255 = subject, 0 = background), oriented by its own EXIF tag.

    A mask with transparency uses its alpha channel (a cut-out saved as the mask); any other mask its luminance
    (white = subject; 16-bit masks are scaled like photos). Grey values weight partially.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    alpha = _alpha_channel(image)
    return alpha if alpha is not None else _to_rgb(image).convert("L")


def load_subject_mask(image_path: str | os.PathLike, mask_path: str | os.PathLike | None):
    """The subject mask of one instance image (mode "L"), from the `mask_path` that `scan_masks` chose: a mask
    file, the image itself (its alpha channel), or None (no mask: the whole frame, all 255)."""
    from PIL import Image

    if mask_path is None:
        with Image.open(image_path) as image:
            size = _displayed_size(image)
        return Image.new("L", size, 255)
    if Path(mask_path) == Path(image_path):
        return load_alpha(image_path)
    return load_mask(mask_path)


def _displayed_size(image) -> tuple[int, int]:
    """Width and height of an open image as a viewer shows it (EXIF orientations 5-8 swap the sides)."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@dataclass
class MaskReport:
    """What `scan_masks` found: for each image, where its mask comes from (a mask file, the image itself for its
    alpha channel, or None for the whole frame), problems that stop the run and warnings."""

    sources: list[Path | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def scan_masks(images: list[Path], masks: str | os.PathLike | None) -> MaskReport:
    """Find and check the subject mask of every instance image (for `masked_loss`), without loading any model.

    With a `masks` folder each image needs exactly one mask file with its file stem (`dog1.jpg` ->
    `masks/dog1.png`), of the image's size as displayed, with some subject (not all black). Without one, the
    images' alpha channels are the masks: at least one image must have transparency; images without are
    trained on their whole frame (a warning names them). An image's mask file wins over its alpha channel.
    """
    from PIL import Image

    report = MaskReport()
    if masks is not None:
        folder = Path(masks)
        if not folder.is_dir():
            report.problems.append(
                f"{arg('masks')} {folder}: no such folder; point {arg('masks')} at a folder with one mask per photo "
                "(same file name stem, white = subject)."
            )
            return report
        by_stem: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                by_stem.setdefault(path.stem, []).append(path)
        stems = [image.stem for image in images]
        for image in images:
            found = by_stem.get(image.stem, [])
            if stems.count(image.stem) > 1:
                report.problems.append(
                    f"{image}: another photo has the file stem {image.stem!r}, so {arg('masks')} {folder} cannot tell "
                    "their masks apart; rename one of the photos (and its mask)."
                )
            elif not found:
                report.problems.append(
                    f"{image}: no mask in {arg('masks')} {folder} (looked for {image.stem}.*, e.g. "
                    f"{folder / image.stem}.png); add its mask (white = subject, same size as the photo) or remove "
                    "the photo."
                )
            elif len(found) > 1:
                names = ", ".join(p.name for p in found)
                report.problems.append(
                    f"{image}: several masks in {arg('masks')} {folder} have its stem ({names}); keep exactly one."
                )
            report.sources.append(found[0] if len(found) == 1 else None)
        unused = sorted(set(by_stem) - set(stems))
        if unused:
            report.warnings.append(
                f"{arg('masks')} {folder}: mask(s) without a photo of the same stem are ignored: "
                + ", ".join(by_stem[stem][0].name for stem in unused)
                + "."
            )
    else:
        for image in images:
            try:
                has_alpha = load_alpha(image) is not None
            except Exception:  # a broken image is reported by scan_image_folder
                has_alpha = False
            report.sources.append(image if has_alpha else None)
        if images and all(source is None for source in report.sources):
            report.problems.append(
                f"{arg('masked_loss')}: none of the photos has transparency (an alpha channel) and no "
                f"{arg('masks')} folder was given; use cut-out PNGs with transparent backgrounds, give "
                f"{arg('masks')} DIR with one mask per photo (same file name stem, white = subject), or drop "
                f"{arg('masked_loss')}."
            )
            return report
        opaque = [image.name for image, source in zip(images, report.sources) if source is None]
        if opaque:
            report.warnings.append(
                f"{arg('masked_loss')}: {', '.join(opaque)} ha{'ve' if len(opaque) > 1 else 's'} no transparency; "
                f"trained on the whole frame (give {arg('masks')} DIR to mask them too)."
            )
    for image, source in zip(images, report.sources):
        if source is None:
            continue
        try:
            with Image.open(image) as opened:
                image_size = _displayed_size(opened)
            mask = load_subject_mask(image, source)
        except Exception as exc:  # PIL raises many types for broken files
            report.problems.append(f"{source}: cannot be decoded as a mask ({type(exc).__name__}); replace it.")
            continue
        if mask.size != image_size:
            report.problems.append(
                f"{source}: the mask is {mask.size[0]}x{mask.size[1]} but its photo {image.name} is "
                f"{image_size[0]}x{image_size[1]} (as displayed); save the mask at the photo's size."
            )
        elif mask.getextrema()[1] == 0:
            what = "fully transparent" if source == image else "all black (no subject)"
            report.problems.append(
                f"{source}: the mask is {what}, so {image.name} would teach nothing; mark the subject "
                f"({'opaque' if source == image else 'white'}) or remove the photo."
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
    views = []
    for box in _view_boxes(image.size, random_crops, seed):
        view = _to_tensor(_resize_crop(image, resolution, box))
        views.append(view)
        if flip:
            views.append(view.flip(-1))
    return views


def _view_boxes(size: tuple[int, int], random_crops: int, seed: int) -> list[tuple[float, float, float, float] | None]:
    """The crop boxes of an image's views: None (the center crop), then `random_crops` seeded random squares."""
    rng = random.Random(seed)
    width, height = size
    boxes: list[tuple[float, float, float, float] | None] = [None]
    for _ in range(random_crops):
        side = min(width, height) * rng.uniform(0.8, 1.0)
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        boxes.append((left, top, left + side, top + side))
    return boxes


def mask_views(mask, resolution: int, flip: bool = True, random_crops: int = 0, seed: int = 0) -> list[torch.Tensor]:
    """The views of a subject mask that match `image_views` of its image with the same arguments, each
    `[1, resolution, resolution]` float32 in [0, 1] (1 = subject).

    Args:
        mask (`PIL.Image.Image`): mode "L" (255 = subject) or "F" (1.0 = subject), the size of its image.

    The same crop boxes, the same bicubic resize (in float, clipped to [0, 1]) and the same mirror images.
    """
    from PIL import Image

    if mask.mode != "F":
        mask = Image.fromarray(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0, mode="F")
    views = []
    for box in _view_boxes(mask.size, random_crops, seed):
        view = torch.from_numpy(np.asarray(_resize_crop(mask, resolution, box), dtype=np.float32).copy())
        view = view.clamp_(0.0, 1.0)[None]
        views.append(view)
        if flip:
            views.append(view.flip(-1))
    return views


def latent_masks(views: list[torch.Tensor], latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel-resolution mask views `[1, H, W]` -> `[num_views, 1, h, w]` at latent resolution: each latent
    cell gets the mean of the pixels it covers (the VAE downsamples by an integer factor, so cells tile)."""
    pixels = torch.stack(views).float()
    height, width = pixels.shape[-2:]
    h, w = latent_size
    if height % h or width % w:
        raise ValueError(f"mask views of {height}x{width} do not tile a {h}x{w} latent grid.")
    return torch.nn.functional.avg_pool2d(pixels, kernel_size=(height // h, width // w))


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
        mask (`torch.Tensor`, *optional*): `[num_views_total, 1, h, w]` subject masks at latent resolution (from
            `latent_masks`), with `masked_loss`; None otherwise.
    """

    def __init__(self, mean, std, view_owner, scaling_factor: float, shift_factor: float = 0.0, mask=None):
        self.mean, self.std, self.mask = mean, std, mask
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
