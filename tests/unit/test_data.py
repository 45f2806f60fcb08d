# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Instance images: odd but valid formats decode to the RGB a viewer shows; views and data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attndb_peft.data import (
    ALPHA_BACKGROUND,
    IMAGE_EXTENSIONS,
    batch_indices,
    image_views,
    load_image,
    scan_image_folder,
)


def _halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue (landscape)."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def test_exif_orientation_is_applied(tmp_path):
    upright = _halves()
    # Orientation 6 means "rotate 90 degrees clockwise to display": store the pixels rotated the other way.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    loaded = np.asarray(load_image(tmp_path / "rotated.jpg")).astype(int)
    assert loaded.shape[:2] == (20, 40)  # landscape again
    assert loaded[10, 5, 0] > 200 and loaded[10, 5, 2] < 60  # left is red
    assert loaded[10, 35, 2] > 200 and loaded[10, 35, 0] < 60  # right is blue


def test_alpha_is_composited_on_the_background(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (10, 200, 30, 0))  # fully transparent
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert tuple(out[0, 0]) == ALPHA_BACKGROUND
    assert np.all(np.abs(out[0, 1] - np.array(ALPHA_BACKGROUND) * 127 / 255) <= 1)
    assert tuple(out[1, 1]) == (10, 200, 30)
    la = Image.new("LA", (2, 2), (50, 0))
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == ALPHA_BACKGROUND


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == ALPHA_BACKGROUND


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # uint16 -> I;16
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_grayscale_cmyk_and_webp(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert tuple(np.asarray(load_image(tmp_path / "l.png"))[1, 1]) == (77, 77, 77)
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # pure cyan
    cmyk.save(tmp_path / "c.tiff")
    out = np.asarray(load_image(tmp_path / "c.tiff"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 255, 255)
    _halves().save(tmp_path / "w.webp", lossless=True)
    assert tuple(np.asarray(load_image(tmp_path / "w.webp"))[5, 5]) == (255, 0, 0)


def test_views_are_center_crop_then_mirror():
    image = _halves((64, 32))
    views = image_views(image, 16, flip=True, random_crops=0)
    assert len(views) == 2 and views[0].shape == (3, 16, 16)
    torch.testing.assert_close(views[1], views[0].flip(-1))
    # the center crop of a red|blue landscape is half red, half blue
    assert views[0][0, 8, 2] > 0.9 and views[0][2, 8, 13] > 0.9
    crops = image_views(image, 16, flip=False, random_crops=3, seed=1)
    assert len(crops) == 4 and all(v.min() >= -1 and v.max() <= 1 for v in crops)
    assert len({tuple(v.flatten().tolist()) for v in crops}) > 1


def test_scan_reports_every_problem(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "good.png")
    Image.new("RGB", (40, 48)).save(tmp_path / "smallish.png")
    Image.new("RGB", (20, 64)).save(tmp_path / "tiny.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "caption.txt").write_text("a dog")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    report = scan_image_folder(tmp_path, resolution=64)
    assert [p.name for p in report.images] == ["good.png", "smallish.png"]
    assert any("broken.jpg" in p and "decoded" in p for p in report.problems)
    assert any("tiny.png" in p and "half" in p for p in report.problems)
    assert any("smallish.png" in w and "`resolution` 64" in w for w in report.warnings)
    assert {p.name for p in report.ignored} == {"caption.txt", ".DS_Store"}
    assert ".jpg" in IMAGE_EXTENSIONS
    # resolution None (the base model's own, unknown when its configs cannot be read): sizes are not judged
    unsized = scan_image_folder(tmp_path, resolution=None)
    assert [p.name for p in unsized.images] == ["good.png", "smallish.png", "tiny.png"] and not unsized.warnings
    assert len(unsized.problems) == 1 and "broken.jpg" in unsized.problems[0]


def test_folder_messages_name_the_setting(tmp_path):
    """Python callers read the setting's name (`images`); `attndb train` shows the flag
    (tests/reliability/test_reliability.py)."""
    missing = scan_image_folder(tmp_path / "nope", resolution=64).problems
    assert missing == [f"`images` {tmp_path / 'nope'}: no such folder; point `images` at the folder with your photos."]
    empty = scan_image_folder(tmp_path, resolution=64).problems
    assert len(empty) == 1 and empty[0].startswith(f"`images` {tmp_path}: no images found")


@pytest.mark.parametrize("num_processes", [1, 2])
def test_batch_indices_cover_every_image_each_epoch(num_processes):
    num_images, batch = 5, 2
    seen = []
    for step in range(10):
        for rank in range(num_processes):
            images, views = batch_indices(
                step, batch, num_images, 2, seed=3, process_index=rank, num_processes=num_processes
            )
            assert len(images) == batch and all(v in (0, 1) for v in views)
            seen += images
    for epoch in range(len(seen) // num_images):
        assert sorted(seen[epoch * num_images : (epoch + 1) * num_images]) == list(range(num_images))
    assert batch_indices(7, batch, num_images, 2, seed=3) == batch_indices(7, batch, num_images, 2, seed=3)
    assert batch_indices(7, batch, num_images, 2, seed=3) != batch_indices(7, batch, num_images, 2, seed=4)
