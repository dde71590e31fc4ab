"""Heatmap overlays of the report's most changed records: the summary table carries no heatmaps,
so these few records are explained again, in full, through the service."""

from __future__ import annotations

import base64
import io
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from explain_client.client import ExplainClient
from explain_client.errors import ExplainError
from explain_client.explanation import Explanation
from explain_client.images import load_image
from explain_client.overlay import overlay_figure

__all__ = ["MIN_SIDE", "explain_overlays", "resolve_image", "word_rows"]

MIN_SIDE = 400
"""``overlay_figure``'s ``min_size``: pixels on the long side of each overlay's image area."""


def resolve_image(image: str, root: str | os.PathLike) -> pathlib.Path:
    """The file a table's ``image`` column names: absolute as given, relative under ``root``."""
    path = pathlib.Path(image)
    return path if path.is_absolute() else pathlib.Path(root) / path


def word_rows(explanation: Explanation, start: int, end: int, text: str) -> list[int]:
    """The token rows of the caption characters [start, end): those whose span overlaps it, or,
    for a server that reports no token spans, the rows :meth:`Explanation.rows` matches ``text`` to."""
    rows = [r for r, (s, e) in enumerate(explanation.token_spans) if s < e and s < end and start < e]
    return rows or explanation.rows(text)


def _draw(picture: Image.Image, explanation: Explanation, rows: Sequence[int], word: str, note: str) -> Image.Image:
    """The overlay of the heatmap of ``rows``; the one call of the overlay renderer."""
    heat = explanation.attribution[list(rows)].sum(axis=0, dtype=np.float64)
    return overlay_figure(
        picture,
        heat,
        explanation.crop_box,
        title=word,
        tokens=[explanation.tokens[r] for r in rows],
        score=explanation.score,
        note=note,
        min_size=MIN_SIDE,
    )


def _png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def explain_overlays(
    records: Sequence[Mapping[str, Any]], target: str, images_root: str | os.PathLike, *, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Explain each record again (DETAIL_FULL) and draw the heatmap of its most deviating word.

    Args:
        records: :func:`words.changed_records`'s dicts.
        target: the service, HOST:PORT.
        images_root: the folder relative ``image`` paths are under.
        timeout: each call's deadline, seconds.

    Returns:
        Per record, ``{"record_id", "uri", "word", "error"}``: ``uri`` a PNG data URI, or None
        with ``error`` saying why (no image path, unreadable image, failed call).
    """
    out = []
    with ExplainClient(target, timeout=timeout) as client:
        for record in records:
            word = record["words"][record["word"]]
            entry: dict[str, Any] = {"record_id": record["record_id"], "uri": None, "word": word["text"], "error": None}
            out.append(entry)
            if record["image"] is None:
                entry["error"] = "the table has no image path for this record (inline image bytes)"
                continue
            path = resolve_image(record["image"], images_root)
            try:
                picture = load_image(path)
                explanation = client.explain(path.read_bytes(), record["caption"])
                rows = word_rows(explanation, word["start"], word["end"], word["text"])
                note = f"record {record['record_id']}: its most changed word"
                entry["uri"] = _png_uri(_draw(picture, explanation, rows, word["text"], note))
            except (OSError, ValueError, ExplainError) as err:
                entry["error"] = f"{type(err).__name__}: {err}"
    return out
