"""``explain-monitor explain`` against real ``explain-server`` processes serving the shipped model
at its defaults: every sample format, resuming after SIGINT and SIGKILL, retries, bad input."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
from prometheus_client.parser import text_string_to_metric_families

from explain_api import explain_pb2, explain_pb2_grpc
from explain_client.client import explain_request
from explain_client.monitor.explain_command import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_USAGE
from explain_client.monitor.schema import SCHEMA, word_key
from explain_client.monitor.store import FAILURES_FILE, read_parts
from explain_server.launcher import HOST, ServerProcess, free_port
from explain_server.shapes.scenes import describe, generate_scene, random_style, render

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = ((96, 96), (128, 96), (160, 160), (120, 200))
FORMATS = ("PNG", "JPEG", "WEBP")
SEGMENTS = ("camera-north", "camera-south", "customer 7")


def scenes(count: int, seed: int) -> list[dict]:
    """``count`` distinct generated scenes, encoded at several sizes and formats, with captions
    of varied length (every object, or a subset), ids, segments and timestamps."""
    rng = np.random.default_rng(seed)
    start = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
    out = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        scene = generate_scene(rng, width=width, height=height)
        caption = describe(scene, random_style(scene, rng, subset=bool(i % 2))).text
        buffer = io.BytesIO()
        fmt = FORMATS[i % len(FORMATS)]
        render(scene).save(buffer, fmt, **({"quality": 90} if fmt != "PNG" else {}))
        out.append(
            {
                "id": f"rec-{seed}-{i:04d}",
                "caption": caption,
                "bytes": buffer.getvalue(),
                "suffix": fmt.lower(),
                "segment": SEGMENTS[i % len(SEGMENTS)],
                "timestamp": start + dt.timedelta(minutes=7 * i, microseconds=i),
            }
        )
    return out


def write_sample(
    folder: pathlib.Path, items: list[dict], fmt: str, *, inline: bool, absolute: bool = False
) -> pathlib.Path:
    """A sample of ``items`` in ``fmt`` (jsonl, csv, parquet): image paths (relative to the
    sample, or absolute) or inline bytes (base64 text, binary in Parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in items:
        row = {"id": item["id"], "caption": item["caption"], "segment": item["segment"]}
        if inline:
            row["image_bytes"] = item["bytes"] if fmt == "parquet" else base64.b64encode(item["bytes"]).decode()
        else:
            image = folder / "images" / f"{item['id']}.{item['suffix']}"
            image.parent.mkdir(exist_ok=True)
            image.write_bytes(item["bytes"])
            row["image"] = str(image) if absolute else f"images/{image.name}"
        # ISO text with an offset in the text formats, a timestamp type in Parquet
        stamp = item["timestamp"]
        row["timestamp"] = (
            stamp if fmt == "parquet" else stamp.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
        )
        rows.append(row)
    path = folder / f"sample.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "csv":
        pyarrow.csv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        pyarrow.parquet.write_table(pa.Table.from_pylist(rows), path)
    return path


def monitor_command(sample: pathlib.Path, out: pathlib.Path, target: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "explain_client.monitor",
        "explain",
        str(sample),
        str(out),
        "--target",
        target,
        *args,
    ]


def run_monitor(sample: pathlib.Path, out: pathlib.Path, target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(monitor_command(sample, out, target, *args), capture_output=True, text=True, timeout=600)


def explain_calls(server: ServerProcess) -> float:
    """Explain calls the server has answered OK, from its /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels.get("grpc_method") == "Explain"
        and sample.labels.get("grpc_code") == "OK"
    )


def direct(target: str, item: dict) -> explain_pb2.ExplainResponse:
    """A plain Explain call of ``item`` at the defaults (DETAIL_FULL)."""
    with grpc.insecure_channel(target) as channel:
        return explain_pb2_grpc.ExplainStub(channel).Explain(
            explain_request(item["bytes"], item["caption"]), timeout=120
        )


def assert_rows_match_direct_calls(table: pa.Table, items: list[dict], target: str) -> None:
    rows = {row["record_id"]: row for row in table.to_pylist()}
    for item in items:
        row, response = rows[item["id"]], direct(target, item)
        summary = response.summary
        approx = pytest.approx
        assert row["caption"] == item["caption"] and row["segment"] == item["segment"]
        assert row["timestamp"] == item["timestamp"]
        assert row["model"] == response.model == "shapes"
        assert row["score"] == approx(response.score, rel=1e-5, abs=1e-6)
        assert row["logit"] == approx(response.score * response.logit_scale, rel=1e-5, abs=1e-5)
        assert row["convergence_delta_abs"] == approx(abs(response.convergence_delta), rel=1e-4, abs=1e-6)
        for field in ("interaction_total", "interaction_share", "positive_interaction", "negative_interaction"):
            assert row[field] == approx(getattr(summary, field), rel=1e-5, abs=1e-6), field
        assert (row["grid_height"], row["grid_width"]) == (summary.grid_height, summary.grid_width) == (8, 8)
        assert [(w["text"], w["key"], w["start"], w["end"]) for w in row["words"]] == [
            (w.text, word_key(w.text), w.start, w.end) for w in summary.words
        ]
        assert row["words"], item["caption"]
        for got, want in zip(row["words"], summary.words):
            assert got["relevance"] == approx(want.relevance, rel=1e-4, abs=1e-6)
            assert got["concentration"] == approx(want.concentration, rel=1e-4, abs=1e-6)
            assert (got["peak_row"], got["peak_column"]) == (want.peak_row, want.peak_column)
        assert row["mean_concentration"] == approx(np.mean([w.concentration for w in summary.words]), rel=1e-4)
        assert [(c["word"], c["row"], c["column"]) for c in row["top_interactions"]] == [
            (c.word, c.row, c.column) for c in summary.top_interactions
        ]
        assert len(row["top_interactions"]) == 10  # the server's default summary_top_k


@pytest.mark.parametrize(
    ("fmt", "inline", "absolute"),
    [
        ("jsonl", False, False),
        ("jsonl", True, False),
        ("csv", False, True),
        ("csv", True, False),
        ("parquet", True, False),
        ("parquet", False, False),
    ],
)
def test_every_format_gives_one_row_per_record_equal_to_a_direct_call(shapes, tmp_path, fmt, inline, absolute):
    items = scenes(6, seed=sum(map(ord, fmt)) + 2 * inline)
    sample = write_sample(tmp_path / "sample", items, fmt, inline=inline, absolute=absolute)
    out = tmp_path / "out"
    result = run_monitor(sample, out, shapes.target)
    assert result.returncode == 0, result.stderr
    table = read_parts(out)
    assert table.schema.equals(SCHEMA)
    assert sorted(table.column("record_id").to_pylist()) == sorted(item["id"] for item in items)
    images = table.column("image").to_pylist()
    assert images == [None] * len(items) if inline else all(image.endswith(("png", "jpeg", "webp")) for image in images)
    assert_rows_match_direct_calls(table, items, shapes.target)
    assert pyarrow.parquet.read_table(out / FAILURES_FILE).num_rows == 0


def test_ids_default_to_row_numbers_and_optional_columns_may_be_absent(shapes, tmp_path):
    items = scenes(3, seed=11)
    sample = tmp_path / "sample.jsonl"
    sample.write_text(
        "".join(json.dumps({"text": i["caption"], "png": base64.b64encode(i["bytes"]).decode()}) + "\n" for i in items)
    )
    out = tmp_path / "out"
    result = run_monitor(
        sample, out, shapes.target, "--caption-column", "text", "--image-bytes-column", "png", "--summary-top-k", "3"
    )
    assert result.returncode == 0, result.stderr
    table = read_parts(out).sort_by("record_id")
    assert table.column("record_id").to_pylist() == ["0", "1", "2"]
    assert table.column("timestamp").null_count == table.column("segment").null_count == 3
    assert [len(cells) for cells in table.column("top_interactions").to_pylist()] == [3, 3, 3]


def wait_for_rows(out: pathlib.Path, at_least: int, process: subprocess.Popen) -> None:
    """Wait until ``out`` holds ``at_least`` parts (one row each with --flush-rows 1)."""
    while len(list(out.glob("part-*.parquet"))) < at_least:
        assert process.poll() is None, "the run ended before it could be stopped halfway"
        time.sleep(0.02)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_halfway_and_restarted_explains_each_record_exactly_once(shapes, tmp_path, stop):
    count, concurrency = 30, 2
    items = scenes(count, seed=100 + stop)
    sample = write_sample(tmp_path / "sample", items, "parquet", inline=True)
    out = tmp_path / "out"
    before = explain_calls(shapes)
    args = ("--concurrency", str(concurrency), "--flush-rows", "1")
    first = subprocess.Popen(
        monitor_command(sample, out, shapes.target, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_rows(out, count // 2, first)
    first.send_signal(stop)
    _, stderr = first.communicate(timeout=120)
    written = read_parts(out).num_rows
    if stop == signal.SIGKILL:
        assert first.returncode == -signal.SIGKILL
    else:
        assert first.returncode == EXIT_INTERRUPTED, stderr
        assert "finishing the calls in flight" in stderr
    assert count // 2 <= written < count
    second = run_monitor(sample, out, shapes.target, *args)
    assert second.returncode == 0, second.stderr
    assert f"{written} already in" in second.stderr
    ids = read_parts(out).column("record_id").to_pylist()
    assert sorted(ids) == sorted(item["id"] for item in items)  # every record, none twice
    calls = explain_calls(shapes) - before
    if stop == signal.SIGKILL:
        # the calls in flight when it died were answered but never written
        assert count <= calls <= count + concurrency
    else:
        assert calls == count


def test_records_are_explained_though_the_queue_is_full(tmp_path):
    """A queue of one request answers most of 8 concurrent calls RESOURCE_EXHAUSTED; the
    retries still get every record explained."""
    server = ServerProcess(["--max-queue-size", "1"], tmp_path / "server.log").wait_serving()
    try:
        items = scenes(16, seed=7)
        sample = write_sample(tmp_path / "sample", items, "jsonl", inline=True)
        out = tmp_path / "out"
        result = run_monitor(sample, out, server.target, "--concurrency", "8", "--max-retries", "30")
        with urllib.request.urlopen(server.metrics_url, timeout=10) as page:
            metrics = page.read().decode()
        exhausted = sum(
            s.value
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
            if s.name == "grpc_server_handled_total"
            and s.labels.get("grpc_method") == "Explain"
            and s.labels.get("grpc_code") == "RESOURCE_EXHAUSTED"
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert exhausted > 0, "the server never refused a call: the retries were not exercised"
    assert sorted(read_parts(out).column("record_id").to_pylist()) == sorted(i["id"] for i in items)


def test_a_monitor_started_before_the_server_is_ready_retries_until_it_is(tmp_path):
    items = scenes(4, seed=8)
    sample = write_sample(tmp_path / "sample", items, "csv", inline=False)
    out = tmp_path / "out"
    server = ServerProcess([], tmp_path / "server.log")  # started, not yet serving
    try:
        result = run_monitor(sample, out, server.target, "--max-retries", "60")
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert sorted(read_parts(out).column("record_id").to_pylist()) == sorted(i["id"] for i in items)


def test_permanent_failures_are_written_with_their_code_and_retried_by_the_next_run(shapes, tmp_path):
    items = scenes(3, seed=9)
    items[1]["bytes"] = b"this is not an image"
    sample = write_sample(tmp_path / "sample", items, "parquet", inline=True)
    out = tmp_path / "out"
    result = run_monitor(sample, out, shapes.target)
    assert result.returncode == EXIT_FAILURES, result.stderr
    assert "2 explained" in result.stderr and "1 failed" in result.stderr
    failures = pyarrow.parquet.read_table(out / FAILURES_FILE).to_pylist()
    assert [(f["record_id"], f["code"], f["attempts"]) for f in failures] == [(items[1]["id"], "INVALID_ARGUMENT", 1)]
    assert "image" in failures[0]["message"]
    assert sorted(read_parts(out).column("record_id").to_pylist()) == sorted([items[0]["id"], items[2]["id"]])
    # stderr counts the failures per code with an example, not only the failures table
    assert f"1 failed with INVALID_ARGUMENT, e.g. record {items[1]['id']!r}: " in result.stderr
    again = run_monitor(sample, out, shapes.target)
    assert again.returncode == EXIT_FAILURES and "0 explained, 2 already in" in again.stderr


BAD_SAMPLES = {
    "missing caption column": ('{"image": "a.png"}\n', "no caption column 'caption'"),
    "neither image column": ('{"caption": "a red circle."}\n', "exactly one image column"),
    "both image columns": ('{"caption": "x", "image": "a.png", "image_bytes": "AAAA"}\n', "has both"),
    "duplicate id": (
        '{"id": "a", "caption": "x", "image": "ok.png"}\n{"id": "a", "caption": "y", "image": "ok.png"}\n',
        "record 1 (id 'a'), column 'id': duplicate id, also record 0",
    ),
    "unreadable image": (
        '{"id": "a", "caption": "x", "image": "ok.png"}\n{"id": "b", "caption": "y", "image": "gone.png"}\n',
        "record 1 (id 'b'), column 'image': cannot read the image 'gone.png'",
    ),
    "bad base64": ('{"caption": "x", "image_bytes": "not base64!"}\n', "record 0, column 'image_bytes': not base64"),
    "bad timestamp": (
        '{"caption": "x", "image": "ok.png", "timestamp": "yesterday"}\n',
        "column 'timestamp': not an ISO 8601 timestamp: 'yesterday'",
    ),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_bad_samples_are_refused_before_anything_is_sent(shapes, tmp_path, case):
    text, message = BAD_SAMPLES[case]
    (tmp_path / "ok.png").write_bytes(scenes(1, seed=1)[0]["bytes"])
    sample = tmp_path / "sample.jsonl"
    sample.write_text(text)
    before = explain_calls(shapes)
    result = run_monitor(sample, tmp_path / "out", shapes.target)
    assert result.returncode == EXIT_USAGE
    assert message in result.stderr
    assert explain_calls(shapes) == before


def test_an_unreachable_target_exits_2_naming_it_after_the_connect_timeout(tmp_path):
    sample = write_sample(tmp_path / "sample", scenes(3, seed=12), "jsonl", inline=True)
    out = tmp_path / "out"
    target = f"{HOST}:{free_port()}"  # nothing listens there
    result = run_monitor(sample, out, target, "--connect-timeout", "1")
    assert result.returncode == EXIT_USAGE
    assert f"--target {target}: no answer within --connect-timeout 1 s" in result.stderr
    assert "nothing sent" in result.stderr
    assert not (out / FAILURES_FILE).exists()


BAD_OPTIONS = {
    "model": (("--model", "bogus"), "--model 'bogus': "),
    "method": (("--method", "bogus"), "--method 'bogus': model 'shapes' accepts "),
    "n_steps": (("--n-steps", "0"), "--n-steps 0: model 'shapes' accepts 1 to 512"),
    "image layer index": (("--image-layer", "99"), "--image-layer 99: model 'shapes' has"),
    "text layer name": (("--text-layer", "no such layer"), "--text-layer 'no such layer': model 'shapes' has no"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_options_the_service_does_not_accept_exit_2_before_anything_is_sent(shapes, tmp_path, case):
    flags, message = BAD_OPTIONS[case]
    sample = write_sample(tmp_path / "sample", scenes(2, seed=13), "jsonl", inline=True)
    before = explain_calls(shapes)
    result = run_monitor(sample, tmp_path / "out", shapes.target, *flags)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert message in result.stderr and "nothing sent" in result.stderr
    if case == "model":
        assert "it hosts: shapes" in result.stderr
    assert explain_calls(shapes) == before


def test_a_run_whose_first_records_all_fail_alike_stops_and_exits_2(shapes, tmp_path):
    """Every record fails the same way (no image decodes): the run stops after the first 5
    outcomes and the calls in flight, rather than failing each of the 40 records."""
    items = scenes(40, seed=14)
    for item in items:
        item["bytes"] = b"this is not an image"
    sample = write_sample(tmp_path / "sample", items, "parquet", inline=True)
    out = tmp_path / "out"
    result = run_monitor(sample, out, shapes.target, "--concurrency", "2")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "error: the first 5 records all failed with INVALID_ARGUMENT: " in result.stderr
    assert "nothing more sent" in result.stderr
    failed = pyarrow.parquet.read_table(out / FAILURES_FILE).num_rows
    assert 5 <= failed <= 6  # the 5 and the call in flight beside the 5th
    assert f"0 explained, 0 already in {out}, {failed} failed" in result.stderr
    assert f"{40 - failed} not started" in result.stderr


def test_an_option_only_the_calls_can_refuse_stops_the_run_after_the_first_records(shapes, tmp_path):
    """ListModels does not tell the smallest n_steps of each method: riemann_trapezoid needs 2."""
    sample = write_sample(tmp_path / "sample", scenes(12, seed=20), "jsonl", inline=True)
    out = tmp_path / "out"
    args = ("--method", "riemann_trapezoid", "--n-steps", "1", "--concurrency", "2")
    result = run_monitor(sample, out, shapes.target, *args)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "error: the first 5 records all failed with INVALID_ARGUMENT: n_steps: " in result.stderr
    assert "; nothing more sent" in result.stderr
    assert pyarrow.parquet.read_table(out / FAILURES_FILE).num_rows <= 6


def test_a_small_sample_that_fails_entirely_alike_exits_2(shapes, tmp_path):
    items = scenes(2, seed=15)
    for item in items:
        item["bytes"] = b"this is not an image"
    sample = write_sample(tmp_path / "sample", items, "jsonl", inline=True)
    result = run_monitor(sample, tmp_path / "out", shapes.target)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "error: all 2 records failed with INVALID_ARGUMENT: " in result.stderr
    assert "nothing more sent" not in result.stderr


def test_an_out_of_another_sample_is_refused_before_anything_is_sent(shapes, tmp_path):
    first, second = scenes(2, seed=16), scenes(2, seed=17)
    out = tmp_path / "out"
    # without ids: both samples' ids are the row numbers, "0" and "1"
    for items, folder in ((first, "a"), (second, "b")):
        for item in items:
            del item["id"]
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "sample.jsonl").write_text(
            "".join(
                json.dumps({"caption": i["caption"], "image_bytes": base64.b64encode(i["bytes"]).decode()}) + "\n"
                for i in items
            )
        )
    assert run_monitor(tmp_path / "a" / "sample.jsonl", out, shapes.target).returncode == 0
    before = explain_calls(shapes)
    result = run_monitor(tmp_path / "b" / "sample.jsonl", out, shapes.target)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert f"{out} holds record '0' with another caption than SAMPLE's ({first[0]['caption']!r}" in result.stderr
    assert "OUT belongs to another sample; use a new OUT" in result.stderr
    assert explain_calls(shapes) == before
    assert read_parts(out).sort_by("record_id").column("caption").to_pylist() == [i["caption"] for i in first]


def test_an_out_whose_ids_or_images_differ_from_the_sample_is_refused(shapes, tmp_path):
    items = scenes(2, seed=18)
    out = tmp_path / "out"
    assert run_monitor(write_sample(tmp_path / "paths", items, "csv", inline=False), out, shapes.target).returncode == 0
    before = explain_calls(shapes)
    # the same ids and captions with inline images: the rows hold image paths
    inline = run_monitor(write_sample(tmp_path / "inline", items, "csv", inline=True), out, shapes.target)
    assert inline.returncode == EXIT_USAGE
    assert f"holds record {items[0]['id']!r} with another image than SAMPLE's ('images/" in inline.stderr
    assert "SAMPLE: inline bytes)" in inline.stderr
    # another sample with ids: its records would merge into OUT
    other = run_monitor(write_sample(tmp_path / "other", scenes(2, seed=19), "csv", inline=False), out, shapes.target)
    assert other.returncode == EXIT_USAGE
    assert f"holds 2 record ids that SAMPLE does not have, e.g. {items[0]['id']!r}" in other.stderr
    assert explain_calls(shapes) == before
