"""Generated scenes with known answers: coloured shapes, their boxes, and captions that name them.

A scene is a plain or lightly textured background with a few non-overlapping objects, each a
shape (circle, square, triangle, cross, diamond) in one of six colours and one of two sizes. A
caption names objects from varied templates and word orders ("a red circle and a small blue
square", "there is a green cross, a black diamond and a yellow triangle", ...); for every object
it names, it records the character span of the object's phrase (size word, colour, shape; no
article), so that a phrase's heatmap can be checked against the object's box.

Everything is deterministic given a ``numpy.random.Generator``: the same seed gives the same
scenes, captions and pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
"""Shape names, as they appear in captions."""

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (40, 80, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "black": (25, 25, 25),
}
"""Colour name -> base RGB (uint8); each object jitters its colour around the base."""

SIZES = {"small": (0.15, 0.19), "large": (0.26, 0.32)}
"""Size name -> range of the object's side as a fraction of the canvas's shorter side."""

DEFAULT_CANVAS = 96
"""Default canvas side, pixels: the shapes model's input size, so no resampling happens."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
_COLOUR_JITTER = 12  # per channel, uint8 units
_GAP = 2  # pixels between object boxes
_PREFIXES = ("", "there is ", "a picture of ", "an image of ", "a drawing of ", "this shows ")
_PAIR_LINKS = (" and ", " next to ", " beside ", " with ")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        size: one of :data:`SIZES`.
        box: (x0, y0, x1, y1) integer pixels, x1 and y1 exclusive; the shape touches all four sides.
        rgb: the drawn colour, uint8 RGB.
        quarter_turns: rotation of the shape, counter-clockwise quarter turns (only a triangle
            looks different).
    """

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]
    quarter_turns: int = 0


@dataclass(frozen=True)
class Scene:
    """A scene: canvas, background and objects; :func:`render` draws it.

    Attributes:
        width, height: canvas size, pixels.
        background: base background colour, uint8 RGB.
        texture: standard deviation of the background's grey noise, uint8 units (0 = plain).
        texture_seed: seed of that noise.
        objects: the objects, no two with the same (colour, shape) and no two boxes closer
            than 2 pixels.
    """

    width: int
    height: int
    background: tuple[int, int, int]
    texture: float
    texture_seed: int
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Phrase:
    """Where a caption names one object: ``caption.text[start:end]``, e.g. "small red circle"."""

    object_index: int
    start: int
    end: int


@dataclass(frozen=True)
class SceneCaption:
    """A generated caption of a scene and the phrases in it (in caption order)."""

    text: str
    phrases: tuple[Phrase, ...]


@dataclass(frozen=True)
class CaptionStyle:
    """The template choices of a caption, so that a colour-swapped twin can reuse them.

    Attributes:
        order: indices of the objects named, in caption order (a subset names only those).
        size_words: per entry of ``order``, whether its phrase starts with the size word.
        prefix: text before the list, e.g. "there is ".
        articles: whether each phrase gets "a"/"an".
        link: the text between two objects (pairs only; longer lists use commas and "and").
        oxford_comma: ", and" before the last of three or more objects.
    """

    order: tuple[int, ...]
    size_words: tuple[bool, ...]
    prefix: str
    articles: bool
    link: str
    oxford_comma: bool


def _box_side(rng: np.random.Generator, size: str, canvas: int) -> int:
    low, high = SIZES[size]
    return int(round(rng.uniform(low, high) * canvas))


def _apart(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def generate_scene(
    rng: np.random.Generator,
    *,
    width: int = DEFAULT_CANVAS,
    height: int = DEFAULT_CANVAS,
    n_objects: int | tuple[int, int] = (2, 4),
) -> Scene:
    """Draw a random scene.

    Args:
        rng: the source of randomness (the scene is a pure function of its state).
        width, height: canvas size, pixels (at least 48 each).
        n_objects: an exact count, or an inclusive (low, high) range drawn uniformly; at most
            ``len(SHAPES) * len(COLOURS)``.

    Returns:
        A :class:`Scene` whose objects have distinct (colour, shape) pairs and boxes that
        neither overlap nor touch.

    Raises:
        ValueError: a canvas side below 48 pixels, or an object count outside [1, 30].
        RuntimeError: the objects could not be placed after many attempts (a canvas far too
            small for the count).
    """
    if min(width, height) < 48:
        raise ValueError(f"canvas must be at least 48x48 pixels; got {width}x{height}")
    low, high = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    if not 1 <= low <= high <= len(SHAPES) * len(COLOURS):
        raise ValueError(f"n_objects must be within [1, {len(SHAPES) * len(COLOURS)}]; got {n_objects}")
    count = int(rng.integers(low, high + 1))
    canvas = min(width, height)
    kinds = rng.permutation(len(SHAPES) * len(COLOURS))[:count]  # distinct (colour, shape) pairs
    colour_names = list(COLOURS)
    for _attempt in range(200):
        objects: list[SceneObject] = []
        for kind in kinds:
            colour, shape = colour_names[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]
            size = str(rng.choice(list(SIZES)))
            side = _box_side(rng, size, canvas)
            for _try in range(50):
                x0 = int(rng.integers(1, width - side))
                y0 = int(rng.integers(1, height - side))
                box = (x0, y0, x0 + side, y0 + side)
                if all(_apart(box, o.box) for o in objects):
                    break
            else:
                break  # no room left: start the whole layout again
            base = np.array(COLOURS[colour])
            rgb = tuple(int(v) for v in np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255))
            turns = int(rng.integers(0, 4))
            objects.append(SceneObject(shape, colour, size, box, rgb, turns))
        if len(objects) == count:
            break
    else:
        raise RuntimeError(f"could not place {count} objects on a {width}x{height} canvas")
    grey = rng.uniform(185, 240)
    background = tuple(int(v) for v in np.clip(grey + rng.uniform(-10, 10, 3), 0, 255))
    texture = 0.0 if rng.random() < 0.5 else float(rng.uniform(2, 8))
    return Scene(width, height, background, texture, int(rng.integers(0, 2**31)), tuple(objects))


def _shape_polygon(shape: str, side: float, quarter_turns: int) -> list[tuple[float, float]] | None:
    """Polygon of a shape in a [0, side] square (None for a circle), rotated counter-clockwise."""
    s = side
    if shape == "square":
        points = [(0, 0), (s, 0), (s, s), (0, s)]
    elif shape == "triangle":
        points = [(s / 2, 0), (s, s), (0, s)]  # apex up
    elif shape == "diamond":
        points = [(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)]
    elif shape == "cross":
        a, b = s / 3, 2 * s / 3
        points = [(a, 0), (b, 0), (b, a), (s, a), (s, b), (b, b), (b, s), (a, s), (a, b), (0, b), (0, a), (a, a)]
    elif shape == "circle":
        return None
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    for _ in range(quarter_turns % 4):
        # counter-clockwise quarter turn on screen (y down): (x, y) -> (y, s - x)
        points = [(y, s - x) for x, y in points]
    return points


def _mask(obj: SceneObject) -> np.ndarray:
    """float32 (h, w) coverage in [0, 1] of the object's box, anti-aliased (read-only: shared)."""
    x0, y0, x1, y1 = obj.box
    return _shape_mask(obj.shape, x1 - x0, y1 - y0, obj.quarter_turns % 4)


@functools.lru_cache(maxsize=4096)
def _shape_mask(shape: str, width: int, height: int, quarter_turns: int) -> np.ndarray:
    # Cached because training renders hundreds of thousands of objects from a few hundred
    # (shape, size, turn) masks; the read-only flag keeps a caller from editing the shared copy.
    w, h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    polygon = _shape_polygon(shape, w, quarter_turns)
    if polygon is None:
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    else:
        draw.polygon(polygon, fill=255)
    small = np.asarray(mask.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
    small.flags.writeable = False
    return small


def patch_coverage(scene: Scene, patch: int) -> np.ndarray:
    """How much of each patch each object covers.

    Args:
        scene: the scene; its sides must be multiples of ``patch``.
        patch: patch side, pixels (the model's, e.g. 12 for an 8x8 grid on 96 px).

    Returns:
        float32 (n_objects, height // patch, width // patch), the fraction in [0, 1] of each
        patch's pixels the object's anti-aliased shape (not its box) covers.

    Raises:
        ValueError: a side of the scene is not a multiple of ``patch``.
    """
    if scene.width % patch or scene.height % patch:
        raise ValueError(f"patch must divide the canvas; got {patch} px for {scene.width}x{scene.height}")
    cover = np.zeros((len(scene.objects), scene.height, scene.width), dtype=np.float32)
    for index, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        cover[index, y0:y1, x0:x1] = _mask(obj)
    rows, columns = scene.height // patch, scene.width // patch
    return cover.reshape(len(scene.objects), rows, patch, columns, patch).mean(axis=(2, 4))


def render(scene: Scene) -> Image.Image:
    """Draw a scene.

    Returns:
        An RGB ``PIL.Image`` of ``(scene.width, scene.height)`` pixels.
    """
    noise_rng = np.random.default_rng(scene.texture_seed)
    pixels = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    pixels[:] = scene.background
    if scene.texture > 0:
        pixels += noise_rng.normal(0.0, scene.texture, (scene.height, scene.width, 1)).astype(np.float32)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        alpha = _mask(obj)[..., None]
        region = pixels[y0:y1, x0:x1]
        region[:] = (1 - alpha) * region + alpha * np.asarray(obj.rgb, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def random_style(scene: Scene, rng: np.random.Generator, *, subset: bool = False) -> CaptionStyle:
    """Draw the template choices for a caption of ``scene``.

    Args:
        scene: the scene to describe.
        rng: the source of randomness.
        subset: name a random non-empty subset of the objects (phrase-level captions) instead
            of all of them.

    Returns:
        A :class:`CaptionStyle` for :func:`describe`.
    """
    n = len(scene.objects)
    order = tuple(int(i) for i in rng.permutation(n))
    if subset:
        order = order[: int(rng.integers(1, n + 1))]
    return CaptionStyle(
        order=order,
        size_words=tuple(bool(rng.random() < 0.3) for _ in order),
        prefix=str(rng.choice(_PREFIXES)),
        articles=bool(rng.random() < 0.8),
        link=str(rng.choice(_PAIR_LINKS)),
        oxford_comma=bool(rng.random() < 0.5),
    )


def describe(scene: Scene, style: CaptionStyle) -> SceneCaption:
    """The caption of ``scene`` in ``style``, with the span of every phrase; it ends with a full stop.

    Returns:
        A :class:`SceneCaption`; ``text[p.start:p.end]`` is "[size ]colour shape" for each phrase.

    Raises:
        IndexError: ``style.order`` names an object the scene does not have.
    """
    text = style.prefix
    phrases = []
    count = len(style.order)
    for position, (index, sized) in enumerate(zip(style.order, style.size_words)):
        if position > 0:
            if count == 2:
                text += style.link
            elif position == count - 1:
                text += ", and " if style.oxford_comma else " and "
            else:
                text += ", "
        obj = scene.objects[index]
        words = f"{obj.size} {obj.colour} {obj.shape}" if sized else f"{obj.colour} {obj.shape}"
        if style.articles:
            text += "an " if words[0] in "aeiou" else "a "
        phrases.append(Phrase(index, len(text), len(text) + len(words)))
        text += words
    return SceneCaption(text + ".", tuple(phrases))


def colour_swapped(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with the colours of two objects exchanged: its caption is false for ``scene``.

    The two objects have different colours and different shapes, and neither new (colour,
    shape) pair is already in the scene: the twin's pairs stay distinct and differ from the
    original's, so no caption naming all objects is true of both. Layout, sizes and
    background stay the same.

    Returns:
        The twin :class:`Scene`, or None when no such pair exists (e.g. a single object).
    """
    objects = scene.objects
    original = {(o.colour, o.shape) for o in objects}
    pairs = [
        (i, j)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
        if objects[i].colour != objects[j].colour
        and objects[i].shape != objects[j].shape
        and not {(objects[j].colour, objects[i].shape), (objects[i].colour, objects[j].shape)} & original
    ]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    swapped = list(objects)
    swapped[i] = dataclasses.replace(objects[i], colour=objects[j].colour, rgb=objects[j].rgb)
    swapped[j] = dataclasses.replace(objects[j], colour=objects[i].colour, rgb=objects[i].rgb)
    return dataclasses.replace(scene, objects=tuple(swapped))
