"""Request inputs like production traffic, for load tests and benchmarks: every image and every
caption new, images photo-like in several sizes and formats, captions of varied length.

A server's factor cache answers repeated images and captions, so a load built from a fixed mix
measures the cache; production traffic hardly repeats. Images are random crops of real
photographs shipped with the package (public domain, see ``assets/README.md``), at random
scales and aspect ratios, some mirrored, with jittered brightness, contrast and saturation,
encoded as JPEG (random quality) or PNG. Captions are built from a
small vocabulary of photo descriptions. Everything is deterministic by seed.

Example::

    from explain_client.workload import distinct_requests

    for image, caption in distinct_requests(100, seed=1):
        ...  # 100 (encoded image bytes, caption) pairs, no image and no caption twice
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "FORMATS",
    "SIDES",
    "WORDS",
    "caption",
    "distinct_captions",
    "distinct_images",
    "distinct_requests",
    "load_photos",
    "photo_image",
]

SIDES = (64, 800)
"""Default range of image widths and heights, pixels (inclusive)."""
WORDS = (1, 30)
"""Default range of caption lengths, words (inclusive); 30 of these words fit CLIP's 77 tokens."""
FORMATS = ("JPEG", "PNG")
"""Default encodings, drawn with equal chances."""

_PHOTOS = ("chelsea.jpg", "grace_hopper.jpg")
_DETERMINERS = ("a", "the", "one", "two", "three", "some", "many", "his", "her", "their")
_ADJECTIVES = (
    "small",
    "large",
    "big",
    "little",
    "old",
    "young",
    "new",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "brown",
    "grey",
    "orange",
    "pink",
    "purple",
    "wooden",
    "bright",
    "dark",
    "sunny",
    "quiet",
    "busy",
    "empty",
    "tall",
    "tiny",
    "striped",
    "shiny",
    "wet",
    "happy",
    "sleepy",
    "round",
    "long",
    "short",
    "soft",
)
_NOUNS = (
    "cat",
    "dog",
    "woman",
    "man",
    "child",
    "bird",
    "horse",
    "car",
    "bus",
    "bike",
    "boat",
    "tree",
    "flower",
    "house",
    "street",
    "table",
    "chair",
    "sofa",
    "window",
    "door",
    "bed",
    "kitchen",
    "beach",
    "mountain",
    "river",
    "park",
    "field",
    "road",
    "city",
    "garden",
    "book",
    "cup",
    "plate",
    "bowl",
    "ball",
    "kite",
    "train",
    "bridge",
    "lamp",
    "wall",
    "fence",
    "sky",
    "sea",
    "lake",
    "forest",
    "hat",
    "shirt",
    "dress",
    "phone",
    "clock",
    "cake",
    "pizza",
    "apple",
    "sandwich",
    "umbrella",
    "bench",
    "sign",
    "uniform",
    "officer",
    "kitten",
)
_PREPOSITIONS = ("on", "in", "near", "under", "beside", "behind", "above", "with", "by", "at", "over", "inside")
_ENDINGS = (
    "sitting",
    "standing",
    "running",
    "sleeping",
    "walking",
    "lying",
    "playing",
    "eating",
    "waiting",
    "outside",
    "together",
    "alone",
    "today",
    "indoors",
)
# Phrases that may follow the subject, as the word lists each word is drawn from.
_PHRASES = (
    (_ENDINGS,),
    (_PREPOSITIONS, _NOUNS),
    (_PREPOSITIONS, _DETERMINERS, _NOUNS),
    (("and",), _DETERMINERS, _NOUNS),
    (_PREPOSITIONS, _DETERMINERS, _ADJECTIVES, _NOUNS),
)
# The subject, by its length in words.
_SUBJECTS = (
    (_NOUNS,),
    (_ADJECTIVES, _NOUNS),
    (_DETERMINERS, _ADJECTIVES, _NOUNS),
    (_DETERMINERS, _ADJECTIVES, _ADJECTIVES, _NOUNS),
)
_ASPECT = 2.0  # widths over heights range from 1/2 to 2, as photos do
_JITTER = 0.25  # brightness, contrast and saturation factors range over 1 +- this


def load_photos(paths: Iterable[str | os.PathLike] | None = None) -> list[Image.Image]:
    """Photographs to crop images from, as RGB images in display orientation.

    Args:
        paths: image files in any format Pillow reads; ``None`` = the photos shipped with the
            package (a cat and a portrait, public domain).

    Raises:
        OSError: a file that cannot be read or decoded.
    """
    if paths is None:
        assets = resources.files("explain_client") / "assets"
        encoded = [assets.joinpath(name).read_bytes() for name in _PHOTOS]
    else:
        encoded = [pathlib.Path(path).read_bytes() for path in paths]
    return [ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB") for data in encoded]


def photo_image(
    rng: np.random.Generator,
    photos: Sequence[Image.Image],
    *,
    sides: tuple[int, int] = SIDES,
    formats: Sequence[str] = FORMATS,
) -> bytes:
    """One photo-like encoded image: a random crop of one of ``photos``, resized, maybe mirrored,
    colour-jittered and encoded.

    Args:
        rng: the random source; the result depends only on its state and the arguments.
        photos: RGB images to crop from (:func:`load_photos`).
        sides: range of the width and of the height, pixels (inclusive); the aspect ratio stays
            within 1:2 to 2:1 where the range allows.
        formats: Pillow format names to draw from: ``"JPEG"`` (quality 60-95), ``"PNG"``, or any
            other format Pillow writes (at its defaults).

    Returns:
        Encoded image bytes.
    """
    photo = photos[int(rng.integers(len(photos)))]
    width = int(rng.integers(sides[0], sides[1] + 1))
    aspect = math.exp(rng.uniform(-math.log(_ASPECT), math.log(_ASPECT)))
    height = min(max(round(width / aspect), sides[0]), sides[1])
    # a crop of 10-100% of the photo's area with the output's aspect ratio, as in
    # torchvision's RandomResizedCrop; sub-pixel corners make every crop differ
    area = rng.uniform(0.1, 1.0) * photo.width * photo.height
    crop_w, crop_h = math.sqrt(area * width / height), math.sqrt(area * height / width)
    fit = min(1.0, photo.width / crop_w, photo.height / crop_h)
    crop_w, crop_h = crop_w * fit, crop_h * fit
    left, top = rng.uniform(0, photo.width - crop_w), rng.uniform(0, photo.height - crop_h)
    image = photo.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(1 - _JITTER, 1 + _JITTER))
    fmt = formats[int(rng.integers(len(formats)))]
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, "JPEG", quality=int(rng.integers(60, 96)))
    elif fmt == "PNG":
        # the fastest level: higher ones shrink photos by a few percent at several times the cost
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, fmt)
    return out.getvalue()


def caption(rng: np.random.Generator, words: int) -> str:
    """A photo description of exactly ``words`` words (at least 1), e.g. "a sleepy cat on the sofa".

    Each word is a single CLIP token, so up to 75 words fit CLIP's context of 77.
    """

    def draw(lists) -> list[str]:
        return [str(choices[int(rng.integers(len(choices)))]) for choices in lists]

    text = draw(_SUBJECTS[int(rng.integers(min(words, len(_SUBJECTS))))])
    while len(text) < words:
        fitting = [phrase for phrase in _PHRASES if len(phrase) <= words - len(text)]
        text += draw(fitting[int(rng.integers(len(fitting)))])
    return " ".join(text)


def distinct_images(
    seed: int = 0,
    *,
    sides: tuple[int, int] = SIDES,
    formats: Sequence[str] = FORMATS,
    photos: Sequence[Image.Image] | None = None,
) -> Iterator[bytes]:
    """Endless photo-like encoded images (:func:`photo_image`), deterministic by ``seed``.

    Images differ from each other: crop corners, scale and jitter are drawn from continuous
    ranges, so that a repeat is practically impossible.

    Args:
        seed: the random seed.
        sides, formats: as for :func:`photo_image`.
        photos: RGB images to crop from; ``None`` = :func:`load_photos`'s shipped photos.
    """
    rng = np.random.default_rng([seed, 0])
    photos = load_photos() if photos is None else photos
    while True:
        yield photo_image(rng, photos, sides=sides, formats=formats)


def distinct_captions(seed: int = 0, *, words: tuple[int, int] = WORDS) -> Iterator[str]:
    """Endless captions (:func:`caption`) of ``words`` words (inclusive range), never one twice,
    deterministic by ``seed``.

    There are only so many short captions: a caption drawn again is redrawn one word longer,
    within the range. Remembering what was produced costs about 150 bytes per caption.

    Raises:
        ValueError: ``words`` is not a range ``(low, high)`` with ``1 <= low <= high``, or ``high``
            is under 4: too few distinct captions are that short.
    """
    if not 1 <= words[0] <= words[1] or words[1] < 4:
        raise ValueError(
            f"words must be (low, high) with 1 <= low <= high and high >= 4 (too few shorter captions); got {words}"
        )
    rng = np.random.default_rng([seed, 1])
    seen: set[str] = set()
    while True:
        length = int(rng.integers(words[0], words[1] + 1))
        text = caption(rng, length)
        while text in seen:
            length = min(length + 1, words[1])
            text = caption(rng, length)
        seen.add(text)
        yield text


def distinct_requests(
    count: int | None = None,
    seed: int = 0,
    *,
    sides: tuple[int, int] = SIDES,
    words: tuple[int, int] = WORDS,
    formats: Sequence[str] = FORMATS,
    photos: Sequence[Image.Image] | None = None,
) -> Iterator[tuple[bytes, str]]:
    """(encoded image, caption) pairs, each with a new image (:func:`distinct_images`) and a
    caption not produced before (:func:`distinct_captions`).

    Args:
        count: pairs to produce; ``None`` = endless.
        seed: the random seed; the same seed gives the same pairs.
        sides, formats, photos: as for :func:`distinct_images`.
        words: as for :func:`distinct_captions`.
    """
    images = distinct_images(seed, sides=sides, formats=formats, photos=photos)
    pairs = zip(images, distinct_captions(seed, words=words))
    return pairs if count is None else itertools.islice(pairs, count)
