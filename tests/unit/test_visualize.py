# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Pictures: captioned grids, the attention colour map and per-token figures (Pillow only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attndb_peft.inference import aggregate_layer_maps
from attndb_peft.visualize import attention_figure, colorize, image_grid, labelled_cells, load_font, wrap_text


def _solid(color, size=32):
    return Image.new("RGB", (size, size), color)


def test_image_grid_places_every_image_under_its_caption():
    rows = [[_solid((255, 0, 0)), _solid((0, 255, 0))], [_solid((0, 0, 255))]]
    grid = image_grid(rows, row_labels=["first prompt", "second"], column_labels=["seed 0", "seed 1"], cell_size=64)
    assert grid.mode == "RGB"
    assert grid.width == 2 * (64 + 4) + 4
    pixels = np.asarray(grid)
    # each colour appears as a 64x64 block (32-px images enlarged with nearest neighbour)
    for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255)):
        assert (pixels == color).all(-1).sum() == 64 * 64
    with pytest.raises(ValueError, match="row labels"):
        image_grid(rows, row_labels=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])


def test_wrap_text_respects_the_width_and_breaks_long_tokens():
    font = load_font(12)
    lines = wrap_text("a watercolor painting of a <attndb-teddy-bear-with-a-long-name> teddy bear", font, 60)
    assert len(lines) > 2
    assert all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == "awatercolorpaintingofa<attndb-teddy-bear-with-a-long-name>teddybear"


def test_colorize_scales_each_map_by_its_maximum():
    attention = np.array([[0.0, 0.5], [1.0, 0.25]]) * 0.01  # small absolute values, as real maps are
    image = np.asarray(colorize(attention))
    assert image.shape == (2, 2, 3)
    brightness = image.astype(int).sum(-1)
    assert brightness[1, 0] == brightness.max() and brightness[0, 0] == brightness.min()
    assert (np.asarray(colorize(np.zeros((3, 3)))) == image[0, 0]).all()  # an all-zero map is all "no attention"
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros(4))


def test_attention_figure_has_the_image_and_one_labelled_panel_per_token():
    labels = ["a", "photo", "of", "<attndb-dog>", "dog"]
    maps = np.random.default_rng(0).random((len(labels), 8, 8))
    figure = attention_figure(_solid((10, 20, 30)), maps, labels, title="a photo of <attndb-dog> dog", cell_size=64)
    assert figure.width == (len(labels) + 1) * (64 + 4) + 4
    with pytest.raises(ValueError, match="one label each"):
        attention_figure(_solid((0, 0, 0)), maps, labels[:-1])
    many = labelled_cells([_solid((0, 0, 0))] * 12, [str(i) for i in range(12)], columns=5, cell_size=32)
    assert many.width == 5 * 36 + 4


def test_aggregate_layer_maps_averages_heads_and_resizes_layers_to_the_latent_grid():
    # layer 1 on the 4x4 latent grid: head 0 puts all of token 0 on pixel (1, 2), head 1 nothing -> 0.5 there
    fine = torch.zeros(1, 2, 16, 2)
    fine[0, 0, 1 * 4 + 2, 0] = 1.0
    fine[..., 1] = 0.3
    # layer 2 on the 2x2 grid (half resolution): constant maps stay constant after bilinear resizing
    coarse = torch.full((1, 3, 4, 2), 0.1)
    out = aggregate_layer_maps([fine, coarse], (4, 4))
    assert out.shape == (1, 2, 4, 4)
    expected0 = torch.full((4, 4), 0.1 / 2)
    expected0[1, 2] += 0.5 / 2
    torch.testing.assert_close(out[0, 0], expected0)
    torch.testing.assert_close(out[0, 1], torch.full((4, 4), (0.3 + 0.1) / 2))
    # odd latent sizes: SD halves with ceil (e.g. 9 -> 5 -> 3)
    odd = aggregate_layer_maps([torch.ones(1, 1, 9 * 7, 1), torch.ones(1, 1, 5 * 4, 1)], (9, 7))
    assert odd.shape == (1, 1, 9, 7)
    with pytest.raises(ValueError, match="latent grid"):
        aggregate_layer_maps([torch.ones(1, 1, 11, 1)], (4, 4))
