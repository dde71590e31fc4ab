"""``make demo``: start a server on the shipped shapes model, explain a generated scene, stop.

Everything runs offline: the model's config and trained weights ship with the package
(``explain_server/assets/shapes``) and the scene is generated on the spot. For each object the
caption names, the demo prints the grid cell where the phrase's heatmap peaks and whether that
cell lies inside the object's box, and draws every phrase's heatmap, box and peak cell into one
PNG.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from PIL import Image, ImageDraw

from explain_api.version import add_version_argument
from explain_client import ExplainClient
from explain_client.evaluation.scoring import cell_edges, phrase_rows, score_phrase

from . import DISTRIBUTION
from .launcher import ServerProcess
from .shapes import model as shapes_model
from .shapes.dataset import scenes_with_captions
from .shapes.scenes import render

_ZOOM = 4  # the scene is 96 px: draw the panels four times larger


def _panel(explanation, image: Image.Image, rows: list[int], box, peak, title: str) -> Image.Image:
    """One phrase: its heatmap over the scene, its object's box (green) and its peak cell (black)."""
    overlay = explanation.overlay(image, (rows[0], rows[-1] + 1)).resize(
        (image.width * _ZOOM, image.height * _ZOOM), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(overlay)
    draw.rectangle([v * _ZOOM for v in box], outline=(0, 170, 0), width=3)
    xs, ys = cell_edges(explanation)
    i, j = peak
    draw.rectangle(
        [xs[j] * _ZOOM, ys[i] * _ZOOM, xs[j + 1] * _ZOOM - 1, ys[i + 1] * _ZOOM - 1], outline=(0, 0, 0), width=2
    )
    panel = Image.new("RGB", (overlay.width, overlay.height + 18), (255, 255, 255))
    panel.paste(overlay, (0, 18))
    ImageDraw.Draw(panel).text((4, 3), title, fill=(0, 0, 0))
    return panel


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 on success."""
    parser = argparse.ArgumentParser(prog="explain-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out/overlay.png", help="overlay PNG to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the generated scene (default: %(default)s)")
    add_version_argument(parser, DISTRIBUTION)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    scene, caption = next(scenes_with_captions(args.seed, 1, n_objects=(3, 3)))
    image = render(scene)
    scene_path = out.with_name("scene.png")
    image.save(scene_path)

    # the embedded default model; no metrics port, so the demo runs beside a server on 9090
    server = ServerProcess([], out.with_name("server.log"), metrics=False)
    print(
        f"starting explain-server on {server.target} with the embedded default model, {shapes_model.NAME} "
        f"({shapes_model.ARCHITECTURE}, trained on generated scenes; no download); its log: {server.log_path}"
    )
    try:
        server.wait_serving(timeout=600)
        with ExplainClient(server.target, timeout=600) as client:
            info = client.list_models()[0]
            print(f"server ready: {info.name} ({info.architecture}, grid {info.grid[0]}x{info.grid[1]})\n")
            print(f"explaining the generated scene {scene_path} (seed {args.seed}) with the caption {caption.text!r}")
            explanation = client.explain(image, caption.text)
        opts = explanation.options
        print(
            f"the model's default settings: text block {opts.text_layer}, image block {opts.image_layer}, "
            f"{opts.method} with {opts.n_steps} nodes"
        )
        print(f"score {explanation.score:.4f} (cosine); convergence delta {explanation.convergence_delta:.2e}\n")
        panels, hits = [], 0
        for phrase in caption.phrases:
            box = scene.objects[phrase.object_index].box
            rows = phrase_rows(explanation, caption.text, phrase.start, phrase.end)
            result = score_phrase(explanation, rows, [box])
            text = caption.text[phrase.start : phrase.end]
            verdict = "inside" if result.pointing_hit else "OUTSIDE"
            hits += result.pointing_hit
            print(
                f"  {text!r:24} tokens {rows[0]}-{rows[-1]}: heatmap peaks at cell {result.peak} -> {verdict} its box {box}"
            )
            panels.append(_panel(explanation, image, rows, box, result.peak, f"{text}: {verdict}"))
        sheet = Image.new(
            "RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), (255, 255, 255)
        )
        for k, panel in enumerate(panels):
            sheet.paste(panel, (k * (panel.width + 8), 0))
        sheet.save(out)
        print(
            f"\n{hits} of {len(caption.phrases)} phrases point inside their object; overlays written to {out} "
            "(green: the object's box, black: the peak cell)"
        )
        return 0
    finally:
        server.stop()
        print("server stopped")


if __name__ == "__main__":
    sys.exit(main())
