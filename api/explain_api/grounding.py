"""The grounding dataset format (``explain-eval-grounding/1``): ``explain-eval`` reads it;
``shapes-scenes`` and ``explain-eval-convert`` write it.

One JSON file; image paths are relative to the file's folder (or absolute)::

    {
      "format": "explain-eval-grounding/1",
      "name": "shapes-heldout",                       (optional, shown in reports)
      "images": [
        {"id": "s00000", "file": "images/s00000.png", "width": 96, "height": 96}
      ],
      "captions": [
        {"image_id": "s00000",
         "text": "a red circle and a small blue square",
         "phrases": [
           {"start": 2, "end": 12, "class": "circle", "boxes": [[10, 12, 34, 36]]},
           {"start": 19, "end": 36, "class": "square", "boxes": [[50, 40, 66, 56]]}
         ]}
      ]
    }

- ``start``/``end``: the phrase is ``text[start:end]`` (Python slice of Unicode code points).
- ``class``: the phrase's category for the per-class report (a shape name, a COCO category, a
  Flickr30k Entities type, ...).
- ``boxes``: one or more ``[x0, y0, x1, y1]`` in pixels of the image as stored (after EXIF
  orientation), continuous coordinates: the box covers ``x0 <= x < x1``, ``y0 <= y < y1``, so
  pixel column ``c`` spans ``[c, c + 1)``. A phrase whose entity has several boxes (e.g. "two
  dogs") is hit if any of them is.
- An image may have several captions, a caption several phrases.

This is the shape of COCO (images + annotations with boxes) and Flickr30k Entities (captions
with phrase spans and boxes per phrase); :mod:`explain_client.evaluation.convert` converts both.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FORMAT",
    "CaptionEntry",
    "Dataset",
    "DatasetError",
    "ImageEntry",
    "PhraseEntry",
    "load_dataset",
    "save_dataset",
]

FORMAT = "explain-eval-grounding/1"
"""The value of the file's ``format`` field."""

Box = tuple[float, float, float, float]


class DatasetError(ValueError):
    """The file breaks the format; the message names the entry (e.g. ``captions[3].phrases[0]``)."""


@dataclass(frozen=True)
class ImageEntry:
    """One image: ``path`` is resolved against the dataset file's folder; size in pixels."""

    id: str
    path: pathlib.Path
    width: int
    height: int


@dataclass(frozen=True)
class PhraseEntry:
    """One phrase: ``text[start:end]`` of its caption, its class and its boxes (pixels)."""

    start: int
    end: int
    label: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class CaptionEntry:
    """One caption of one image, with its phrases."""

    image_id: str
    text: str
    phrases: tuple[PhraseEntry, ...]


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: images by id, and the captions in file order."""

    name: str
    images: dict[str, ImageEntry]
    captions: tuple[CaptionEntry, ...]


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise DatasetError(f"{where}: {message}")


def _box(value, where: str, image: ImageEntry) -> Box:
    _require(isinstance(value, Sequence) and len(value) == 4, where, f"must be [x0, y0, x1, y1]; got {value!r}")
    _require(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value), where, "must be numbers")
    x0, y0, x1, y1 = (float(v) for v in value)
    _require(all(math.isfinite(v) for v in (x0, y0, x1, y1)), where, "must be finite")
    _require(x1 > x0 and y1 > y0, where, f"is empty: need x1 > x0 and y1 > y0; got {value!r}")
    _require(
        x0 < image.width and y0 < image.height and x1 > 0 and y1 > 0,
        where,
        f"{value!r} lies outside the {image.width}x{image.height} image",
    )
    return (x0, y0, x1, y1)


def parse_dataset(data: dict, root: pathlib.Path) -> Dataset:
    """Validate a decoded dataset and resolve image paths against ``root``.

    Raises:
        DatasetError: a missing or malformed field, an unknown image id, a duplicate image id,
            a phrase span outside its caption, or a box that is empty or outside its image.
    """
    _require(isinstance(data, dict), "dataset", "must be a JSON object")
    _require(data.get("format") == FORMAT, "format", f"must be {FORMAT!r}; got {data.get('format')!r}")
    images: dict[str, ImageEntry] = {}
    for i, item in enumerate(data.get("images", [])):
        where = f"images[{i}]"
        _require(
            isinstance(item, dict) and {"id", "file", "width", "height"} <= set(item),
            where,
            "needs id, file, width, height",
        )
        _require(
            isinstance(item["width"], int)
            and isinstance(item["height"], int)
            and min(item["width"], item["height"]) >= 1,
            where,
            "width and height must be positive integers",
        )
        image_id = str(item["id"])
        _require(image_id not in images, where, f"duplicate image id {image_id!r}")
        images[image_id] = ImageEntry(image_id, root / item["file"], item["width"], item["height"])
    captions = []
    for c, item in enumerate(data.get("captions", [])):
        where = f"captions[{c}]"
        _require(
            isinstance(item, dict) and {"image_id", "text", "phrases"} <= set(item),
            where,
            "needs image_id, text, phrases",
        )
        image = images.get(str(item["image_id"]))
        _require(image is not None, where, f"unknown image_id {item['image_id']!r}")
        text = item["text"]
        _require(isinstance(text, str) and text.strip() != "", where, "text must be a non-empty string")
        phrases = []
        for p, phrase in enumerate(item["phrases"]):
            at = f"{where}.phrases[{p}]"
            _require(
                isinstance(phrase, dict) and {"start", "end", "class", "boxes"} <= set(phrase),
                at,
                "needs start, end, class, boxes",
            )
            start, end = phrase["start"], phrase["end"]
            _require(
                isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text),
                at,
                f"span [{start}, {end}) is not within the caption's {len(text)} characters",
            )
            _require(text[start:end].strip() != "", at, "span is whitespace only")
            boxes = phrase["boxes"]
            _require(isinstance(boxes, list) and len(boxes) > 0, at, "needs at least one box")
            parsed = tuple(_box(b, f"{at}.boxes[{k}]", image) for k, b in enumerate(boxes))
            phrases.append(PhraseEntry(start, end, str(phrase["class"]), parsed))
        captions.append(CaptionEntry(image.id, text, tuple(phrases)))
    return Dataset(str(data.get("name", "")), images, tuple(captions))


def load_dataset(path: str | pathlib.Path) -> Dataset:
    """Read and validate a dataset file.

    Raises:
        OSError: the file cannot be read.
        DatasetError: not JSON, or breaks the format (see :func:`parse_dataset`).
    """
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not JSON: {err}") from err
    return parse_dataset(data, path.parent)


def save_dataset(data: dict, path: str | pathlib.Path) -> None:
    """Validate ``data`` (image files relative to ``path``'s folder) and write it as JSON.

    Raises:
        DatasetError: ``data`` breaks the format.
        OSError: the file cannot be written.
    """
    path = pathlib.Path(path)
    parse_dataset(data, path.parent)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
