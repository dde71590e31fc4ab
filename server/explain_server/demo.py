"""``make demo``: start a server on the shipped shapes model, explain a generated scene, stop.

Everything runs offline: the model's config and trained weights ship with the package
(``explain_server/assets/shapes``) and the scene is generated on the spot. For each object the
caption names, the demo prints the grid cell where the phrase's heatmap peaks and whether that
cell lies inside the object's box, and draws every phrase's overlay (heatmap, colour bar, crop box,
the object's box, peak cell and a legend) side by side into one PNG.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from explain_api.version import add_version_argument
from explain_client import ExplainClient
from explain_client.evaluation.scoring import phrase_rows, score_phrase
from explain_client.overlay import overlay_figure, side_by_side

from . import DISTRIBUTION
from .launcher import ServerProcess
from .shapes import model as shapes_model
from .shapes.dataset import scenes_with_captions
from .shapes.scenes import render


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
            panels.append(
                overlay_figure(
                    image,
                    explanation.heatmap((rows[0], rows[-1] + 1)),
                    explanation.crop_box,
                    title=text,
                    tokens=[explanation.tokens[row] for row in rows],
                    score=explanation.score,
                    peak=result.peak,
                    boxes=[("the object's box", box)],
                    note=f"peak cell {verdict} the object's box",
                )
            )
        sheet = side_by_side(panels)
        sheet.save(out)
        print(f"\n{hits} of {len(caption.phrases)} phrases point inside their object; overlays written to {out}")
        return 0
    finally:
        server.stop()
        print("server stopped")


if __name__ == "__main__":
    sys.exit(main())
