"""Reading a traffic sample for ``explain-monitor explain``: JSONL, CSV or Parquet, through pyarrow.

A sample has a caption column, one image column (a path, or the image's bytes), and optional id,
timestamp and segment columns. :func:`read_sample` checks all of it before anything is sent, and
names the record and the column of the first problem it finds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import os
import pathlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet

__all__ = ["FORMATS", "Columns", "Record", "SampleError", "read_sample", "sample_format"]

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
"""File extensions and the format each one means; ``--format`` overrides them."""


class SampleError(ValueError):
    """The sample cannot be explained as it is; the message names the record and the column."""


@dataclasses.dataclass(frozen=True)
class Columns:
    """The sample's column names (the ``--*-column`` flags)."""

    caption: str = "caption"
    image: str = "image"
    image_bytes: str = "image_bytes"
    id: str = "id"
    timestamp: str = "timestamp"
    segment: str = "segment"


@dataclasses.dataclass(frozen=True)
class Record:
    """One record of the sample, checked.

    Attributes:
        row: its 0-based row number in the sample.
        record_id: the id column's value as text, else ``str(row)``.
        caption: the caption.
        image_path: the image path as the sample gives it; None for inline bytes.
        image: what to send: a resolved path (read at send time) or the encoded bytes.
        timestamp: the timestamp in UTC, or None.
        segment: the segment, or None.
    """

    row: int
    record_id: str
    caption: str
    image_path: str | None
    image: pathlib.Path | bytes
    timestamp: dt.datetime | None
    segment: str | None

    def image_bytes(self) -> bytes:
        """The encoded image. Raises OSError for a path that cannot be read."""
        return self.image if isinstance(self.image, bytes) else self.image.read_bytes()


def sample_format(path: pathlib.Path, given: str | None = None) -> str:
    """``given``, else the format ``path``'s extension names.

    Raises:
        SampleError: an extension that names no format, without ``given``.
    """
    if given:
        return given
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise SampleError(
            f"{path}: cannot tell the format from the extension {path.suffix!r} (known: {', '.join(FORMATS)}); "
            "pass --format jsonl, csv or parquet"
        ) from None


def _read_table(path: pathlib.Path, fmt: str, columns: Columns) -> pa.Table:
    if fmt == "parquet":
        return pyarrow.parquet.read_table(path)
    if fmt == "csv":
        # text columns stay text (an id of "007" or a segment of "12" must not become a number);
        # an empty field is a missing value, as an absent key in JSONL
        text = {name: pa.string() for name in (columns.id, columns.caption, columns.image, columns.segment)}
        text[columns.image_bytes] = pa.string()
        text[columns.timestamp] = pa.string()
        return pyarrow.csv.read_csv(
            path, convert_options=pyarrow.csv.ConvertOptions(column_types=text, strings_can_be_null=True)
        )
    if fmt == "jsonl":
        return pyarrow.json.read_json(path)
    raise SampleError(f"--format: unknown format {fmt!r}; use jsonl, csv or parquet")


def _where(path: pathlib.Path, row: int, ids: list[str] | None, column: str) -> str:
    record = f"record {row}" + (f" (id {ids[row]!r})" if ids is not None else "")
    return f"{path}: {record}, column {column!r}"


def _timestamps(path: pathlib.Path, table: pa.Table, column: str, ids: list[str] | None) -> list[dt.datetime | None]:
    values = table.column(column)
    if pa.types.is_timestamp(values.type):
        # a zone-less timestamp is read as UTC, as the ISO text without an offset below
        values = values.cast(pa.timestamp("us", tz=values.type.tz or "UTC"))
        return [None if v is None else v.astimezone(dt.UTC) for v in values.to_pylist()]
    if pa.types.is_date(values.type):
        values = values.cast(pa.timestamp("us", tz="UTC"))
        return values.to_pylist()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
        raise SampleError(f"{path}: column {column!r} must hold ISO 8601 text or timestamps; it holds {values.type}")
    out = []
    for row, text in enumerate(values.to_pylist()):
        if text is None or text == "":
            out.append(None)
            continue
        try:
            stamp = dt.datetime.fromisoformat(text)
        except ValueError:
            raise SampleError(f"{_where(path, row, ids, column)}: not an ISO 8601 timestamp: {text!r}") from None
        out.append(stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp.astimezone(dt.UTC))
    return out


def _text(path: pathlib.Path, table: pa.Table, column: str) -> list:
    values = table.column(column)
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        raise SampleError(f"{path}: column {column!r} must hold text; it holds {values.type}")
    return pc.cast(values, pa.string()).to_pylist() if not pa.types.is_null(values.type) else values.to_pylist()


def read_sample(path: str | os.PathLike, *, fmt: str | None = None, columns: Columns = Columns()) -> list[Record]:
    """Read and check a traffic sample.

    Args:
        path: a JSONL, CSV or Parquet file.
        fmt: "jsonl", "csv" or "parquet"; None = from the extension (:data:`FORMATS`).
        columns: the column names.

    Returns:
        The records in sample order. Image paths are resolved against the sample's folder and
        checked to be readable files; inline bytes are decoded (base64 text in JSONL and CSV,
        binary or base64 text in Parquet).

    Raises:
        SampleError: a directory; a file pyarrow cannot read; a missing caption column; both image columns
            or neither; a missing caption or image in a record; a duplicate id; an image path
            that is not a readable file; base64 text that does not decode; a timestamp that is
            not ISO 8601. The message names the record (row and id) and the column.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise SampleError(f"{path}: SAMPLE is a directory; give a file (.jsonl, .csv or .parquet)")
    fmt = sample_format(path, fmt)
    try:
        table = _read_table(path, fmt, columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise SampleError(f"{path}: cannot read it as {fmt}: {err}") from None
    names = set(table.column_names)
    if columns.caption not in names:
        raise SampleError(
            f"{path}: no caption column {columns.caption!r} (columns: {', '.join(table.column_names)}); "
            "name it with --caption-column"
        )
    has_path, has_bytes = columns.image in names, columns.image_bytes in names
    if has_path == has_bytes:
        raise SampleError(
            f"{path}: give exactly one image column, {columns.image!r} (a path) or {columns.image_bytes!r} "
            f"(the bytes); the sample has {'both' if has_path else 'neither'} (columns: "
            f"{', '.join(table.column_names)})"
        )
    n = table.num_rows
    ids = _text(path, table, columns.id) if columns.id in names else [str(row) for row in range(n)]
    # records are named by row, and by id too when the sample has ids
    named = ids if columns.id in names else None
    seen: dict[str, int] = {}
    for row, record_id in enumerate(ids):
        if record_id is None or record_id == "":
            raise SampleError(f"{_where(path, row, None, columns.id)}: empty id")
        if record_id in seen:
            raise SampleError(
                f"{_where(path, row, ids, columns.id)}: duplicate id, also record {seen[record_id]}; "
                "ids must be unique (a resumed run skips the ids it has written)"
            )
        seen[record_id] = row
    captions = _text(path, table, columns.caption)
    segments = _text(path, table, columns.segment) if columns.segment in names else [None] * n
    stamps = _timestamps(path, table, columns.timestamp, named) if columns.timestamp in names else [None] * n
    if has_path:
        images, image_paths = _image_paths(path, table, columns.image, named), _text(path, table, columns.image)
    else:
        images, image_paths = _image_bytes(path, table, columns.image_bytes, named), [None] * n
    records = []
    for row in range(n):
        if captions[row] is None:
            raise SampleError(f"{_where(path, row, named, columns.caption)}: no caption")
        records.append(Record(row, ids[row], captions[row], image_paths[row], images[row], stamps[row], segments[row]))
    return records


def _image_paths(path: pathlib.Path, table: pa.Table, column: str, ids: list[str] | None) -> list[pathlib.Path]:
    out = []
    for row, text in enumerate(_text(path, table, column)):
        if not text:
            raise SampleError(f"{_where(path, row, ids, column)}: no image path")
        image = pathlib.Path(text) if os.path.isabs(text) else path.parent / text
        try:
            with open(image, "rb"):
                pass
        except OSError as err:
            raise SampleError(
                f"{_where(path, row, ids, column)}: cannot read the image {text!r}: {err.strerror}"
            ) from None
        out.append(image)
    return out


def _image_bytes(path: pathlib.Path, table: pa.Table, column: str, ids: list[str] | None) -> list[bytes]:
    values = table.column(column)
    binary = pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
    out = []
    for row, value in enumerate(values.to_pylist()):
        if not value:
            raise SampleError(f"{_where(path, row, ids, column)}: no image bytes")
        if not binary:
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as err:
                raise SampleError(f"{_where(path, row, ids, column)}: not base64 text: {err}") from None
        out.append(value)
    return out
