"""Grounding scores of one explanation: pointing game, relevance mass, box to text.

Geometry is the client's own (:meth:`Explanation.token_scores` and the overlay): grid cell
``(i, j)`` covers ``x in [cx0 + j*cw, cx0 + (j+1)*cw)``, ``y in [cy0 + i*ch, cy0 + (i+1)*ch)``
of the response's crop box ``(cx0, cy0, cx1, cy1)`` in original-image pixels, with
``cw = (cx1 - cx0) / Gw`` and ``ch = (cy1 - cy0) / Gh``. Boxes are in original-image pixels.

- pointing game: the phrase heatmap's peak cell (first in row-major order on ties) is a hit
  when its centre lies inside one of the phrase's boxes;
- relevance mass: the heatmap's positive part inside the union of the boxes (each cell
  weighted by the fraction of its area the union covers) over its whole positive part
  (0 when the heatmap has no positive value);
- box to text: for each box, the content token (:attr:`Explanation.content_rows`: start, end
  and padding tokens excluded) with the highest :meth:`Explanation.token_scores` over the box
  is a hit when it lies in the phrase.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explain_client.explanation import Explanation

__all__ = ["AlignmentError", "PhraseScore", "cell_edges", "phrase_rows", "score_phrase", "union_coverage"]

Box = Sequence[float]


class AlignmentError(ValueError):
    """The decoded tokens do not spell out the caption, so character spans cannot be mapped to rows."""


def token_char_spans(explanation: Explanation, text: str) -> list[tuple[int, int]]:
    """Character range ``[a, b)`` of ``text`` that each of :attr:`Explanation.content_rows` spells.

    The server's ``token_spans`` when it reports them. Otherwise the labels are aligned with
    the text: the tokenizer lower-cases and collapses whitespace, so tokens are matched in
    order, case-insensitively, skipping whitespace and control characters in ``text`` (the
    service reads control characters as spaces).

    Returns:
        One (a, b) per content row, in row order.

    Raises:
        AlignmentError: without ``token_spans``, a token's label is not the next text of the
            caption (e.g. text the tokenizer rewrote, such as HTML entities or characters
            split across byte-level tokens).
    """
    if explanation.token_spans:
        return [explanation.token_spans[row] for row in explanation.content_rows]
    spans = []
    at = 0
    lowered = text.lower()
    for row in explanation.content_rows:
        label = "".join(explanation.tokens[row].split()).lower()
        while at < len(text) and (text[at].isspace() or unicodedata.category(text[at]) == "Cc"):
            at += 1
        if not label or lowered[at : at + len(label)] != label:
            raise AlignmentError(
                f"token {row} {explanation.tokens[row]!r} does not match the caption at character {at} "
                f"({text[at : at + 20]!r})"
            )
        spans.append((at, at + len(label)))
        at += len(label)
    return spans


def phrase_rows(explanation: Explanation, text: str, start: int, end: int) -> list[int]:
    """Token rows of the phrase ``text[start:end]``: every content row that overlaps it.

    Returns:
        Ascending row indices of ``explanation.attribution``.

    Raises:
        AlignmentError: the tokens do not spell out ``text`` (see :func:`token_char_spans`), or
            no token overlaps the span.
    """
    spans = token_char_spans(explanation, text)
    rows = [row for row, (a, b) in zip(explanation.content_rows, spans) if a < end and b > start]
    if not rows:
        raise AlignmentError(f"no token overlaps characters [{start}, {end}) of {text!r}")
    return rows


def cell_edges(explanation: Explanation) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell edges in original-image pixels: ``(xs (Gw + 1,), ys (Gh + 1,))``, float64."""
    gh, gw = explanation.grid
    cx0, cy0, cx1, cy1 = explanation.crop_box
    return np.linspace(cx0, cx1, gw + 1), np.linspace(cy0, cy1, gh + 1)


def union_coverage(xs: np.ndarray, ys: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """Fraction of each cell's area covered by the union of ``boxes`` (exact, overlaps once).

    Args:
        xs, ys: cell edges (Gw + 1,), (Gh + 1,), ascending, pixels.
        boxes: (x0, y0, x1, y1) each, pixels.

    Returns:
        float64 (Gh, Gw) in [0, 1].
    """
    # Cut the plane along every cell and box edge: each elementary rectangle is either inside
    # the union or not, and lies in exactly one cell.
    bx = np.array([b[0] for b in boxes] + [b[2] for b in boxes], dtype=np.float64)
    by = np.array([b[1] for b in boxes] + [b[3] for b in boxes], dtype=np.float64)
    ex = np.unique(np.concatenate([xs, np.clip(bx, xs[0], xs[-1])]))
    ey = np.unique(np.concatenate([ys, np.clip(by, ys[0], ys[-1])]))
    mx, my = (ex[:-1] + ex[1:]) / 2, (ey[:-1] + ey[1:]) / 2
    inside = np.zeros((len(my), len(mx)), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((my >= y0) & (my < y1))[:, None] & ((mx >= x0) & (mx < x1))[None, :]
    area = np.diff(ey)[:, None] * np.diff(ex)[None, :] * inside
    col = np.searchsorted(xs, mx, side="right") - 1
    row = np.searchsorted(ys, my, side="right") - 1
    covered = np.zeros((len(ys) - 1, len(xs) - 1))
    np.add.at(covered, (row[:, None], col[None, :]), area)
    return covered / (np.diff(ys)[:, None] * np.diff(xs)[None, :])


def _inside(x: float, y: float, box: Box) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@dataclass(frozen=True)
class PhraseScore:
    """The metrics of one phrase in one explanation.

    Attributes:
        rows: the phrase's token rows.
        peak: (row, col) grid cell where the phrase's heatmap peaks.
        pointing_hit: the peak cell's centre lies in one of the boxes.
        relevance_mass: positive heatmap mass inside the boxes / all positive mass, in [0, 1].
        box_hits: per box, whether its top-scoring content token lies in the phrase.
    """

    rows: tuple[int, ...]
    peak: tuple[int, int]
    pointing_hit: bool
    relevance_mass: float
    box_hits: tuple[bool, ...]


def score_phrase(explanation: Explanation, rows: Sequence[int], boxes: Sequence[Box]) -> PhraseScore:
    """Pointing game, relevance mass and box to text of one phrase.

    Args:
        explanation: the explanation of the phrase's caption and image.
        rows: the phrase's token rows, ascending and contiguous (e.g. from :func:`phrase_rows`).
        boxes: the phrase's boxes (x0, y0, x1, y1), original-image pixels; at least one.

    Returns:
        The :class:`PhraseScore`.

    Raises:
        ValueError: no boxes, or rows not contiguous or not all content rows.
    """
    if not boxes:
        raise ValueError("a phrase needs at least one box")
    rows = tuple(int(r) for r in rows)
    if not rows or rows != tuple(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"rows must be ascending and contiguous; got {rows}")
    content = explanation.content_rows
    if not set(rows) <= set(content):
        raise ValueError(f"rows {rows} are not all content rows {content}")
    heat = explanation.heatmap((rows[0], rows[-1] + 1))
    xs, ys = cell_edges(explanation)
    i, j = divmod(int(np.argmax(heat)), heat.shape[1])
    centre = ((xs[j] + xs[j + 1]) / 2, (ys[i] + ys[i + 1]) / 2)
    positive = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    total = positive.sum()
    mass = float((positive * union_coverage(xs, ys, boxes)).sum() / total) if total > 0 else 0.0
    box_hits = []
    for box in boxes:
        scores = explanation.token_scores(box)[content]
        box_hits.append(content[int(np.argmax(scores))] in rows)
    return PhraseScore(
        rows=rows,
        peak=(i, j),
        pointing_hit=any(_inside(*centre, box) for box in boxes),
        relevance_mass=mass,
        box_hits=tuple(box_hits),
    )
