"""The summary table ``explain-monitor explain`` writes and ``explain-monitor compare`` reads:
one row per explained record, Parquet.

The signals are ``ExplanationSummary``'s (explain.proto gives each formula); words are keyed by
:func:`word_key` so that "Red" and "red," count as one word in global rankings.
"""

from __future__ import annotations

import string
import unicodedata

import pyarrow as pa

__all__ = ["SCALARS", "SCHEMA", "WORD", "WORD_CELL", "word_key"]

WORD = pa.struct(
    [
        ("text", pa.string()),  # WordSummary.text
        ("key", pa.string()),  # word_key(text)
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("relevance", pa.float64()),
        ("concentration", pa.float64()),
        ("peak_row", pa.int32()),
        ("peak_column", pa.int32()),
        ("peak_value", pa.float64()),
    ]
)
WORD_CELL = pa.struct([("word", pa.int32()), ("row", pa.int32()), ("column", pa.int32()), ("value", pa.float64())])

# the per-record scalar signals compare tests for drift
SCALARS = (
    "score",
    "interaction_share",
    "positive_interaction",
    "negative_interaction",
    "mean_concentration",
    "convergence_delta_abs",
)

SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),  # the sample's id column, else the record's row number
        ("timestamp", pa.timestamp("us", tz="UTC")),  # the sample's, null when it has none
        ("segment", pa.string()),  # the sample's, null when it has none
        ("caption", pa.string()),
        ("image", pa.string()),  # the image's path as the sample gives it; null for inline bytes
        ("model", pa.string()),  # ExplainResponse.model
        ("request_id", pa.string()),
        ("explained_at", pa.timestamp("us", tz="UTC")),
        ("score", pa.float64()),
        ("logit", pa.float64()),
        ("convergence_delta_abs", pa.float64()),
        ("interaction_total", pa.float64()),
        ("interaction_share", pa.float64()),
        ("positive_interaction", pa.float64()),
        ("negative_interaction", pa.float64()),
        ("mean_concentration", pa.float64()),  # mean of the words' concentration; NaN without words
        ("grid_height", pa.int32()),
        ("grid_width", pa.int32()),
        ("words", pa.list_(WORD)),
        ("top_interactions", pa.list_(WORD_CELL)),
    ]
)


def word_key(text: str) -> str:
    """The key a word is counted under: NFKC, case-folded, without surrounding punctuation."""
    return unicodedata.normalize("NFKC", text).casefold().strip(string.punctuation + "\u2018\u2019\u201c\u201d")
