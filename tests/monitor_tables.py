"""Summary tables in the schema of ``explain-monitor`` for the compare tests: synthetic ones, and
real ones from explanations the shipped shapes model gives through a running server."""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from explain_api import explain_pb2, explain_pb2_grpc
from explain_client.client import ExplainClient, explain_request
from explain_client.monitor.rows import summary_row
from explain_client.monitor.sample import Record
from explain_client.monitor.schema import SCHEMA, word_key
from explain_server.shapes import scenes

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def synthetic_table(
    n: int = 300,
    seed: int = 0,
    *,
    score_shift: float = 0.0,
    wrong_colour: float = 0.0,
    diffuse: float = 0.0,
    segments: Sequence[str | None] = (None,),
    nan_share: float = 0.0,
) -> pa.Table:
    """``n`` records "a COLOUR SHAPE." whose signals are drawn from fixed normal distributions.

    Args:
        score_shift: added to every score's mean.
        wrong_colour: the share of records whose colour word is ungrounded (relevance -0.03 and
            concentration 0.12 instead of +0.05 and 0.4), as a caption naming a wrong colour.
        diffuse: the share of records whose shape word is grounded less sharply (concentration
            0.3 instead of 0.45, relevance unchanged), as an image with an unnamed distractor.
        segments: record i gets ``segments[i % len(segments)]``.
        nan_share: the share of records whose mean_concentration is NaN (a record without words).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        colour, shape = str(rng.choice(COLOURS)), str(rng.choice(SHAPES))
        wrong = rng.random() < wrong_colour
        spread = rng.random() < diffuse
        words = []
        for text, start, relevance, concentration in (
            ("a", 0, 0.01, 0.15),
            (colour, 2, -0.03 if wrong else 0.05, 0.12 if wrong else 0.4),
            (shape, 3 + len(colour), 0.08, 0.3 if spread else 0.45),
        ):
            value = relevance + rng.normal(0, 0.01)
            words.append(
                {
                    "text": text,
                    "key": word_key(text),
                    "start": start,
                    "end": start + len(text),
                    "relevance": value,
                    "concentration": float(np.clip(rng.normal(concentration, 0.04), 0.0, 1.0)),
                    "peak_row": int(rng.integers(3)),
                    "peak_column": int(rng.integers(3)),
                    "peak_value": value / 4,
                }
            )
        score = float(rng.normal(0.3 + score_shift, 0.05))
        mean_concentration = float(np.mean([w["concentration"] for w in words]))
        rows.append(
            {
                "record_id": f"{seed}-{i}",
                "segment": segments[i % len(segments)],
                "caption": f"a {colour} {shape}.",
                "image": f"scene-{i}.png",
                "model": "shapes",
                "request_id": f"{seed}-{i}",
                "score": score,
                "logit": score * 100,
                "convergence_delta_abs": abs(float(rng.normal(0, 1e-3))),
                "interaction_total": score * 0.8,
                "interaction_share": float(rng.normal(0.8, 0.05)),
                "positive_interaction": float(rng.normal(0.3, 0.05)),
                "negative_interaction": float(rng.normal(-0.1, 0.02)),
                "mean_concentration": float("nan") if rng.random() < nan_share else mean_concentration,
                "grid_height": 3,
                "grid_width": 3,
                "words": words,
                "top_interactions": [],
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def explained_table(
    client: ExplainClient, folder: pathlib.Path, seed: int, n: int, *, wrong_colour: float = 0.0
) -> pa.Table:
    """``n`` generated scenes (``seed``) saved as PNGs in ``folder`` and explained with
    DETAIL_SUMMARY through ``client``, one row each; ``wrong_colour`` of the captions name a wrong
    colour for their first object. Image paths in the table are relative to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stub = explain_pb2_grpc.ExplainStub(client.channel)
    rows = []
    for i in range(n):
        scene = scenes.generate_scene(rng)
        caption = scenes.describe(scene, scenes.random_style(scene, rng))
        text = caption.text
        if rng.random() < wrong_colour:
            phrase = caption.phrases[0]
            colour = scene.objects[phrase.object_index].colour
            others = [c for c in scenes.COLOURS if c != colour]
            named = text[phrase.start : phrase.end].replace(colour, others[int(rng.integers(len(others)))], 1)
            text = text[: phrase.start] + named + text[phrase.end :]
        name = f"scene-{seed}-{i:04d}.png"
        scenes.render(scene).save(folder / name)
        image = (folder / name).read_bytes()
        request = explain_request(image, text)
        request.detail = explain_pb2.DETAIL_SUMMARY
        response = stub.Explain(request, timeout=120)
        record = Record(i, f"{seed}-{i}", text, name, image, None, f"{len(scene.objects)} objects")
        rows.append(summary_row(record, response, datetime.datetime.now(datetime.UTC)))
    return pa.Table.from_pylist(rows, schema=SCHEMA)
