"""Monitoring summaries of an explanation (``ExplanationSummary`` in explain.proto).

The server computes them from the float32 tensors a response carries; the contract, with each
formula, is the proto's. numpy only, so that the thin client can recompute a summary from a
full response.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explain_api import explain_pb2

__all__ = [
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "Summary",
    "Word",
    "WordCell",
    "concentration_cells",
    "from_proto",
    "summarize",
    "to_proto",
    "words",
]

# ExplanationSummary: "Unset = 10", "in [0, 100]"
DEFAULT_TOP_K = 10
MAX_TOP_K = 100


@dataclass(frozen=True)
class Word:
    """A word of the caption (``WordSummary``): characters [start, end), token rows [first, end_token)."""

    text: str
    start: int
    end: int
    first_token: int
    end_token: int
    relevance: float
    peak_row: int
    peak_column: int
    peak_value: float
    concentration: float


@dataclass(frozen=True)
class WordCell:
    """One (word, grid cell) interaction (``WordCell``)."""

    word: int
    row: int
    column: int
    value: float


@dataclass(frozen=True)
class Summary:
    """``ExplanationSummary``."""

    interaction_share: float
    interaction_total: float
    positive_interaction: float
    negative_interaction: float
    words: tuple[Word, ...]
    top_interactions: tuple[WordCell, ...]
    grid_height: int
    grid_width: int


def _spells_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def words(
    caption: str,
    spans: Sequence[tuple[int, int]],
    labels: Sequence[str],
    padding: Sequence[bool],
) -> list[tuple[int, int, int, int]]:
    """The caption's words as (start, end, first_token, end_token), in caption order.

    Args:
        caption: the caption as sent.
        spans: per token row, the characters [start, end) it spells (rows holding parts of one
            character's bytes share its span); empty when the tokenizer
            reports none (then every non-padding row whose label has a letter or digit is a
            word, spanning the whole caption).
        labels: per token row, its label.
        padding: per token row, whether it is padding.
    """
    if not spans:
        return [
            (0, len(caption), row, row + 1)
            for row, (label, pad) in enumerate(zip(labels, padding))
            if not pad and _spells_word(label)
        ]
    found: list[tuple[int, int, int, int]] = []
    current: list[int] | None = None  # [start, end, first_token, end_token]
    for row, ((start, end), pad) in enumerate(zip(spans, padding)):
        if pad or start >= end or not _spells_word(caption[start:end]):
            if current is not None:
                found.append(tuple(current))
                current = None
            continue
        # spans that overlap belong to tokens holding parts of one character's bytes
        if current is not None and start <= current[1]:
            current[1], current[3] = max(current[1], end), row + 1
            continue
        if current is not None:
            found.append(tuple(current))
        current = [start, end, row, row + 1]
    if current is not None:
        found.append(tuple(current))
    return found


def concentration_cells(cells: int) -> int:
    """k = ceil(cells / 10): how many cells "the top 10%" of a grid of ``cells`` holds.

    In integers: ``math.ceil(0.1 * 30)`` is 4, as 0.1 * 30 rounds up to 3.0000000000000004.
    """
    return -(-cells // 10)


def _concentration(magnitudes: np.ndarray) -> float:
    total = float(magnitudes.sum())
    if total == 0.0:
        return 0.0
    k = concentration_cells(magnitudes.size)
    share = float(np.sort(magnitudes, axis=None)[-k:].sum()) / total
    # the two sums round differently; the contract's range holds exactly
    return min(1.0, max(k / magnitudes.size, share))


def summarize(
    grid: np.ndarray,
    prefix: np.ndarray,
    score: float,
    convergence_delta: float,
    caption: str,
    spans: Sequence[tuple[int, int]],
    labels: Sequence[str],
    padding: Sequence[bool],
    top_k: int = DEFAULT_TOP_K,
) -> Summary:
    """The summary of one explanation, accumulated in float64.

    Args:
        grid: the attribution, (T, Gh, Gw), as the response carries it.
        prefix: the prefix attribution, (T, P) (P may be 0).
        score, convergence_delta: the response's.
        caption, spans, labels, padding: the caption as sent and the response's token rows.
        top_k: how many (word, cell) pairs to keep, >= 0.

    Raises:
        ValueError: the tensors' or rows' shapes disagree, or ``top_k`` is negative.
    """
    grid = np.asarray(grid, dtype=np.float64)
    prefix = np.asarray(prefix, dtype=np.float64)
    if grid.ndim != 3 or prefix.ndim != 2 or prefix.shape[0] != grid.shape[0]:
        raise ValueError(f"attribution {grid.shape} and prefix attribution {prefix.shape} do not match")
    rows, gh, gw = grid.shape
    if len(labels) != rows or len(padding) != rows or (spans and len(spans) != rows):
        raise ValueError(f"{rows} attribution rows for {len(labels)} labels, {len(padding)} padding flags")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0; got {top_k}")
    entries = np.concatenate([grid.ravel(), prefix.ravel()])
    positive = float(entries[entries > 0].sum())
    negative = float(entries[entries < 0].sum())
    total = positive + negative
    denominator = score - convergence_delta
    share = total / denominator if denominator != 0.0 else math.nan

    summaries: list[Word] = []
    maps = []
    for start, end, first, end_token in words(caption, spans, labels, padding):
        m = grid[first:end_token].sum(axis=0)
        peak = int(np.argmax(m))
        summaries.append(
            Word(
                text=caption[start:end],
                start=start,
                end=end,
                first_token=first,
                end_token=end_token,
                relevance=float(m.sum()),
                peak_row=peak // gw,
                peak_column=peak % gw,
                peak_value=float(m.flat[peak]),
                concentration=_concentration(np.abs(m)),
            )
        )
        maps.append(m)
    top: list[WordCell] = []
    if maps and top_k:
        # cells row-major, then word order: the order ties keep under a stable sort
        stacked = np.stack(maps, axis=-1).ravel()
        order = np.argsort(-np.abs(stacked), kind="stable")[:top_k]
        n_words = len(maps)
        for flat in order:
            cell, word = divmod(int(flat), n_words)
            top.append(WordCell(word=word, row=cell // gw, column=cell % gw, value=float(stacked[flat])))
    return Summary(share, total, positive, negative, tuple(summaries), tuple(top), gh, gw)


def to_proto(summary: Summary) -> explain_pb2.ExplanationSummary:
    """``summary`` as the ``ExplanationSummary`` message a response carries."""
    return explain_pb2.ExplanationSummary(
        interaction_share=summary.interaction_share,
        interaction_total=summary.interaction_total,
        positive_interaction=summary.positive_interaction,
        negative_interaction=summary.negative_interaction,
        words=[explain_pb2.WordSummary(**dataclasses.asdict(word)) for word in summary.words],
        top_interactions=[explain_pb2.WordCell(**dataclasses.asdict(cell)) for cell in summary.top_interactions],
        grid_height=summary.grid_height,
        grid_width=summary.grid_width,
    )


def from_proto(message: explain_pb2.ExplanationSummary) -> Summary:
    """The :class:`Summary` an ``ExplanationSummary`` message carries (every field as sent)."""
    return Summary(
        interaction_share=message.interaction_share,
        interaction_total=message.interaction_total,
        positive_interaction=message.positive_interaction,
        negative_interaction=message.negative_interaction,
        words=tuple(
            Word(**{field.name: getattr(word, field.name) for field in dataclasses.fields(Word)})
            for word in message.words
        ),
        top_interactions=tuple(
            WordCell(cell.word, cell.row, cell.column, cell.value) for cell in message.top_interactions
        ),
        grid_height=message.grid_height,
        grid_width=message.grid_width,
    )
