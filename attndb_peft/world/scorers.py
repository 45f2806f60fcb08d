# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""Exact scorers of world pictures: style, context, colour, category/presence and concept identity from pixels.

Every scorer is hand-crafted from what the renderer (`scenes`) draws, and uses region statistics (votes, medians,
fractions) rather than exact pixel values, so that it also reads the blurry, colour-shifted pictures of a small
diffusion model:

- style: a painting has a wooden frame (the outer 2-px ring is frame-brown); a sketch is grey (low chroma
  everywhere) on bright paper; anything else is a photo.
- context: every pixel votes, with a soft kernel, for the contexts whose background palette (base colours, their
  blends and, for paintings, their posterized versions) explains it; the context with the highest mean vote wins.
- object mask: the pixels the predicted background palette does not explain (paper for sketches), largest
  4-connected component, holes filled.
- category: the mask's fill ratio of its bounding box and its width profile (top and bottom quarter widths over
  the widest row) against the ideal ball / box / cone values.
- colour: the object's pixels vote for the nearest named colour (plain and posterized prototypes).
- identity: the object's colour histogram over `CONCEPT_COLOURS` and its two-colour pattern statistics (the rate
  of colour changes along x and along y, the minority share), compared with the same features of ground-truth
  renders of the concept in the same style and colour; `identity_ok` when the concept is nearer than each of
  `NUM_DISTRACTORS` fixed distractor concepts of the same category rendered the same way (distractors that the
  caption's recolouring makes look like the concept, e.g. when only the shared second colour is left, are left
  out; with none left, `identity_ok` means the identity distance is small).

`validate_scorers` measures all of them on fresh ground-truth renders, clean and degraded (`degrade`: gaussian
blur, noise and colour jitter).
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np

from .scenes import (
    _FRAME,
    _PAPER,
    CATEGORIES,
    COLOURS,
    CONCEPT_COLOURS,
    CONTEXTS,
    PLAIN,
    SIZE,
    STYLES,
    Concept,
    Scene,
    _background,
    _stylize,
    make_concept,
    render,
)

__all__ = [
    "NUM_DISTRACTORS",
    "OK_FIELDS",
    "degrade",
    "distractor_concepts",
    "object_mask",
    "parse_caption",
    "score_image",
    "summarize",
    "validate_scorers",
]

#: How many same-category distractor concepts `identity_ok` must beat.
NUM_DISTRACTORS = 8
#: The boolean fields of a `score_image` record that `summarize` averages.
OK_FIELDS = ("style_ok", "context_ok", "colour_ok", "category_ok", "present", "identity_ok")
#: Seeds of the distractor concepts start here (validation concepts are drawn far from it).
_DISTRACTOR_SEED0 = 900_000
_MIN_AREA = 30  # pixels: smaller "objects" are specks, not an object

# Background palettes: (colour, weight). Texture colours weigh less than the main colour, so that a plain grey
# painting is not read as a brick wall's mortar.
_PALETTES: dict[str | None, list[tuple[tuple[int, int, int], float]]] = {
    None: [(PLAIN, 1.0)],
    "grass": [((70, 160, 60), 1.0), ((35, 105, 35), 0.8)],
    "beach": [((230, 205, 150), 1.0), ((150, 200, 240), 1.0), ((200, 170, 110), 0.6)],
    "snow": [((246, 247, 252), 1.0), ((185, 205, 235), 0.5)],
    "night": [((14, 18, 58), 1.0), ((255, 250, 200), 0.3)],
    "brick": [((125, 62, 50), 1.0), ((205, 195, 185), 0.5)],
}
_SIGMA = 28.0  # RGB distance scale of a context vote
_BG_DISTANCE = {"photo": 48.0, "painting": 52.0}  # farther from every background colour: object
_PAPER_DISTANCE = 38.0
_CLOSING = 2  # pixels
_SAME_LOOK = 0.1  # identity distance under which a picture shows the concept (when no distractor is left)


def _posterize(c: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(c, np.float32) / 255.0 * 4.0) / 4.0 * 255.0


def _blends(colours: list[tuple], weights: list[float], steps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Every colour, and the blends of every pair at 1/steps increments (what a blur makes of a texture)."""
    out, w = [], []
    for i in range(len(colours)):
        for j in range(i, len(colours)):
            for t in np.linspace(0.0, 1.0, steps + 1) if j > i else [0.0]:
                out.append((1 - t) * np.asarray(colours[i], np.float32) + t * np.asarray(colours[j], np.float32))
                w.append(((1 - t) * weights[i] + t * weights[j]) * (1.0 if t in (0.0, 1.0) else 0.6))
    return np.asarray(out, np.float32), np.asarray(w, np.float32)


@functools.cache
def _palette(context: str | None, style: str, frame: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The background colours (and weights) of `context` in `style` (photo or painting); with `frame`, also
    the blends of a painting's frame into them (what the picture's edge shows)."""
    colours = [c for c, _ in _PALETTES[context]]
    weights = [w for _, w in _PALETTES[context]]
    if frame:
        colours, weights = [*colours, _FRAME], [*weights, 0.0]
    rgb, w = _blends(colours, weights)
    if style == "painting":
        rgb, w = np.concatenate([rgb, _posterize(rgb)]), np.concatenate([w, w])
    return rgb, w


def _colour_prototypes(names: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    rgb = np.asarray([CONCEPT_COLOURS[n] for n in names], np.float32)
    return np.concatenate([rgb, _posterize(rgb)]), [*names, *names]


_ALL_COLOURS = tuple(CONCEPT_COLOURS)
_PROTO_RGB, _PROTO_NAMES = _colour_prototypes(_ALL_COLOURS)
_PROTO_INDEX = np.asarray([_ALL_COLOURS.index(n) for n in _PROTO_NAMES])


# ------------------------------------------------------------------------------------------------ utilities
def _distances(pixels: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """`[..., k]` Euclidean RGB distances of `pixels [..., 3]` to `rgb [k, 3]`."""
    return np.sqrt(((pixels[..., None, :].astype(np.float32) - rgb) ** 2).sum(-1))


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = outside `mask`) and their number."""
    labels = np.zeros(mask.shape, np.int32)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    return labels, n


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = _components(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _drop_specks(mask: np.ndarray, size: int = 6) -> np.ndarray:
    """`mask` without its components of fewer than `size` pixels (noise)."""
    labels, n = _components(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    return mask & (sizes[labels] >= size)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    labels, n = _components(~mask)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    holes = ~mask & ~np.isin(labels, list(border))
    return mask | holes


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Dilation by a (2r+1)-square."""
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Erosion by a (2r+1)-square (outside the picture counts as inside the mask)."""
    return ~_dilate(~mask, r)


def _border(width: int) -> np.ndarray:
    ring = np.zeros((SIZE, SIZE), bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    return ring


_RING1, _RING2 = _border(1), _border(2)


def _as_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a uint8 image of shape ({SIZE}, {SIZE}, 3), got {image.shape}")
    return image.astype(np.float32)


# ------------------------------------------------------------------------------------------------ scorers
def predict_style(image: np.ndarray) -> str:
    """`painting` (wooden frame), `sketch` (grey on paper) or `photo`."""
    a = _as_image(image)
    if (_distances(a[_RING1], np.asarray([_FRAME], np.float32))[:, 0] < 45.0).mean() > 0.85:
        return "painting"
    chroma = a.max(-1) - a.min(-1)
    paper = _distances(a, np.asarray([_PAPER], np.float32))[..., 0] < 40.0
    if np.percentile(chroma, 90) < 40.0 and paper.mean() > 0.35:
        return "sketch"
    return "photo"


def _context_votes(a: np.ndarray, style: str) -> dict[str | None, float]:
    inner = a[2:-2, 2:-2] if style == "painting" else a
    pixels = inner.reshape(-1, 3)
    votes = {}
    for context in _PALETTES:
        rgb, w = _palette(context, style)
        d = _distances(pixels, rgb)
        votes[context] = float((w * np.exp(-(d**2) / (2 * _SIGMA**2))).max(-1).mean())
    return votes


def predict_context(image: np.ndarray, style: str | None = None) -> str | None:
    """The context key whose background palette explains the most pixels (None: plain backdrop). Sketches have
    no context: returns None for them."""
    style = style or predict_style(image)
    if style == "sketch":
        return None
    votes = _context_votes(_as_image(image), style)
    return max(votes, key=votes.get)


def object_mask(image: np.ndarray, style: str | None = None, context: str | None = "auto") -> np.ndarray:
    """The object's bool mask: pixels the background (of `context`, predicted when "auto") does not explain,
    largest 4-connected component, holes filled. Empty when nothing stands out."""
    a = _as_image(image)
    style = style or predict_style(image)
    if style == "sketch":
        fg = _distances(a, np.asarray([_PAPER], np.float32))[..., 0] > _PAPER_DISTANCE
    else:
        if context == "auto":
            context = predict_context(image, style)
        rgb, _ = _palette(context, style)
        fg = _distances(a, rgb).min(-1) > _BG_DISTANCE[style]
        if style == "painting":
            edge = _border(4)
            rgb, _ = _palette(context, style, frame=True)
            fg[edge] &= _distances(a[edge], rgb).min(-1) > _BG_DISTANCE[style]
            fg &= ~_RING2
    if fg.sum() < _MIN_AREA:
        return np.zeros_like(fg)
    # A patterned object whose one colour is like the background falls apart into stripes or squares: a closing
    # (dilate, keep the largest piece, fill its holes, erode) puts it back together.
    fg = _drop_specks(fg)
    r = _CLOSING
    closed = _fill_holes(_largest_component(_dilate(fg, r)))
    return _erode(closed, r) | (closed & _largest_component(fg))


# Ideal (fill ratio, top-quarter width, bottom-quarter width) of each category (widths over the widest row).
_SHAPES = {"ball": (0.79, 0.61, 0.61), "box": (1.0, 1.0, 1.0), "cone": (0.60, 0.23, 0.95)}
_SHAPE_WEIGHTS = np.asarray([2.0, 1.0, 1.0])  # the fill ratio is the steadiest feature


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill ratio of the bounding box, mean width of the top quarter of rows, of the bottom quarter), widths over
    the widest row."""
    rows, cols = mask.sum(1), mask.sum(0)
    mask = mask & (rows >= 0.1 * rows.max())[:, None] & (cols >= 0.1 * cols.max())[None, :]  # stray pixels
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    widths = mask[ys.min() : ys.max() + 1].sum(1).astype(np.float32)
    q = max(1, int(round(h / 4)))
    top, bottom = widths[:q].mean() / widths.max(), widths[-q:].mean() / widths.max()
    return float(mask.sum() / (h * w)), float(top), float(bottom)


def predict_category(mask: np.ndarray) -> str | None:
    """The category whose ideal shape is nearest (None for an empty mask)."""
    if mask.sum() < _MIN_AREA:
        return None
    f = np.asarray(shape_features(mask))
    return min(_SHAPES, key=lambda c: float((((f - np.asarray(_SHAPES[c])) * _SHAPE_WEIGHTS) ** 2).sum()))


def colour_votes(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Share of the object's pixels (its interior when it has one) nearest to each `CONCEPT_COLOURS` name, over
    the pixels near some named colour."""
    a = _as_image(image)
    inner = _erode(mask)
    pixels = a[inner if inner.sum() >= _MIN_AREA // 2 else mask]
    if len(pixels) == 0:
        return {}
    d = _distances(pixels, _PROTO_RGB)
    nearest = d.argmin(-1)
    near = d.min(-1) < 90.0
    counts = Counter(_PROTO_NAMES[i] for i in nearest[near])
    total = max(1, int(near.sum()))
    return {name: counts[name] / total for name in _ALL_COLOURS if counts[name]}


def predict_colour(votes: dict[str, float], concept: Concept | None = None) -> str | None:
    """The object's colour name. For a recoloured concept the concept's second (kept) colour is not a candidate
    unless it is the only colour seen."""
    if not votes:
        return None
    candidates = dict(votes)
    if concept is not None and len(candidates) > 1:
        kept = concept.colours[1]
        rest = {k: v for k, v in candidates.items() if k != kept and v >= 0.1}
        candidates = rest or candidates
    return max(candidates, key=candidates.get)


def identity_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The object's appearance: a colour histogram over `CONCEPT_COLOURS` (10 values summing to 1) and its
    two-colour pattern (changes per pixel along x and along y between the two main colours, minority share, median
    stripe width in pixels)."""
    a = _as_image(image)
    if mask.sum() < _MIN_AREA:
        return None
    inner = _erode(mask)
    region = inner if inner.sum() >= _MIN_AREA // 2 else mask
    d = _distances(a, _PROTO_RGB)
    name_d = np.stack([d[..., _PROTO_INDEX == k].min(-1) for k in range(len(_ALL_COLOURS))], -1)
    nearest = name_d.argmin(-1)
    hist = np.bincount(nearest[region], minlength=len(_ALL_COLOURS)).astype(np.float32)
    hist /= max(1.0, hist.sum())
    first, second = np.argsort(-hist)[:2]
    if hist[second] < 0.08:  # one colour: no pattern
        return np.concatenate([hist, [0.0, 0.0, 0.0, 0.0]]).astype(np.float32)
    label = name_d[..., first] > name_d[..., second]  # True: nearer the second colour
    horiz = region[:, 1:] & region[:, :-1]
    vert = region[1:, :] & region[:-1, :]
    gx = float((label[:, 1:] != label[:, :-1])[horiz].mean()) if horiz.any() else 0.0
    gy = float((label[1:, :] != label[:-1, :])[vert].mean()) if vert.any() else 0.0
    minority = float(min(label[region].mean(), 1 - label[region].mean()))
    runs = _interior_runs(label, region) + _interior_runs(label.T, region.T)
    period = float(np.median(runs)) if len(runs) >= 3 else 0.0
    return np.concatenate([hist, [gx, gy, minority, period]]).astype(np.float32)


def _interior_runs(label: np.ndarray, region: np.ndarray) -> list[int]:
    """Lengths of the runs of equal `label` along each row of `region` that touch neither end of their segment
    (a stripe's width; runs cut by the object's outline say nothing)."""
    out = []
    for row_label, row_region in zip(label, region):
        xs = np.nonzero(row_region)[0]
        if len(xs) < 3:
            continue
        for segment in np.split(xs, np.nonzero(np.diff(xs) > 1)[0] + 1):
            values = row_label[segment]
            cuts = np.nonzero(values[1:] != values[:-1])[0] + 1
            out.extend(int(n) for n in np.diff(cuts))  # runs between two changes
    return out


def identity_distance(f: np.ndarray, g: np.ndarray) -> float:
    """0 (same look) .. ~1+: half the L1 distance of the colour histograms plus the pattern differences (changes
    per pixel along x and y, minority share, a quarter of the stripe width difference in pixels)."""
    colour = 0.5 * float(np.abs(f[:-4] - g[:-4]).sum())
    pattern = 2.0 * float(np.abs(f[-4:-2] - g[-4:-2]).sum()) + float(abs(f[-2] - g[-2]))
    if f[-1] > 0 and g[-1] > 0:  # 0: too few stripes to tell
        pattern += 0.25 * abs(f[-1] - g[-1])
    return colour + float(pattern)


@functools.lru_cache(maxsize=4096)
def reference_features(concept: Concept, style: str, colour: str | None, num: int = 6) -> np.ndarray:
    """Mean `identity_features` of `num` ground-truth renders of `concept` on the plain backdrop in `style`,
    recoloured by `colour` (the stripe width: the median of those measured, 0 when most renders show too few)."""
    rng = np.random.default_rng([concept.seed, 0x1D, list(STYLES).index(style),
                                 1 + list(COLOURS).index(colour) if colour else 0])
    scene = Scene(category=concept.category, colour=colour, style=style)
    feats = []
    for _ in range(num):
        image, mask = render(scene, rng, concept=concept)
        f = identity_features(image, mask)
        if f is not None:
            feats.append(f)
    if not feats:
        return np.zeros(len(_ALL_COLOURS) + 4, np.float32)
    out = np.mean(feats, 0)
    periods = [f[-1] for f in feats if f[-1] > 0]
    out[-1] = float(np.median(periods)) if len(periods) * 2 >= len(feats) else 0.0  # stripe width: known or 0
    return out


@functools.cache
def distractor_concepts(category: str, num: int = NUM_DISTRACTORS) -> tuple[Concept, ...]:
    """`num` fixed concepts of `category` (seeds from 900,000 on) that `identity_ok` must beat."""
    out, seed = [], _DISTRACTOR_SEED0
    while len(out) < num:
        c = make_concept(seed)
        if c.category == category:
            out.append(c)
        seed += 1
    return tuple(out)


def _look(concept: Concept, colour: str | None) -> tuple:
    """What a picture of `concept` recoloured by `colour` shows: its pattern, two colours and stripe width, or
    just one colour when the recolouring made both the same."""
    first, second = colour or concept.colours[0], concept.colours[1]
    if first == second:
        return ("plain", first)
    return (concept.pattern, first, second, None if concept.pattern == "halves" else concept.period)


def score_image(image: np.ndarray, scene: Scene, concept: Concept | None = None) -> dict:
    """Score one world picture against what its caption asked for.

    Args:
        image (`np.ndarray`): uint8 `[32, 32, 3]` RGB picture (ground truth or generated).
        scene (`Scene`): what the caption says (see `parse_caption`).
        concept (`Concept`, *optional*): the personal concept the caption's token stands for; gives `identity`.

    Returns:
        `dict` with `style`/`style_ok`; `context`/`context_ok` (None for sketches); `colour`/`colour_ok` (None
        when the caption names no colour, and for sketches); `category`/`category_ok`; `present` (an object of
        the caption's category is in the picture); `area` (object pixels); `identity` (in [0, 1], 1 = the
        concept's look; None without a concept or on sketches) and `identity_ok` (the concept is nearer than
        every distractor concept of its category; None where `identity` is None).
    """
    a = np.asarray(image)
    style = predict_style(a)
    out: dict = {"style": style, "style_ok": style == scene.style}
    context = predict_context(a, style)
    out["context"] = context
    out["context_ok"] = None if scene.style == "sketch" else (style != "sketch" and context == scene.context)
    mask = object_mask(a, style, context)
    area = int(mask.sum())
    category = predict_category(mask)
    out.update(category=category, category_ok=category == scene.category, present=category == scene.category,
               area=area)
    colour = None
    if scene.colour is not None and scene.style != "sketch":
        colour = predict_colour(colour_votes(a, mask), concept) if style != "sketch" else None
        out.update(colour=colour, colour_ok=colour == scene.colour)
    else:
        out.update(colour=None, colour_ok=None)
    out.update(identity=None, identity_ok=None)
    if concept is not None and scene.style != "sketch" and concept.category == scene.category:
        f = identity_features(a, mask) if style != "sketch" else None
        if f is None:
            out.update(identity=0.0, identity_ok=False)
        else:
            ref = reference_features(concept, scene.style, scene.colour)
            d = identity_distance(f, ref)
            others = []
            for c in distractor_concepts(concept.category):
                # A distractor that the caption's recolouring makes look like the concept cannot be told apart
                if _look(c, scene.colour) != _look(concept, scene.colour):
                    others.append(identity_distance(f, reference_features(c, scene.style, scene.colour)))
            ok = all(d < o for o in others) if others else d < _SAME_LOOK
            out.update(identity=round(max(0.0, 1.0 - d), 4), identity_ok=bool(ok))
    return out


# ------------------------------------------------------------------------------------------------ captions
def parse_caption(text: str, token: str | None = None) -> tuple[Scene, str | None]:
    """Read a world caption back into a `Scene` (the inverse of `scenes.caption`).

    Args:
        text (`str`): e.g. `a painting of a purple <attndb-ball> ball on the beach`.
        token (`str`, *optional*): the concept's token; without it any one word between the colour and the
            category is taken as the token.

    Returns:
        `(scene, token)`: the token found before the category, or None.

    Raises:
        `ValueError` when `text` is not a world caption.
    """
    words = text.strip().split()
    rest, style = None, "photo"
    for key, opening in STYLES.items():
        head = [*opening.split(), "a"]
        if words[: len(head)] == head:
            rest, style = words[len(head) :], key
            break
    if rest is None:
        raise ValueError(f"{text!r} does not start with {' / '.join(repr(v + ' a') for v in STYLES.values())}")
    colour = rest.pop(0) if rest and rest[0] in COLOURS else None
    found = None
    if rest and rest[0] not in CATEGORIES and (token is None or rest[0] == token) and len(rest) > 1:
        found = rest.pop(0)
    if not rest or rest[0] not in CATEGORIES:
        raise ValueError(f"{text!r}: expected a category ({', '.join(CATEGORIES)}) after the colour and token")
    category = rest.pop(0)
    tail = " ".join(rest)
    context = next((k for k, v in CONTEXTS.items() if v == tail), None)
    if tail and context is None:
        raise ValueError(f"{text!r}: {tail!r} is not a context ({', '.join(map(repr, CONTEXTS.values()))})")
    return Scene(category=category, colour=colour, context=context, style=style), found


# ------------------------------------------------------------------------------------------------ validation
def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    return k / k.sum()


def degrade(image: np.ndarray, rng: np.random.Generator, blur: tuple[float, float] = (0.7, 1.0),
            noise: float = 8.0, jitter: float = 0.05, shift: float = 8.0) -> np.ndarray:
    """What a small diffusion model might make of `image`: gaussian blur (sigma drawn from `blur`), additive
    gaussian noise (`noise` of 255) and colour jitter (per-channel gain 1 +- `jitter`, offset +- `shift`)."""
    a = np.asarray(image, np.float32)
    k = _gaussian_kernel(float(rng.uniform(*blur)))
    r = len(k) // 2
    p = np.pad(a, ((r, r), (0, 0), (0, 0)), mode="reflect")
    a = sum(p[i : i + SIZE] * w for i, w in enumerate(k))
    p = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="reflect")
    a = sum(p[:, i : i + SIZE] * w for i, w in enumerate(k))
    a = a * rng.uniform(1 - jitter, 1 + jitter, 3) + rng.uniform(-shift, shift, 3)
    a = a + rng.normal(0.0, noise, a.shape)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _empty_picture(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene's background (and style) without any object."""
    a = _stylize(_background(scene.context, rng), np.zeros((SIZE, SIZE), bool), scene.style)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _sample_scene(rng: np.random.Generator, concept: Concept | None) -> Scene:
    category = concept.category if concept else CATEGORIES[rng.integers(len(CATEGORIES))]
    style = list(STYLES)[rng.integers(len(STYLES))]
    contexts = [None, *CONTEXTS]
    context = contexts[rng.integers(len(contexts))]
    if concept is None:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
    else:
        colour = list(COLOURS)[rng.integers(len(COLOURS))] if rng.random() < 0.5 else None
    return Scene(category=category, colour=colour, context=context, style=style)


def validate_scorers(num: int = 300, seed: int = 0, concept_share: float = 0.5) -> dict:
    """Accuracy of every scorer on fresh ground-truth renders, clean and degraded.

    `num` scenes cover all styles, contexts, colours and categories at random; `concept_share` of them show a
    personal concept (from seeds drawn in [10^7, 2^31), far from the distractors' and from anything tuned on),
    half of those recoloured. `num // 10` more pictures show no object and test that `present` is False.

    Returns:
        `dict`: `{"num": ..., "clean": {field: accuracy}, "degraded": {field: accuracy}, "counts": {field: n}}`
        for `style`, `context`, `colour`, `category`, `present`, `absent`, `identity`, and the mean `identity`
        of the concept pictures (`identity_mean`).
    """
    rng = np.random.default_rng([seed, 0x5C0])
    results: dict[str, dict[str, list]] = {"clean": {}, "degraded": {}}
    for i in range(num):
        concept = make_concept(int(rng.integers(10**7, 2**31))) if rng.random() < concept_share else None
        scene = _sample_scene(rng, concept)
        image, _ = render(scene, rng, concept=concept)
        for kind, picture in (("clean", image), ("degraded", degrade(image, rng))):
            r = score_image(picture, scene, concept)
            acc = results[kind]
            for name, key in (("style", "style_ok"), ("context", "context_ok"), ("colour", "colour_ok"),
                              ("category", "category_ok"), ("present", "present"), ("identity", "identity_ok")):
                if r[key] is not None:
                    acc.setdefault(name, []).append(bool(r[key]))
            if r["identity"] is not None:
                acc.setdefault("identity_mean", []).append(r["identity"])
        del i
    for _ in range(max(1, num // 10)):
        scene = _sample_scene(rng, None)
        image = _empty_picture(scene, rng)
        for kind, picture in (("clean", image), ("degraded", degrade(image, rng))):
            results[kind].setdefault("absent", []).append(not score_image(picture, scene)["present"])
    return {
        "num": num,
        "clean": {k: round(float(np.mean(v)), 4) for k, v in results["clean"].items()},
        "degraded": {k: round(float(np.mean(v)), 4) for k, v in results["degraded"].items()},
        "counts": {k: len(v) for k, v in results["clean"].items()},
    }


def summarize(records: list[dict]) -> dict:
    """Means of each ok-field over the records where it applies (None left out), the mean identity, and how many
    records each mean covers.

    Args:
        records (`list[dict]`): `score_image` results (extra keys are ignored).

    Returns:
        `dict`: `{"num_images": n, "style_ok": mean, ..., "identity": mean, "text_alignment": mean,
        "counts": {field: n}}`; a mean is None when no record has that field. A picture's text alignment is the
        mean of its applicable `style_ok`, `context_ok` and `colour_ok`.
    """
    out: dict = {"num_images": len(records)}
    counts = {}
    for key in (*OK_FIELDS, "identity"):
        values = [float(r[key]) for r in records if r.get(key) is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
        counts[key] = len(values)
    # text alignment of one picture: the share of what its caption asks (style, and context / colour where the
    # caption names them) that the picture shows
    aligned = [
        float(np.mean([r[k] for k in ("style_ok", "context_ok", "colour_ok") if r.get(k) is not None]))
        for r in records
        if any(r.get(k) is not None for k in ("style_ok", "context_ok", "colour_ok"))
    ]
    out["text_alignment"] = round(float(np.mean(aligned)), 4) if aligned else None
    counts["text_alignment"] = len(aligned)
    out["counts"] = counts
    return out

