"""Generated monitoring traffic with known faults, and the ``shapes-traffic`` command.

``shapes-traffic OUT --count 300 --seed 7 --wrong-colour 0.3`` writes ``OUT/sample.jsonl``, the
traffic sample ``explain-monitor`` reads (one record per line: ``id``, ``image`` (a path
relative to ``OUT``), ``caption``, ``timestamp`` (ISO 8601, UTC, spread over one day, in
order), ``segment``) and ``OUT/images/``. Every record is a new scene, rendered with
:func:`~explain_server.shapes.scenes.render` and then scaled to a side of 96 to 400 pixels,
some padded with background to a non-square frame (the model sees the centre crop, which is
then the scene), and saved as PNG, JPEG or WebP: real-looking traffic that never repeats.

A baseline caption names every object of its scene (:func:`random_style` without subset).
Two faults, each drawn per record with its probability:

- *wrong colour*: the caption names one object with a colour that no object of that shape in
  the scene has, so the caption is false for the image;
- *distractor*: the scene carries one more object that the caption does not name (the named
  objects follow the baseline's count, so the captions keep the baseline's lengths).

Ground-truth columns, prefixed ``truth_``, say what was done: ``truth_wrong_colour`` (the
wrong colour word, or null), ``truth_true_colour`` (the colour it replaced), ``truth_distractor``
(the unnamed object's "colour shape", or null), ``truth_distractor_box`` (its box in the saved
image's pixels, x0 y0 x1 y1, or null), ``truth_objects`` (every object, "size colour shape"),
``truth_boxes`` (their boxes, as ``truth_distractor_box``),
``truth_format`` and ``truth_size`` ([width, height]).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import pathlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from explain_api.version import add_version_argument

from .. import DISTRIBUTION
from .scenes import COLOURS, Scene, describe, generate_scene, random_style, render

FORMATS = ("PNG", "JPEG", "WEBP")
"""Image formats the traffic uses, drawn uniformly per record."""

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
SIDES = (96, 400)
"""Inclusive range of the saved image's shorter side, pixels."""

_NON_SQUARE = 0.35  # share of images padded to a non-square frame
_PAD_RATIO = (1.15, 1.6)  # longer side / shorter side of a padded frame
_START = datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC)
_DAY_SECONDS = 24 * 3600
DEFAULT_SEGMENTS = ("web", "mobile", "partner")


@dataclass(frozen=True)
class TrafficRecord:
    """One record of a traffic sample, before its image is written.

    Attributes:
        id: unique within the sample.
        image: the picture as it is saved (scaled and maybe padded).
        format: one of :data:`FORMATS`.
        caption: the caption sent with it.
        timestamp: ISO 8601, UTC.
        segment: the traffic segment.
        scene: the scene drawn (96 px canvas), objects included the distractor.
        wrong_colour: the colour word the caption names wrongly, or None.
        true_colour: the object's real colour when ``wrong_colour`` is set, else None.
        distractor: index in ``scene.objects`` of the object the caption leaves out, or None.
        boxes: per object of ``scene``, its box in ``image`` pixels (x0, y0, x1, y1).
    """

    id: str
    image: Image.Image
    format: str
    caption: str
    timestamp: str
    segment: str
    scene: Scene
    wrong_colour: str | None
    true_colour: str | None
    distractor: int | None
    boxes: tuple[tuple[int, int, int, int], ...]


def _frame(picture: Image.Image, scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, float, int, int]:
    """Scale the square render to a random side, sometimes padding it to a non-square frame.

    Returns:
        The framed image, the scale applied to scene pixels, and the scene's (x, y) offset in it.
    """
    side = int(rng.integers(SIDES[0], SIDES[1] + 1))
    scaled = picture.resize((side, side), Image.Resampling.BICUBIC) if side != picture.width else picture
    if rng.random() >= _NON_SQUARE:
        return scaled, side / picture.width, 0, 0
    longer = int(round(side * rng.uniform(*_PAD_RATIO)))
    wide = bool(rng.random() < 0.5)
    size = (longer, side) if wide else (side, longer)
    # centred, so that the model's centre crop is the scene itself
    offset = (longer - side) // 2
    framed = Image.new("RGB", size, scene.background)
    x, y = (offset, 0) if wide else (0, offset)
    framed.paste(scaled, (x, y))
    return framed, side / picture.width, x, y


def _wrong_colour(scene: Scene, named: Sequence[int], rng: np.random.Generator) -> tuple[Scene, int, str] | None:
    """A copy of ``scene`` in which one named object carries a colour no object of its shape has.

    Returns:
        (the relabelled scene to describe, the object's index, the wrong colour), or None when
        no named object can take a wrong colour (never with six colours and at most five objects
        of a shape in a scene of up to five objects).
    """
    for index in rng.permutation(np.asarray(named)):
        obj = scene.objects[int(index)]
        used = {o.colour for o in scene.objects if o.shape == obj.shape}
        free = [c for c in COLOURS if c not in used]
        if free:
            colour = str(rng.choice(free))
            objects = list(scene.objects)
            objects[int(index)] = dataclasses.replace(obj, colour=colour)
            return dataclasses.replace(scene, objects=tuple(objects)), int(index), colour
    return None


def _timestamps(rng: np.random.Generator, count: int) -> list[str]:
    seconds = np.sort(rng.uniform(0, _DAY_SECONDS, count))
    return [
        (_START + datetime.timedelta(seconds=float(s))).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for s in seconds
    ]


def generate_traffic(
    seed: int,
    count: int,
    *,
    wrong_colour: float = 0.0,
    distractor: float = 0.0,
    segments: Sequence[str] = DEFAULT_SEGMENTS,
    n_objects: tuple[int, int] = (2, 4),
) -> Iterator[TrafficRecord]:
    """``count`` traffic records, a pure function of the arguments.

    Args:
        seed: seeds one ``numpy.random.Generator`` for the whole sample.
        count: how many records, >= 0.
        wrong_colour: probability in [0, 1] that a record's caption names one object's colour wrongly.
        distractor: probability in [0, 1] that a record's image carries an object its caption does not name.
        segments: the segment names, drawn uniformly per record (at least one).
        n_objects: inclusive (fewest, most) objects the caption names.

    Raises:
        ValueError: a probability outside [0, 1], a negative count, no segments, or a bad object range.
    """
    for name, value in (("wrong_colour", wrong_colour), ("distractor", distractor)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1]; got {value}")
    if count < 0:
        raise ValueError(f"count must be >= 0; got {count}")
    if not segments or not all(segments):
        raise ValueError(f"segments must be one or more non-empty names; got {list(segments)}")
    low, high = n_objects
    if not 1 <= low <= high <= 4:
        raise ValueError(f"n_objects must satisfy 1 <= fewest <= most <= 4; got {n_objects}")
    rng = np.random.default_rng(seed)
    stamps = _timestamps(rng, count)
    for index in range(count):
        named_count = int(rng.integers(low, high + 1))
        has_distractor = bool(rng.random() < distractor)
        has_wrong = bool(rng.random() < wrong_colour)
        scene = generate_scene(rng, n_objects=named_count + has_distractor)
        style = random_style(scene, rng)
        left_out = int(rng.integers(len(scene.objects))) if has_distractor else None
        if left_out is not None:
            keep = [i for i, obj in enumerate(style.order) if obj != left_out]
            style = dataclasses.replace(
                style,
                order=tuple(style.order[i] for i in keep),
                size_words=tuple(style.size_words[i] for i in keep),
            )
        described, wrong, true = scene, None, None
        if has_wrong:
            relabelled = _wrong_colour(scene, style.order, rng)
            if relabelled is not None:
                described, changed, wrong = relabelled
                true = scene.objects[changed].colour
        caption = describe(described, style).text
        image, scale, dx, dy = _frame(render(scene), scene, rng)
        boxes = tuple(
            (
                dx + int(np.floor(o.box[0] * scale)),
                dy + int(np.floor(o.box[1] * scale)),
                dx + int(np.ceil(o.box[2] * scale)),
                dy + int(np.ceil(o.box[3] * scale)),
            )
            for o in scene.objects
        )
        yield TrafficRecord(
            id=f"{seed}-{index:05d}",
            image=image,
            format=FORMATS[int(rng.integers(len(FORMATS)))],
            caption=caption,
            timestamp=stamps[index],
            segment=str(segments[int(rng.integers(len(segments)))]),
            scene=scene,
            wrong_colour=wrong,
            true_colour=true,
            distractor=left_out,
            boxes=boxes,
        )


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "PNG":
        image.save(out, format=fmt, optimize=True)
    else:
        image.save(out, format=fmt, quality=quality)
    return out.getvalue()


def record_row(record: TrafficRecord, image: str) -> dict:
    """The JSONL row of ``record`` whose image is saved at ``image`` (relative path)."""
    scene = record.scene
    distractor = None if record.distractor is None else scene.objects[record.distractor]
    return {
        "id": record.id,
        "image": image,
        "caption": record.caption,
        "timestamp": record.timestamp,
        "segment": record.segment,
        "truth_wrong_colour": record.wrong_colour,
        "truth_true_colour": record.true_colour,
        "truth_distractor": None if distractor is None else f"{distractor.colour} {distractor.shape}",
        "truth_distractor_box": None if record.distractor is None else list(record.boxes[record.distractor]),
        "truth_objects": [f"{o.size} {o.colour} {o.shape}" for o in scene.objects],
        "truth_boxes": [list(box) for box in record.boxes],
        "truth_format": record.format,
        "truth_size": [record.image.width, record.image.height],
    }


def write_traffic(
    out: pathlib.Path,
    *,
    seed: int,
    count: int,
    wrong_colour: float = 0.0,
    distractor: float = 0.0,
    segments: Sequence[str] = DEFAULT_SEGMENTS,
) -> pathlib.Path:
    """Write ``count`` records to ``out/sample.jsonl`` and their images to ``out/images/``.

    Args and Raises: as :func:`generate_traffic`; OSError when ``out`` cannot be written.

    Returns:
        The JSONL file's path.
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    # JPEG/WebP quality drawn from its own stream, so that it leaves the records' draws alone
    quality = np.random.default_rng([seed, 1])
    path = out / "sample.jsonl"
    with path.open("w", encoding="utf-8") as sink:
        for record in generate_traffic(
            seed, count, wrong_colour=wrong_colour, distractor=distractor, segments=segments
        ):
            file = f"images/{record.id}.{_EXTENSIONS[record.format]}"
            (out / file).write_bytes(_encode(record.image, record.format, int(quality.integers(80, 96))))
            sink.write(json.dumps(record_row(record, file)) + "\n")
    return path


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1]; got {text}")
    return value


def _segments(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated non-empty names; got {text!r}")
    return names


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``shapes-traffic``: write a generated traffic sample; returns 0."""
    parser = argparse.ArgumentParser(prog="shapes-traffic", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="output folder (sample.jsonl and images/)")
    parser.add_argument("--count", type=_count, default=300, help="records (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--wrong-colour",
        type=_probability,
        default=0.0,
        metavar="FRACTION",
        help="share of captions naming one object's colour wrongly (default: %(default)s)",
    )
    parser.add_argument(
        "--distractor",
        type=_probability,
        default=0.0,
        metavar="FRACTION",
        help="share of images with an object the caption does not name (default: %(default)s)",
    )
    parser.add_argument(
        "--segments",
        type=_segments,
        default=DEFAULT_SEGMENTS,
        metavar="A,B,...",
        help=f"segment names, drawn uniformly (default: {','.join(DEFAULT_SEGMENTS)})",
    )
    add_version_argument(parser, DISTRIBUTION)
    args = parser.parse_args(argv)
    path = write_traffic(
        args.out,
        seed=args.seed,
        count=args.count,
        wrong_colour=args.wrong_colour,
        distractor=args.distractor,
        segments=args.segments,
    )
    print(f"wrote {args.count} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
