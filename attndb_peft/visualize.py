# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Pictures: captioned image grids and per-token cross-attention figures (Pillow and numpy only).

Used by the validation samples and checkpoint scores of `train` (`curve_plot`), by `attndb generate`,
`attndb inspect`, `attndb evaluate` and the demo.
No plotting library is needed: captions use Pillow's built-in font and attention maps are coloured with a
small lookup table defined here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["attention_figure", "colorize", "curve_plot", "image_grid", "labelled_cells", "load_font", "wrap_text"]

#: Anchor colours of the attention colour map (black -> purple -> red -> orange -> pale yellow, like "inferno"):
#: dark means no attention, bright means most attention; it stays readable in greyscale print.
_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
    dtype=np.float64,
)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_PAD = 4


def _lookup_table() -> np.ndarray:
    x = np.linspace(0, 1, 256)
    stops = np.linspace(0, 1, len(_ANCHORS))
    return np.stack([np.interp(x, stops, _ANCHORS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


_LUT = _lookup_table()


def load_font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels (the scalable one when Pillow has FreeType, else the bitmap one)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else len(text) * 6


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Hgy<>")
    return int(bottom) + 2


def wrap_text(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than `width` pixels; words longer than a line (a long
    token such as `<attndb-teddy-bear>`) are broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_width(font, candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # the word alone may still be too wide
                if line and _text_width(font, line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Scale `image` so its longer side is `size`; small images (the tiny pipeline's 32 px) are enlarged with
    nearest-neighbour so pixels stay sharp, large ones reduced with Lanczos."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if new == image.size:
        return image
    return image.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _default_cell(images: Sequence[Image.Image]) -> int:
    # Large enough for a caption, small enough that a grid of 512-px images stays a reasonable file.
    return int(min(256, max(128, max(max(im.size) for im in images))))


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], x: int, y: int, width: int, font, center: bool) -> None:
    height = _line_height(font)
    for i, line in enumerate(lines):
        offset = (width - _text_width(font, line)) / 2 if center else 0
        draw.text((x + offset, y + i * height), line, fill=_TEXT, font=font)


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    cell_size: int | None = None,
    title: str | None = None,
    font_size: int = 12,
) -> Image.Image:
    """Arrange images in rows, each row under its caption (e.g. one row per prompt, one column per seed).

    Args:
        rows (`Sequence[Sequence[PIL.Image.Image]]`): the images, row by row (rows may differ in length).
        row_labels (`Sequence[str]`, *optional*): one caption per row, drawn above the row (wrapped).
        column_labels (`Sequence[str]`, *optional*): captions drawn once above the columns (e.g. "seed 0").
        cell_size (`int`, *optional*): the longer side of every cell; default the images' size within 128-256 px.
        title (`str`, *optional*): a line at the top of the picture.
        font_size (`int`): caption size in pixels.

    Returns:
        `PIL.Image.Image`: the RGB grid.
    """
    rows = [list(r) for r in rows]
    flat = [im for r in rows for im in r]
    if not flat:
        raise ValueError("image_grid needs at least one image.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows.")
    cell = cell_size or _default_cell(flat)
    font = load_font(font_size)
    line = _line_height(font)
    columns = max(len(r) for r in rows)
    width = columns * (cell + _PAD) + _PAD
    text_width = width - 2 * _PAD

    blocks: list[tuple[str, object]] = []  # ("text", lines) or ("row", images), drawn top to bottom
    if title:
        blocks.append(("text", wrap_text(title, font, text_width)))
    if column_labels:
        blocks.append(("columns", [wrap_text(c, font, cell) for c in column_labels]))
    for i, row in enumerate(rows):
        if row_labels is not None:
            blocks.append(("text", wrap_text(row_labels[i], font, text_width)))
        blocks.append(("row", [_fit(im, cell) for im in row]))

    def block_height(kind, content) -> int:
        if kind == "text":
            return len(content) * line + _PAD
        if kind == "columns":
            return max(len(c) for c in content) * line + _PAD
        return cell + _PAD

    height = _PAD + sum(block_height(k, c) for k, c in blocks)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    for kind, content in blocks:
        if kind == "text":
            _draw_lines(draw, content, _PAD, y, text_width, font, center=False)
        elif kind == "columns":
            for j, lines in enumerate(content):
                _draw_lines(draw, lines, _PAD + j * (cell + _PAD), y, cell, font, center=True)
        else:
            for j, im in enumerate(content):
                x0 = _PAD + j * (cell + _PAD) + (cell - im.width) // 2
                canvas.paste(im, (x0, y + (cell - im.height) // 2))
        y += block_height(kind, content)
    return canvas


def labelled_cells(
    cells: Sequence[Image.Image],
    labels: Sequence[str],
    columns: int | None = None,
    cell_size: int | None = None,
    title: str | None = None,
    font_size: int = 12,
) -> Image.Image:
    """Images laid out left to right, wrapping after `columns`, each with its own label underneath.

    Args:
        cells (`Sequence[PIL.Image.Image]`): the images.
        labels (`Sequence[str]`): one label per image (wrapped to the cell width).
        columns (`int`, *optional*): cells per row; default all in one row, at most 10.
        cell_size (`int`, *optional*): the longer side of every cell (default 128).
        title (`str`, *optional*): a line at the top of the picture.
        font_size (`int`): label size in pixels.
    """
    if len(cells) != len(labels) or not cells:
        raise ValueError(f"labelled_cells needs one label per image, got {len(cells)} images, {len(labels)} labels.")
    cell = cell_size or 128
    columns = columns or min(len(cells), 10)
    font = load_font(font_size)
    line = _line_height(font)
    wrapped = [wrap_text(label, font, cell) for label in labels]
    label_height = max(len(w) for w in wrapped) * line
    width = columns * (cell + _PAD) + _PAD
    title_lines = wrap_text(title, font, width - 2 * _PAD) if title else []
    top = _PAD + len(title_lines) * line + (_PAD if title_lines else 0)
    num_rows = -(-len(cells) // columns)
    row_height = cell + label_height + 2 * _PAD
    canvas = Image.new("RGB", (width, top + num_rows * row_height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_lines(draw, title_lines, _PAD, _PAD, width - 2 * _PAD, font, center=False)
    for k, (image, lines) in enumerate(zip(cells, wrapped)):
        r, c = divmod(k, columns)
        x, y = _PAD + c * (cell + _PAD), top + r * row_height
        fitted = _fit(image, cell)
        canvas.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
        _draw_lines(draw, lines, x, y + cell + _PAD, cell, font, center=True)
    return canvas


def colorize(attention: np.ndarray) -> Image.Image:
    """Colour a 2-D attention map: each map is scaled by its own maximum (as in Prompt-to-Prompt's figures),
    so the picture shows *where* a token attends; compare magnitudes with the numbers, not the colours.

    Args:
        attention (`np.ndarray`): `[height, width]` non-negative values.

    Returns:
        `PIL.Image.Image`: an RGB image of the same size.
    """
    values = np.nan_to_num(np.asarray(attention, dtype=np.float64))
    if values.ndim != 2:
        raise ValueError(f"colorize expects a 2-D map, got shape {values.shape}.")
    peak = values.max()
    scaled = values / peak if peak > 0 else np.zeros_like(values)
    return Image.fromarray(_LUT[(np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)], mode="RGB")


def attention_figure(
    image: Image.Image,
    maps: np.ndarray,
    labels: Sequence[str],
    title: str | None = None,
    cell_size: int = 128,
    columns: int | None = None,
) -> Image.Image:
    """The generated image followed by one coloured cross-attention map per prompt token, each labelled with
    its token, like the per-token analysis figures of the AttnDreamBooth and Prompt-to-Prompt papers.

    Args:
        image (`PIL.Image.Image`): the generated image.
        maps (`np.ndarray`): `[num_tokens, height, width]` aggregated attention maps.
        labels (`Sequence[str]`): the token texts, one per map.
        title (`str`, *optional*): e.g. the prompt.
        cell_size (`int`): size of each panel in pixels.
        columns (`int`, *optional*): panels per row (default: all in one row up to 10).
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) != len(labels):
        raise ValueError(
            f"attention_figure needs [tokens, h, w] maps and one label each; got {maps.shape}, {len(labels)}."
        )
    aspect = image.size
    panels = [image]
    for m in maps:  # maps are at latent resolution; stretch each to the image's aspect with smooth upsampling
        panels.append(colorize(m).resize(aspect, Image.BILINEAR))
    return labelled_cells(panels, ["image", *labels], columns=columns, cell_size=cell_size, title=title)


#: Line colours of `curve_plot` (matplotlib's "tab10").
_SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def curve_plot(
    series: Sequence[tuple[str, Sequence[tuple]]],
    path,
    x_label: str,
    y_label: str,
    title: str = "",
    marked: tuple[float, float] | None = None,
    size: tuple[int, int] = (720, 520),
) -> Image.Image:
    """A line plot of labelled points, one coloured curve per series (e.g. identity against text alignment over a
    run's checkpoints), saved to `path`.

    Args:
        series: `(label, points)` pairs; a point is `(x, y, text)` or `(x, y, text, x_half_width, y_half_width)`
            (error bars, e.g. 95 % intervals); consecutive points are joined.
        path: the PNG to write.
        x_label, y_label, title (`str`): the axes' and the plot's captions.
        marked (`tuple[float, float]`, *optional*): a point to ring (e.g. the selected checkpoint).
    """
    width, height = size
    left, right, top, bottom = 64, 170, 34, 48
    font = load_font(11)
    xs = [v for _, pts in series for p in pts for v in (p[0] - _err(p, 3), p[0] + _err(p, 3))]
    ys = [v for _, pts in series for p in pts for v in (p[1] - _err(p, 4), p[1] + _err(p, 4))]
    (x0, x1), (y0, y1) = _padded(xs), _padded(ys)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    image = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=_TEXT)
    for i in range(6):
        fx, fy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        gx, gy = px(fx, fy)
        draw.line([gx, height - bottom, gx, height - bottom + 4], fill=_TEXT)
        draw.text((gx - 14, height - bottom + 6), f"{fx:.3g}", fill=_TEXT, font=font)
        draw.line([left - 4, gy, left, gy], fill=_TEXT)
        draw.text((4, gy - 6), f"{fy:.3g}", fill=_TEXT, font=font)
    draw.text((left, 8), title, fill=_TEXT, font=font)
    draw.text((left, height - 20), f"x: {x_label}    y: {y_label}", fill=_TEXT, font=font)
    for k, (label, points) in enumerate(series):
        colour = _SERIES_COLOURS[k % len(_SERIES_COLOURS)]
        centres = [px(p[0], p[1]) for p in points]
        if len(centres) > 1:
            draw.line(centres, fill=colour, width=2)
        for p, (cx, cy) in zip(points, centres):
            if _err(p, 3):
                draw.line([px(p[0] - p[3], p[1]), px(p[0] + p[3], p[1])], fill=colour, width=1)
            if _err(p, 4):
                draw.line([px(p[0], p[1] - p[4]), px(p[0], p[1] + p[4])], fill=colour, width=1)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            if p[2]:
                draw.text((cx + 5, cy - 13), str(p[2]), fill=colour, font=font)
        ly = top + 4 + 16 * k
        draw.line([width - right + 10, ly + 6, width - right + 28, ly + 6], fill=colour, width=3)
        draw.text((width - right + 32, ly), label, fill=colour, font=font)
    if marked is not None:
        cx, cy = px(*marked)
        draw.ellipse([cx - 8, cy - 8, cx + 8, cy + 8], outline=_TEXT, width=2)
    image.save(path)
    return image


def _err(point: tuple, index: int) -> float:
    return float(point[index] or 0.0) if len(point) > index else 0.0


def _padded(values: list[float]) -> tuple[float, float]:
    """An axis range holding every value with 5 % room (a flat range gets +-0.05)."""
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.05, high + 0.05
    room = 0.05 * (high - low)
    return low - room, high + room
