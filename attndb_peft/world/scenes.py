# Copyright 2026 The attndb_peft authors. Licensed under the Apache License, Version 2.0.
"""The toy world's pictures: one object in a scene, drawn with numpy from a seed.

A scene is a category (`ball`, `box`, `cone`), a colour (`red`, `blue`, `yellow`, `purple`, `orange`), a context
(`on the grass`, `on the beach`, `in the snow`, `at night`, `by a brick wall`, or none: a plain grey backdrop) and
a style (`a photo of`, `a painting of`: blurred, posterized and framed; `a sketch of`: a grey pencil drawing of the
object alone on white paper). Captions follow the training prompt's grammar: `a photo of a red ball on the grass`.

A personal concept (`Concept`) is an object of one category with a two-colour pattern (stripes, checks, dots or
halves). The base model never sees a patterned object in pretraining, so a concept is new to it; any seed gives a
new one. Its "user photos" show it on the plain backdrop at varied positions and scales.

`concept_folder` writes a concept's photos and `concept.json` into a folder (`attndb world concept`).

Everything here is deterministic given the `numpy.random.Generator` passed in; colours are RGB in 0..255.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import default_token, instance_prompt

__all__ = [
    "CATEGORIES",
    "CONCEPT_FILE",
    "COLOURS",
    "CONCEPT_COLOURS",
    "CONTEXTS",
    "PATTERNS",
    "PLAIN",
    "SIZE",
    "STYLES",
    "WORLD_WORDS",
    "Concept",
    "Scene",
    "all_scenes",
    "caption",
    "concept_folder",
    "concept_photos",
    "make_concept",
    "picture_array",
    "render",
    "split_scenes",
]

#: The file `concept_folder` writes next to a concept's photos (what `attndb world score --concept` reads).
CONCEPT_FILE = "concept.json"
#: Image side in pixels of every world picture.
SIZE = 32

CATEGORIES = ("ball", "box", "cone")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "blue": (40, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (150, 45, 205),
    "orange": (250, 135, 20),
}
#: Context key -> the words of the caption.
CONTEXTS: dict[str, str] = {
    "grass": "on the grass",
    "beach": "on the beach",
    "snow": "in the snow",
    "night": "at night",
    "brick": "by a brick wall",
}
#: Style key -> the words that open the caption.
STYLES: dict[str, str] = {"photo": "a photo of", "painting": "a painting of", "sketch": "a sketch of"}
#: The backdrop of a scene without context words (and of a concept's user photos).
PLAIN = (165, 165, 165)
#: Colours a concept's pattern may use: the world's and a few that no pretraining object has.
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "white": (250, 250, 250),
    "black": (25, 25, 25),
    "green": (40, 190, 60),
    "pink": (250, 120, 190),
    "cyan": (40, 220, 220),
}
PATTERNS = ("hstripes", "vstripes", "checks", "dots", "halves")
#: Every word of every caption; the world tokenizer makes each of them one token.
WORLD_WORDS = tuple(
    sorted(
        set(" ".join([*CONTEXTS.values(), *STYLES.values()]).split()) | set(CATEGORIES) | set(COLOURS)
    )
)

_FRAME = (115, 75, 35)  # a painting's wooden frame
_PAPER = (240, 238, 232)  # a sketch's paper
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """What a caption says: `style`, `colour` (None: the concept's own colours), `category`, `context` (None:
    plain backdrop)."""

    category: str
    colour: str | None = None
    context: str | None = None
    style: str = "photo"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("category", self.category, CATEGORIES),
            ("colour", self.colour, (None, *COLOURS)),
            ("context", self.context, (None, *CONTEXTS)),
            ("style", self.style, tuple(STYLES)),
        ):
            if value not in allowed:
                raise ValueError(f"Scene {name}={value!r}: expected one of {', '.join(map(str, allowed))}.")


@dataclass(frozen=True)
class Concept:
    """A personal object: a `category` drawn with a two-colour `pattern` (`colours`, names from
    `CONCEPT_COLOURS`) of `period` pixels. `seed` is where it came from (`make_concept(seed)`)."""

    seed: int
    category: str
    pattern: str
    colours: tuple[str, str]
    period: int

    def to_dict(self) -> dict:
        return {**asdict(self), "colours": list(self.colours)}

    @classmethod
    def from_dict(cls, data: dict) -> Concept:
        return cls(
            seed=int(data["seed"]),
            category=str(data["category"]),
            pattern=str(data["pattern"]),
            colours=tuple(data["colours"]),
            period=int(data["period"]),
        )

    def describe(self) -> str:
        """What makes it distinctive, in words."""
        names = {"hstripes": "horizontal stripes", "vstripes": "vertical stripes", "checks": "checks",
                 "dots": "dots", "halves": "two halves"}
        a, b = self.colours
        return f"a {self.category} in {a} and {b} {names[self.pattern]} (period {self.period} px)"


def make_concept(seed: int) -> Concept:
    """The concept of `seed` (any non-negative integer): category, pattern, two different colours, period."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"concept seed {seed!r}: expected a non-negative integer.")
    rng = np.random.default_rng([int(seed), 0xC0])
    names = list(CONCEPT_COLOURS)
    first, second = rng.choice(len(names), size=2, replace=False)
    return Concept(
        seed=int(seed),
        category=CATEGORIES[rng.integers(len(CATEGORIES))],
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        colours=(names[first], names[second]),
        period=int(rng.integers(3, 6)),
    )


def caption(scene: Scene, token: str | None = None) -> str:
    """The scene's caption; `token` (a concept's `[V]`) goes right before the category."""
    words = [STYLES[scene.style], "a"]
    if scene.colour:
        words.append(scene.colour)
    if token:
        words.append(token)
    words.append(scene.category)
    if scene.context:
        words.append(CONTEXTS[scene.context])
    return " ".join(words)


def all_scenes(with_plain: bool = True) -> list[Scene]:
    """Every caption of the world without a concept: style x colour x category x context (+ plain)."""
    contexts = [*CONTEXTS, None] if with_plain else list(CONTEXTS)
    return [
        Scene(category=cat, colour=col, context=ctx, style=sty)
        for sty, col, cat, ctx in itertools.product(STYLES, COLOURS, CATEGORIES, contexts)
    ]


def split_scenes(num_held_out: int = 30, seed: int = 1) -> tuple[list[Scene], list[Scene]]:
    """Split `all_scenes()` into (train, held-out) so that every pair of attribute values still occurs in
    training: held-out captions test composition, not memory."""
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scenes))
    held: list[Scene] = []

    def pairs(s: Scene):
        values = (("cat", s.category), ("col", s.colour), ("ctx", s.context), ("sty", s.style))
        return set(itertools.combinations(values, 2))

    counts: dict = {}
    for s in scenes:
        for p in pairs(s):
            counts[p] = counts.get(p, 0) + 1
    for i in order:
        s = scenes[i]
        if len(held) == num_held_out:
            break
        if s.context is None:  # plain-backdrop captions are the concept's training prompt's neighbours: keep them
            continue
        if all(counts[p] > 1 for p in pairs(s)):
            held.append(s)
            for p in pairs(s):
                counts[p] -= 1
    held_set = set(held)
    return [s for s in scenes if s not in held_set], held


# ----------------------------------------------------------------------------------------------- drawing
def _background(context: str | None, rng: np.random.Generator) -> np.ndarray:
    a = np.empty((SIZE, SIZE, 3), np.float32)
    yy, xx = _YY, _XX
    if context is None:
        a[:] = PLAIN
    elif context == "grass":
        a[:] = (70, 160, 60)
        phase = rng.integers(0, 5)
        a[((xx + 2 * yy + phase) % 5 == 0) & (rng.random((SIZE, SIZE)) < 0.8)] = (35, 105, 35)
    elif context == "beach":
        horizon = int(rng.integers(SIZE // 4, SIZE // 3 + 1))
        a[:] = (230, 205, 150)
        a[:horizon] = (150, 200, 240)
        a[rng.random((SIZE, SIZE)) < 0.06] = (200, 170, 110)
        a[:horizon] = (150, 200, 240)
    elif context == "snow":
        a[:] = (246, 247, 252)
        a[rng.random((SIZE, SIZE)) < 0.10] = (185, 205, 235)
    elif context == "night":
        a[:] = (14, 18, 58)
        a[rng.random((SIZE, SIZE)) < 0.04] = (255, 250, 200)
    elif context == "brick":
        a[:] = (125, 62, 50)
        shift = rng.integers(0, 8)
        a[(yy % 6 == 0) | (((xx + shift + 4 * ((yy // 6) % 2)) % 8) == 0)] = (205, 195, 185)
    else:
        raise ValueError(f"unknown context {context!r}")
    return a


def _shape_mask(category: str, cx: float, cy: float, s: float) -> np.ndarray:
    yy, xx = _YY + 0.5, _XX + 0.5
    if category == "ball":
        return (xx - cx) ** 2 + (yy - cy) ** 2 < s * s
    if category == "box":
        return (np.abs(xx - cx) < s * 0.85) & (np.abs(yy - cy) < s * 0.85)
    if category == "cone":
        return (yy - cy < s * 0.85) & (yy - cy > -s) & (np.abs(xx - cx) < (yy - cy + s) * 0.55)
    raise ValueError(f"unknown category {category!r}")


def _pattern(concept: Concept, first: tuple, cx: float, cy: float, s: float) -> np.ndarray:
    """The object's colour at every pixel for a patterned concept (`first` replaces its first colour)."""
    second = CONCEPT_COLOURS[concept.colours[1]]
    xx, yy = _XX - (cx - s), _YY - (cy - s)  # pattern anchored to the object, so it moves with it
    p = concept.period
    if concept.pattern == "hstripes":
        sel = (yy // p) % 2 == 0
    elif concept.pattern == "vstripes":
        sel = (xx // p) % 2 == 0
    elif concept.pattern == "checks":
        sel = ((xx // p) + (yy // p)) % 2 == 0
    elif concept.pattern == "dots":
        sel = ~((((xx % (2 * p)) - p + 0.5) ** 2 + (((yy % (2 * p)) - p + 0.5) ** 2)) < (p * 0.6) ** 2)
    elif concept.pattern == "halves":
        sel = xx < s
    else:
        raise ValueError(f"unknown pattern {concept.pattern!r}")
    out = np.empty((SIZE, SIZE, 3), np.float32)
    out[:] = second
    out[sel] = first
    return out


def _blur(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(p[i : i + SIZE, j : j + SIZE] * w for (i, j), w in zip(
        itertools.product(range(3), range(3)), (1, 2, 1, 2, 4, 2, 1, 2, 1))) / 16.0


def _stylize(a: np.ndarray, mask: np.ndarray, style: str) -> np.ndarray:
    if style == "photo":
        return a
    if style == "painting":
        a = np.round(_blur(a) / 255.0 * 4.0) / 4.0 * 255.0  # soft, then flat patches of 5 levels a channel
        a[:2], a[-2:], a[:, :2], a[:, -2:] = _FRAME, _FRAME, _FRAME, _FRAME
        return a
    if style == "sketch":
        grey = a @ np.array([0.299, 0.587, 0.114], np.float32)
        tone = 90.0 + 0.45 * grey  # pencil shading of the object keeps its pattern as grey levels
        out = np.empty_like(a)
        out[:] = _PAPER
        out[mask] = tone[mask, None]
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        out[mask & ~inner] = (45, 45, 45)  # the outline
        return out
    raise ValueError(f"unknown style {style!r}")


def render(
    scene: Scene,
    rng: np.random.Generator,
    concept: Concept | None = None,
    scale: tuple[float, float] = (7.0, 10.5),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `scene` (the object is `concept` if given, recoloured by `scene.colour` if that is set).

    Returns:
        `(image, mask)`: uint8 `[SIZE, SIZE, 3]` and the object's bool `[SIZE, SIZE]` mask.
    """
    if concept is not None and concept.category != scene.category:
        raise ValueError(f"scene category {scene.category!r} differs from the concept's {concept.category!r}")
    a = _background(scene.context, rng)
    s = float(rng.uniform(*scale))
    margin = min(s + 1.0, SIZE / 2)
    cx, cy = (float(v) for v in rng.uniform(margin, SIZE - margin, 2))
    mask = _shape_mask(scene.category, cx, cy, s)
    if concept is None:
        a[mask] = COLOURS[scene.colour or "red"]
    else:
        first = COLOURS[scene.colour] if scene.colour else CONCEPT_COLOURS[concept.colours[0]]
        a[mask] = _pattern(concept, first, cx, cy, s)[mask]
    a = _stylize(a, mask, scene.style)
    return np.clip(np.round(a), 0, 255).astype(np.uint8), mask


def concept_photos(concept: Concept, num_images: int = 5, seed: int | None = None) -> list[np.ndarray]:
    """The concept's "user photos": `a photo of a [V] <category>` on the plain backdrop, varied position and
    scale (uint8 `[SIZE, SIZE, 3]` each)."""
    rng = np.random.default_rng([concept.seed if seed is None else seed, 0xF0])
    scene = Scene(category=concept.category)
    return [render(scene, rng, concept=concept, scale=(7.5, 11.0))[0] for _ in range(num_images)]


def concept_folder(seed: int, output_dir: str | Path, num_images: int = 5) -> dict:
    """Write the concept of `seed`'s user photos (`instance_XX.png`) and `concept.json` into `output_dir`.

    Returns:
        `dict`: what `concept.json` holds: `Concept.to_dict()` plus `description`, `token` (the attndb default
        token of its category), `instance_prompt` and `images`.
    """
    concept = make_concept(seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(concept_photos(concept, num_images)):
        names.append(f"instance_{i:02d}.png")
        Image.fromarray(image).save(output_dir / names[-1])
    token = default_token(concept.category)
    info = {
        **concept.to_dict(),
        "description": concept.describe(),
        "token": token,
        "instance_prompt": instance_prompt(token, concept.category),
        "images": names,
    }
    (output_dir / CONCEPT_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def picture_array(image: Image.Image) -> np.ndarray:
    """A PIL picture as a world picture: uint8 RGB `[SIZE, SIZE, 3]` (other sizes box-resized), what the scorers
    read."""
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def with_colour(scene: Scene, colour: str | None) -> Scene:
    """`scene` with another colour (a small helper for prompt sets)."""
    return replace(scene, colour=colour)
