"""Generated scenes as an ``explain-eval`` grounding dataset, and the ``shapes-scenes`` command.

``shapes-scenes OUT --count 500 --seed 7`` writes ``OUT/dataset.json`` (format
``explain-eval-grounding/1``, see :mod:`explain_api.grounding`) and
``OUT/images/NNNNN.png``: one caption per scene naming every object, each phrase's class its
shape and its box the object's box.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from explain_api.grounding import FORMAT, save_dataset
from explain_api.version import add_version_argument

from .. import DISTRIBUTION
from .scenes import DEFAULT_CANVAS, Scene, SceneCaption, describe, generate_scene, random_style, render


def scenes_with_captions(
    seed: int, count: int, *, n_objects: tuple[int, int] = (2, 4), size: int = DEFAULT_CANVAS
) -> Iterator[tuple[Scene, SceneCaption]]:
    """``count`` scenes and their captions, a pure function of the arguments.

    Args:
        seed: seeds one ``numpy.random.Generator`` for the whole sequence.
        count: how many scenes.
        n_objects: inclusive (fewest, most) objects per scene.
        size: canvas side, pixels.
    """
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = generate_scene(rng, width=size, height=size, n_objects=n_objects)
        yield scene, describe(scene, random_style(scene, rng))


def dataset_entry(image_id: str, file: str, scene: Scene, caption: SceneCaption) -> tuple[dict, dict]:
    """The ``images`` and ``captions`` entries of one scene (phrase class = shape name)."""
    image = {"id": image_id, "file": file, "width": scene.width, "height": scene.height}
    phrases = [
        {
            "start": p.start,
            "end": p.end,
            "class": scene.objects[p.object_index].shape,
            "boxes": [list(scene.objects[p.object_index].box)],
        }
        for p in caption.phrases
    ]
    return image, {"image_id": image_id, "text": caption.text, "phrases": phrases}


def write_dataset(
    out: pathlib.Path,
    *,
    seed: int,
    count: int,
    n_objects: tuple[int, int] = (2, 4),
    size: int = DEFAULT_CANVAS,
    name: str | None = None,
) -> pathlib.Path:
    """Render ``count`` scenes into ``out/images`` and write ``out/dataset.json``.

    Returns:
        The dataset file's path.

    Raises:
        OSError: ``out`` cannot be written.
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for index, (scene, caption) in enumerate(scenes_with_captions(seed, count, n_objects=n_objects, size=size)):
        file = f"images/{index:05d}.png"
        render(scene).save(out / file, optimize=True)
        image, entry = dataset_entry(f"{index:05d}", file, scene, caption)
        images.append(image)
        captions.append(entry)
    data = {
        "format": FORMAT,
        "name": name or f"shapes seed {seed}",
        "images": images,
        "captions": captions,
    }
    path = out / "dataset.json"
    save_dataset(data, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``shapes-scenes``: write generated scenes as a grounding dataset; returns 0."""
    parser = argparse.ArgumentParser(prog="shapes-scenes", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="output folder (dataset.json and images/)")
    parser.add_argument("--count", type=int, default=500, help="scenes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--objects",
        type=int,
        nargs=2,
        default=(2, 4),
        metavar=("FEWEST", "MOST"),
        help="objects per scene (default: 2 4)",
    )
    parser.add_argument("--size", type=int, default=DEFAULT_CANVAS, help="canvas side, pixels (default: %(default)s)")
    parser.add_argument("--name", help="dataset name shown in reports")
    add_version_argument(parser, DISTRIBUTION)
    args = parser.parse_args(argv)
    path = write_dataset(
        args.out, seed=args.seed, count=args.count, n_objects=tuple(args.objects), size=args.size, name=args.name
    )
    print(f"wrote {args.count} scenes to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
