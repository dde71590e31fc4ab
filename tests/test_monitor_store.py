"""``explain-monitor explain``'s parts in-process: the resumable summary writer under kills at any
point, the bounded-concurrency scheduler, backoff, sample reading and the command line."""

from __future__ import annotations

import datetime as dt
import io
import pathlib
import random
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from explain_client.monitor import cli, explain_command
from explain_client.monitor.explain_command import EXIT_USAGE
from explain_client.monitor.explaining import Backoff, Outcome, explain_records
from explain_client.monitor.sample import SampleError, read_sample
from explain_client.monitor.schema import SCHEMA
from explain_client.monitor.store import SummaryWriter, read_parts

pytestmark = pytest.mark.unit


def row(record_id: str) -> dict:
    """A summary row with every SCHEMA field, one word and one top pair."""
    word = {
        "text": "red",
        "key": "red",
        "start": 2,
        "end": 5,
        "relevance": 0.1,
        "concentration": 0.4,
        "peak_row": 1,
        "peak_column": 2,
        "peak_value": 0.05,
    }
    return {
        "record_id": record_id,
        "timestamp": dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        "segment": "s",
        "caption": "a red circle.",
        "image": None,
        "model": "shapes",
        "request_id": f"req-{record_id}",
        "explained_at": dt.datetime.now(dt.UTC),
        "score": 0.3,
        "logit": 16.0,
        "convergence_delta_abs": 0.01,
        "interaction_total": 0.2,
        "interaction_share": 0.7,
        "positive_interaction": 0.3,
        "negative_interaction": -0.1,
        "mean_concentration": 0.4,
        "grid_height": 8,
        "grid_width": 8,
        "words": [word],
        "top_interactions": [{"word": 0, "row": 1, "column": 2, "value": 0.05}],
    }


def add_concurrently(writer: SummaryWriter, ids: list[str], threads: int) -> None:
    """Add the rows of ``ids`` from ``threads`` threads at once."""
    chunks = [ids[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=lambda c=c: [writer.add(row(i)) for i in c]) for c in chunks]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@given(
    total=st.integers(1, 60),
    threads=st.integers(1, 8),
    flush_rows=st.integers(1, 20),
    kill_fraction=st.floats(0, 1),
    torn_write=st.booleans(),
)
def test_a_killed_writer_resumes_with_every_record_exactly_once(total, threads, flush_rows, kill_fraction, torn_write):
    ids = [f"r{i}" for i in range(total)]
    kill_at = int(kill_fraction * total)
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "out"
        first = SummaryWriter(out, flush_rows=flush_rows, flush_seconds=3600)
        add_concurrently(first, ids[:kill_at], threads)
        # SIGKILL: the buffered rows are gone; a part being written was left as its temp file
        del first
        if torn_write:
            (out / ".tmp-0123456789abcdef-part-999999-dead.parquet").write_bytes(b"PAR1 half a file")
        second = SummaryWriter(out, flush_rows=flush_rows, flush_seconds=3600)
        flushed = (kill_at // flush_rows) * flush_rows
        assert len(second.done) == flushed  # every flushed row counts as done, nothing else
        assert kill_at - flushed < flush_rows  # at most flush_rows - 1 records are redone
        add_concurrently(second, [i for i in ids if i not in second.done], threads)
        second.flush()
        table = read_parts(out)
        assert sorted(table.column("record_id").to_pylist()) == sorted(ids)
        assert table.schema.equals(SCHEMA)
        assert not list(out.glob(".tmp-*"))


def test_writer_flushes_on_age_and_refuses_a_record_twice(tmp_path):
    writer = SummaryWriter(tmp_path, flush_rows=100, flush_seconds=0.05)
    writer.add(row("a"))
    assert read_parts(tmp_path).num_rows == 0
    time.sleep(0.06)
    writer.flush_if_due()
    assert read_parts(tmp_path).column("record_id").to_pylist() == ["a"]
    with pytest.raises(ValueError, match="record 'a' is already in"):
        writer.add(row("a"))
    assert SummaryWriter(tmp_path).done == {"a"}


def test_read_summaries_of_a_new_directory_a_file_and_a_foreign_part(tmp_path):
    assert read_parts(tmp_path).schema.equals(SCHEMA)
    assert read_parts(tmp_path).num_rows == 0
    single = tmp_path / "one.parquet"
    pyarrow.parquet.write_table(pa.Table.from_pylist([row("x")], schema=SCHEMA), single)
    assert read_parts(single).column("record_id").to_pylist() == ["x"]
    pyarrow.parquet.write_table(pa.table({"record_id": ["y"]}), tmp_path / "part-000000-ffff.parquet")
    with pytest.raises(ValueError, match="not an explain-monitor summary table"):
        read_parts(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such summary"):
        read_parts(tmp_path / "missing")


@given(concurrency=st.integers(1, 6), total=st.integers(0, 40), stop_after=st.one_of(st.none(), st.integers(0, 40)))
def test_scheduler_bounds_records_taken_but_not_handled_and_finishes_them_on_stop(concurrency, total, stop_after):
    records = list(range(total))
    stop = threading.Event()
    lock = threading.Lock()
    started, handled, outstanding = [], [], []

    def call(record, _stop):
        with lock:
            started.append(record)
            # calls in flight and outcomes not yet handled: what a SIGKILL now would lose
            outstanding.append(len(started) - len(handled))
            if stop_after is not None and len(started) > stop_after:
                stop.set()
        time.sleep(0.001)
        return Outcome(record)

    def handle(outcome):
        time.sleep(0.002)  # a slow handler (a flush) must hold the workers back, not queue up outcomes
        with lock:
            handled.append(outcome.record)

    explain_records(records, call, handle, concurrency=concurrency, stop=stop)
    assert max(outstanding, default=0) <= concurrency
    assert sorted(handled) == sorted(started)  # every call started was finished and handled
    if stop_after is None or stop_after >= total:
        assert sorted(handled) == records
    else:
        # after the stop, at most the calls already in flight were started
        assert len(started) <= stop_after + concurrency


def test_backoff_grows_exponentially_within_its_cap():
    backoff, rng = Backoff(initial=0.1, maximum=2.0), random.Random(0)
    for retry in range(12):
        delays = [backoff.delay(retry, rng) for _ in range(200)]
        cap = min(2.0, 0.1 * 2**retry)
        assert 0 <= min(delays) and max(delays) <= cap
        assert max(delays) > cap / 2  # full jitter spreads over the whole range


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_csv_keeps_ids_as_text_and_reads_zone_less_times_as_utc(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    sample = tmp_path / "s.csv"
    sample.write_text(
        "id,caption,image,timestamp,segment\n"
        "007,a red square.,img/a.png,2026-12-01T10:00:00,12\n"
        "8,a red square,img/a.png,2026-12-01T12:00:00+02:00,\n"
    )
    records = read_sample(sample)
    assert [r.record_id for r in records] == ["007", "8"]
    assert [r.segment for r in records] == ["12", None]
    assert [r.timestamp for r in records] == [dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)] * 2
    assert records[0].image_bytes() == png() and records[0].image_path == "img/a.png"


def test_parquet_timestamps_and_binary_images(tmp_path):
    sample = tmp_path / "s.parquet"
    naive = pa.array([dt.datetime(2026, 12, 1, 9, 30)], pa.timestamp("ms"))
    pyarrow.parquet.write_table(pa.table({"caption": ["x"], "image_bytes": [png()], "timestamp": naive}), sample)
    (record,) = read_sample(sample)
    assert record.timestamp == dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC)
    assert record.image_bytes() == png() and record.image_path is None and record.record_id == "0"


def test_unknown_extension_and_missing_caption_are_named(tmp_path):
    sample = tmp_path / "s.txt"
    sample.write_text('{"caption": null, "image_bytes": "AAAA"}\n')
    with pytest.raises(SampleError, match="pass --format"):
        read_sample(sample)
    with pytest.raises(SampleError, match=r"record 0, column 'caption': no caption"):
        read_sample(sample, fmt="jsonl")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0"], "--concurrency: must be >= 1"),
        (["--concurrency", "abc"], "--concurrency: must be an integer >= 1, got 'abc'"),
        (["--flush-rows", "1.5"], "--flush-rows: must be an integer >= 1, got '1.5'"),
        (["--connect-timeout", "0"], "--connect-timeout: must be > 0"),
        (["--max-retries", "-1"], "--max-retries: must be >= 0"),
        (["--timeout", "0"], "--timeout: must be > 0"),
        (["--format", "xml"], "--format: invalid choice"),
        (["--summary-top-k", "101"], "--summary-top-k: must be in [0, 100]"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain", "s.jsonl", "out", *flags])
    assert exit_info.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_explain_is_a_subcommand_that_runs_the_explain_command():
    args = cli.build_parser().parse_args(["explain", "s.jsonl", "out"])
    assert (args.run, args.concurrency, args.max_retries, args.flush_rows) == (explain_command.run, 8, 8, 64)


def test_a_directory_sample_and_a_file_out_are_named_before_anything_else(tmp_path, capsys):
    sample = tmp_path / "s.jsonl"
    sample.write_text('{"caption": "a red circle.", "image_bytes": "AAAA"}\n')
    (tmp_path / "afile").write_text("")
    # no server listens at the target: both are refused before any connection is tried
    assert cli.main(["explain", str(sample), str(tmp_path / "afile"), "--target", "127.0.0.1:1"]) == EXIT_USAGE
    assert f"error: OUT {str(tmp_path / 'afile')!r} is a file; OUT must be a directory" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path), str(tmp_path / "out"), "--target", "127.0.0.1:1"]) == EXIT_USAGE
    assert f"error: {tmp_path}: SAMPLE is a directory; give a file" in capsys.readouterr().err


def test_the_id_column_help_states_its_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--id-column NAME record id; the row number when the sample has no such column (default: id)" in text


def test_the_writer_reports_the_caption_and_image_of_each_written_record(tmp_path):
    writer = SummaryWriter(tmp_path, flush_rows=1)
    writer.add(row("a"))
    writer.add({**row("b"), "caption": "a blue square.", "image": "images/b.png"})
    reopened = SummaryWriter(tmp_path)
    assert reopened.written == {"a": ("a red circle.", None), "b": ("a blue square.", "images/b.png")}
    assert reopened.done == {"a", "b"}
