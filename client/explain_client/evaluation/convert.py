"""Converters from COCO and Flickr30k Entities annotations to the ``explain-eval`` dataset format.

``explain-eval-convert coco --instances instances_val2017.json --captions captions_val2017.json
--images val2017/ --out coco.json`` and ``explain-eval-convert flickr30k --sentences Sentences/
--annotations Annotations/ --images flickr30k-images/ [--ids test.txt] --out flickr.json``.

- COCO has boxes per object category but no phrase spans: a caption's phrase is the first
  whole-word mention of a category present in its image (its name, plural, or a synonym from
  :data:`COCO_SYNONYMS`), with the boxes of all that category's non-crowd instances; class =
  the category name. Captions that mention none are left out.
- Flickr30k Entities marks phrases in the sentence files (``[/EN#18/people A man]``) and boxes
  per entity in the XML files (1-based inclusive pixel indices, converted to the format's
  continuous coordinates); class = the phrase's first entity type. Phrases without boxes
  (scene, not visual) and captions without boxed phrases are left out.

Image paths are written relative to the output file's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from explain_api.grounding import FORMAT, save_dataset
from explain_api.version import add_version_argument

__all__ = ["COCO_SYNONYMS", "coco_dataset", "flickr30k_entities_dataset", "main", "parse_flickr30k_sentence"]

COCO_SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "person": (
        "man",
        "men",
        "woman",
        "women",
        "people",
        "boy",
        "boys",
        "girl",
        "girls",
        "child",
        "children",
        "kid",
        "kids",
        "guy",
        "guys",
        "lady",
        "ladies",
        "player",
        "players",
        "skier",
        "surfer",
        "skateboarder",
    ),
    "dining table": ("table",),
    "couch": ("sofa",),
    "tv": ("television",),
    "motorcycle": ("motorbike",),
    "airplane": ("plane", "jet"),
    "cell phone": ("phone", "cellphone"),
    "sports ball": ("ball",),
    "potted plant": ("plant",),
    "hot dog": ("hotdog",),
    "wine glass": ("glass",),
}
"""COCO category -> extra words that mention it (the name and its plural always count)."""


def _relative(path: pathlib.Path, out: pathlib.Path) -> str:
    return os.path.relpath(path.resolve(), out.resolve().parent)


def _mention(text: str, words: Iterable[str]) -> tuple[int, int] | None:
    """The first whole-word, case-insensitive occurrence of any of ``words`` (or its plural)."""
    best = None
    for word in words:
        match = re.search(rf"\b{re.escape(word)}(?:s|es)?\b", text, flags=re.IGNORECASE)
        if match and (best is None or match.start() < best[0]):
            best = match.span()
    return best


def coco_dataset(
    instances: Mapping,
    captions: Mapping,
    images_dir: pathlib.Path,
    out: pathlib.Path,
    synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS,
) -> dict:
    """Build a dataset from COCO ``instances_*.json`` and ``captions_*.json`` (decoded).

    Args:
        instances: the instances file: ``images``, ``annotations`` (``image_id``,
            ``category_id``, ``bbox`` [x, y, w, h], ``iscrowd``) and ``categories``.
        captions: the captions file: ``annotations`` (``image_id``, ``caption``).
        images_dir: folder of the images (``file_name``).
        out: where the dataset will be written (paths are made relative to its folder).
        synonyms: extra words per category name.

    Returns:
        The dataset dict (see :mod:`explain_api.grounding`); images without any
        usable caption are left out.
    """
    names = {c["id"]: c["name"] for c in instances["categories"]}
    boxes: dict[int, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        if not ann.get("iscrowd") and w > 0 and h > 0:
            boxes[ann["image_id"]][names[ann["category_id"]]].append([x, y, x + w, y + h])
    entries = []
    used: set[int] = set()
    for ann in captions["annotations"]:
        text = ann["caption"].strip()
        phrases = []
        for category, category_boxes in sorted(boxes.get(ann["image_id"], {}).items()):
            span = _mention(text, (category, *synonyms.get(category, ())))
            if span is not None:
                phrases.append({"start": span[0], "end": span[1], "class": category, "boxes": category_boxes})
        if phrases:
            phrases.sort(key=lambda p: p["start"])
            entries.append({"image_id": str(ann["image_id"]), "text": text, "phrases": phrases})
            used.add(ann["image_id"])
    images = [
        {
            "id": str(im["id"]),
            "file": _relative(images_dir / im["file_name"], out),
            "width": im["width"],
            "height": im["height"],
        }
        for im in instances["images"]
        if im["id"] in used
    ]
    return {"format": FORMAT, "name": "COCO", "images": images, "captions": entries}


def parse_flickr30k_sentence(line: str) -> tuple[str, list[tuple[int, int, str, str]]]:
    """One line of a Flickr30k Entities sentence file.

    Args:
        line: e.g. ``"[/EN#18/people A man] with [/EN#19/clothing pierced ears] ."``.

    Returns:
        The plain sentence (words joined by single spaces) and its phrases as
        ``(start, end, entity_id, first_type)`` character spans.
    """
    words: list[str] = []
    phrases = []
    current = None  # (first word index, entity id, type) of the open phrase
    for token in line.split():
        if current is None and token.startswith("[/EN#"):
            parts = token.split("/")
            current = (len(words), parts[1][3:], parts[2])
            continue
        closing = current is not None and token.endswith("]")
        words.append(token[:-1] if closing else token)
        if closing:
            first, entity, kind = current
            start = len(" ".join(words[:first])) + (1 if first else 0)
            phrases.append((start, len(" ".join(words)), entity, kind))
            current = None
    return " ".join(words), phrases


def _flickr30k_boxes(xml_path: pathlib.Path) -> tuple[int, int, dict[str, list[list[float]]]]:
    root = ET.parse(xml_path).getroot()
    width, height = int(root.find("size/width").text), int(root.find("size/height").text)
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        # 1-based inclusive pixel indices -> continuous [x0, x1) coordinates
        x0, y0, x1, y1 = (int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.findall("name"):
            boxes[name.text].append([x0 - 1, y0 - 1, x1, y1])
    return width, height, boxes


def flickr30k_entities_dataset(
    sentences_dir: pathlib.Path,
    annotations_dir: pathlib.Path,
    images_dir: pathlib.Path,
    out: pathlib.Path,
    ids: Sequence[str] | None = None,
) -> dict:
    """Build a dataset from Flickr30k Entities ``Sentences/*.txt`` and ``Annotations/*.xml``.

    Args:
        sentences_dir, annotations_dir: the two annotation folders.
        images_dir: folder of ``<id>.jpg``.
        out: where the dataset will be written (paths are made relative to its folder).
        ids: image ids to convert (e.g. the lines of test.txt); None = every sentence file.

    Returns:
        The dataset dict.

    Raises:
        OSError: a sentence or annotation file cannot be read.
    """
    ids = list(ids) if ids is not None else sorted(p.stem for p in sentences_dir.glob("*.txt"))
    images, entries = [], []
    for image_id in ids:
        width, height, boxes = _flickr30k_boxes(annotations_dir / f"{image_id}.xml")
        found = False
        for line in (sentences_dir / f"{image_id}.txt").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            text, spans = parse_flickr30k_sentence(line)
            phrases = [
                {"start": s, "end": e, "class": kind, "boxes": boxes[entity]}
                for s, e, entity, kind in spans
                if boxes.get(entity)
            ]
            if phrases:
                entries.append({"image_id": image_id, "text": text, "phrases": phrases})
                found = True
        if found:
            images.append(
                {
                    "id": image_id,
                    "file": _relative(images_dir / f"{image_id}.jpg", out),
                    "width": width,
                    "height": height,
                }
            )
    return {"format": FORMAT, "name": "Flickr30k Entities", "images": images, "captions": entries}


def main(argv: Sequence[str] | None = None) -> int:
    """``explain-eval-convert``: write a COCO or Flickr30k Entities dataset; returns 0, or 1 on bad input."""
    parser = argparse.ArgumentParser(prog="explain-eval-convert", description=__doc__.splitlines()[0])
    add_version_argument(parser)
    kinds = parser.add_subparsers(dest="kind", required=True)
    coco = kinds.add_parser("coco", help="COCO instances + captions")
    coco.add_argument("--instances", type=pathlib.Path, required=True, help="instances_*.json")
    coco.add_argument("--captions", type=pathlib.Path, required=True, help="captions_*.json")
    flickr = kinds.add_parser("flickr30k", help="Flickr30k Entities")
    flickr.add_argument("--sentences", type=pathlib.Path, required=True, help="the Sentences folder")
    flickr.add_argument("--annotations", type=pathlib.Path, required=True, help="the Annotations folder")
    flickr.add_argument("--ids", type=pathlib.Path, help="file of image ids, one a line (e.g. test.txt)")
    for sub in (coco, flickr):
        sub.add_argument("--images", type=pathlib.Path, required=True, help="folder of the images")
        sub.add_argument("--out", type=pathlib.Path, required=True, help="dataset JSON to write")
    args = parser.parse_args(argv)
    try:
        if args.kind == "coco":
            data = coco_dataset(
                json.loads(args.instances.read_text()), json.loads(args.captions.read_text()), args.images, args.out
            )
        else:
            ids = args.ids.read_text().split() if args.ids else None
            data = flickr30k_entities_dataset(args.sentences, args.annotations, args.images, args.out, ids)
        save_dataset(data, args.out)
    except (OSError, ValueError, KeyError, ET.ParseError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(data['captions'])} captions of {len(data['images'])} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
