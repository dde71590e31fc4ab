"""The summary table on disk: a directory of Parquet part files, written so that a run can stop
at any moment (even SIGKILL) and a later run can carry on without explaining a record twice.

Each flush writes the rows buffered since the last one to a temporary file, fsyncs it, renames it
to ``part-<n>-<random>.parquet`` and fsyncs the directory: a part is either all there or absent.
A record counts as done once its row is in a part; :func:`read_parts` concatenates the parts.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet

from explain_client.monitor.schema import SCHEMA

__all__ = ["FAILURES", "FAILURES_FILE", "SummaryWriter", "read_parts", "write_failures"]

PART_GLOB = "part-*.parquet"
FAILURES_FILE = "failures.parquet"
"""The failures table of the last run, beside the parts (not one of them)."""
FAILURES = pa.schema(
    [
        ("record_id", pa.string()),
        ("row", pa.int64()),  # the record's row number in the sample
        # gRPC status code name, e.g. "INVALID_ARGUMENT"; "LOCAL_ERROR" when no request could be
        # built (an image path unreadable since the sample was checked)
        ("code", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int32()),  # calls made, retries included
        ("failed_at", pa.timestamp("us", tz="UTC")),
    ]
)
_TEMP_PREFIX = ".tmp-"


def _fsync_directory(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(table: pa.Table, path: pathlib.Path) -> None:
    """Write ``table`` to ``path`` so that ``path`` is either absent or complete, even after a crash."""
    temp = path.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
    try:
        with open(temp, "wb") as file:
            pyarrow.parquet.write_table(table, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _parts(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path.glob(PART_GLOB))


def read_parts(path: str | os.PathLike) -> pa.Table:
    """The rows an ``explain-monitor explain`` output holds so far, exactly in :data:`SCHEMA`
    (what resuming and the tests read; ``compare`` reads any table with the columns it needs,
    through :func:`tables.read_summaries`).

    Args:
        path: the output directory (its parts are read, not the failures table), or one Parquet
            file with the summary schema.

    Returns:
        A table with :data:`~explain_client.monitor.schema.SCHEMA` (empty when no part exists yet),
        rows in the order they were written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a part whose schema is not SCHEMA (an older or foreign file).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such summary directory or file")
    tables = [_read_part(file) for file in (_parts(path) if path.is_dir() else [path])]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _read_part(file: pathlib.Path, columns: list[str] | None = None) -> pa.Table:
    """``columns`` (None: all) of the part ``file``. Raises ValueError: its schema is not SCHEMA."""
    if not pyarrow.parquet.read_schema(file).equals(SCHEMA, check_metadata=False):
        raise ValueError(f"{file}: not an explain-monitor summary table (its schema differs from SCHEMA)")
    return pyarrow.parquet.read_table(file, columns=columns)


def _written(directory: pathlib.Path) -> list[dict[str, Any]]:
    """``record_id``, ``caption`` and ``image`` of every row of the parts in ``directory``,
    reading those columns only."""
    rows = []
    for file in _parts(directory):
        rows += _read_part(file, ["record_id", "caption", "image"]).to_pylist()
    return rows


def write_failures(directory: str | os.PathLike, failures: Iterable[Mapping[str, Any]]) -> pathlib.Path:
    """Replace the failures table in ``directory`` with ``failures`` (rows of :data:`FAILURES`);
    returns its path. Written atomically, like the parts."""
    path = pathlib.Path(directory) / FAILURES_FILE
    _write_atomically(pa.Table.from_pylist(list(failures), schema=FAILURES), path)
    return path


class SummaryWriter:
    """Buffers summary rows and flushes them to atomically written parts in ``directory``.

    Opening it creates the directory if needed, removes temporary files a killed run left, and
    reads the ids already written (:attr:`done`) with their caption and image (:attr:`written`,
    record id -> (caption, image path or None for inline bytes), for telling whether the parts
    belong to the sample at hand). :meth:`add` is thread-safe.

    Args:
        directory: the output directory.
        flush_rows: flush once this many rows are buffered (>= 1).
        flush_seconds: flush at the next :meth:`add` or :meth:`flush_if_due` once the oldest
            buffered row is this old (> 0).

    Raises:
        ValueError: bad ``flush_rows``/``flush_seconds``; a part of another schema; the parts
            hold an id twice (not written by this class).
    """

    def __init__(self, directory: str | os.PathLike, *, flush_rows: int = 64, flush_seconds: float = 30.0):
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1; got {flush_rows}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0; got {flush_seconds}")
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"{_TEMP_PREFIX}*"):
            stale.unlink()
        rows = _written(self.directory)
        self.written: dict[str, tuple[str, str | None]] = {r["record_id"]: (r["caption"], r["image"]) for r in rows}
        self.done: set[str] = set(self.written)
        if len(self.done) != len(rows):
            raise ValueError(f"{self.directory}: the parts hold some record ids more than once")
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._oldest = 0.0
        self._next_part = len(_parts(self.directory))

    def add(self, row: Mapping[str, Any]) -> None:
        """Buffer ``row`` (a dict of SCHEMA's fields), flushing when due.

        Raises:
            ValueError: its record id is already written or buffered.
        """
        with self._lock:
            if row["record_id"] in self.done:
                raise ValueError(f"record {row['record_id']!r} is already in {self.directory}")
            self.done.add(row["record_id"])
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.append(dict(row))
            if len(self._rows) >= self._flush_rows:
                self._flush_locked()
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flush if the oldest buffered row has waited ``flush_seconds``."""
        with self._lock:
            if self._rows and time.monotonic() - self._oldest >= self._flush_seconds:
                self._flush_locked()

    def flush(self) -> None:
        """Write every buffered row now."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        _write_atomically(table, self.directory / f"part-{self._next_part:06d}-{secrets.token_hex(4)}.parquet")
        self._next_part += 1
        self._rows = []
