"""Reading the summary tables ``explain-monitor compare`` compares, and their word occurrences."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from explain_client.monitor.schema import SCALARS, SCHEMA
from explain_client.monitor.store import FAILURES_FILE

__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "TableError",
    "WordOccurrences",
    "read_summaries",
    "word_occurrences",
]

REQUIRED_COLUMNS = ("record_id", "segment", "caption", "image", *SCALARS, "words")
"""The columns compare reads; a table may carry more (the rest of :data:`schema.SCHEMA`)."""
OPTIONAL_COLUMNS = ("model",)
"""Columns compare reads when a table has them (the model each record was explained by)."""


class TableError(ValueError):
    """A summary table compare cannot use: missing, unreadable, without the schema's columns, or empty."""


def read_summaries(path: str | os.PathLike, *, role: str) -> pa.Table:
    """Read a summary table: one Parquet file, or a directory of Parquet part files.

    Args:
        path: the file or directory. In a directory, every Parquet file is a part except the
            failures table ``explain-monitor explain`` writes beside its parts
            (:data:`store.FAILURES_FILE`) and files whose names start with "." or "_".
        role: "baseline" or "current", named in error messages.

    Returns:
        The table's :data:`REQUIRED_COLUMNS` and those of :data:`OPTIONAL_COLUMNS` it has, cast
        to the schema's types.

    Raises:
        TableError: the path does not exist, is not Parquet, lacks one of :data:`REQUIRED_COLUMNS`
            or has a column of an incompatible type, or has no rows.
    """
    where = pathlib.Path(path)
    if not where.exists():
        raise TableError(f"{role} table {str(where)!r} does not exist")
    try:
        # an `explain` output directory holds its failures table too: not a part
        table = ds.dataset(where, format="parquet", ignore_prefixes=[".", "_", FAILURES_FILE]).to_table()
    except (pa.ArrowException, OSError) as err:
        raise TableError(f"{role} table {str(where)!r} is not readable as Parquet: {err}") from None
    if table.num_rows == 0:
        # e.g. an `explain` run whose every record failed: its failures table says why
        raise TableError(
            f"{role} table {str(where)!r} has no rows (an explain-monitor explain output whose records all "
            f"failed lists them in {FAILURES_FILE})"
        )
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise TableError(
            f"{role} table {str(where)!r} lacks the summary schema's column(s) {', '.join(missing)} "
            "(explain_client.monitor.schema.SCHEMA; write it with `explain-monitor explain`)"
        )
    columns = {}
    for name in (*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in table.column_names)):
        wanted = SCHEMA.field(name).type
        try:
            columns[name] = table.column(name).cast(wanted)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise TableError(
                f"{role} table {str(where)!r}: column {name!r} is {table.schema.field(name).type}, "
                f"not the schema's {wanted}: {err}"
            ) from None
    return pa.table(columns)


@dataclass(frozen=True)
class WordOccurrences:
    """Every word of every record of a table, flattened: parallel arrays, one entry per word.

    ``record`` is the row index of the word's record in the table; ``relevance`` and
    ``concentration`` may be NaN (a word the server could not summarise)."""

    record: np.ndarray
    key: np.ndarray
    text: np.ndarray
    start: np.ndarray
    end: np.ndarray
    relevance: np.ndarray
    concentration: np.ndarray
    peak_row: np.ndarray
    peak_column: np.ndarray

    def __len__(self) -> int:
        return len(self.key)


def word_occurrences(table: pa.Table) -> WordOccurrences:
    """The words of ``table`` (read by :func:`read_summaries`), flattened.

    Returns:
        A :class:`WordOccurrences`; null structs and null fields become "" / NaN / -1.
    """
    words = table.column("words").combine_chunks()
    if isinstance(words, pa.ChunkedArray):  # an empty column combines to a chunked array of no chunks
        words = pa.array([], type=words.type)
    record = pc.list_parent_indices(words).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(words)

    def field(name: str, fill: object) -> np.ndarray:
        return pc.fill_null(pc.struct_field(flat, name), fill).to_numpy(zero_copy_only=False)

    return WordOccurrences(
        record=record.astype(np.int64),
        key=field("key", "").astype(object),
        text=field("text", "").astype(object),
        start=field("start", -1).astype(np.int64),
        end=field("end", -1).astype(np.int64),
        relevance=field("relevance", float("nan")).astype(np.float64),
        concentration=field("concentration", float("nan")).astype(np.float64),
        peak_row=field("peak_row", -1).astype(np.int64),
        peak_column=field("peak_column", -1).astype(np.int64),
    )
