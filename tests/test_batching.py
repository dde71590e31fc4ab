"""Dynamic batching, the factor cache, ExplainMany and the Prometheus metrics, on real servers."""

from __future__ import annotations

import concurrent.futures
import io
import json
import random
import time
import urllib.request

import numpy as np
import open_clip
import pytest
from conftest import TINY, TINY_CONFIG
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from explain_api import explain_pb2_grpc
from explain_client import DeadlineExceededError, ExplainClient, InvalidArgumentError, ResourceExhaustedError
from explain_client.client import explain_request
from explain_client.loadgen import factor_cache_counts
from explain_client.loadgen import main as loadgen_main
from explain_server.launcher import ServerProcess, free_port

pytestmark = pytest.mark.integration

WORDS = "red green blue small large circle square triangle cross dog cat on a the near left right".split()


def noise_png(seed: int, width: int = 64, height: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def caption(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(2 + seed % 9))  # varied lengths


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# The series that count calls ended early, each with its labels for the tiny model's Explain
# calls and the label its gRPC code goes under.
ENDED_SERIES = {
    "explain_requests_total": ({"model": "tiny"}, "code"),
    "explain_requests_dropped_total": ({"model": "tiny"}, "code"),
    "grpc_server_handled_total": (
        {"grpc_type": "unary", "grpc_service": "explain.v1.Explain", "grpc_method": "Explain"},
        "grpc_code",
    ),
}


def ended(before: dict, after: dict) -> dict[tuple[str, str], float]:
    """{(series, code): calls added between two scrapes} for ENDED_SERIES, DEADLINE_EXCEEDED and CANCELLED."""
    return {
        (name, code): value(after, name, **labels, **{key: code}) - value(before, name, **labels, **{key: code})
        for name, (labels, key) in ENDED_SERIES.items()
        for code in ("DEADLINE_EXCEEDED", "CANCELLED")
    }


def start(tmp_path_factory, name: str, *flags: str) -> ServerProcess:
    return ServerProcess(
        ["--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0", "--device", "cpu", *flags],
        tmp_path_factory.mktemp("logs") / f"{name}.log",
    ).wait_serving()


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """Batches of up to 32, a long queue delay so concurrent requests share batches, no cache
    (so every result is really computed in the batch it landed in)."""
    proc = start(
        tmp_path_factory,
        "batching",
        "--max-batch-size",
        "32",
        "--max-queue-delay-ms",
        "400",
        "--max-queue-size",
        "64",
        "--factor-cache-mb",
        "0",
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    """No batching, a queue of eight, and the factor cache on."""
    proc = start(tmp_path_factory, "small-queue", "--max-batch-size", "1", "--max-queue-size", "8")
    yield proc
    proc.stop()


def assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert got.score == pytest.approx(want.score, abs=1e-5)
    np.testing.assert_allclose(got.attribution, want.attribution, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.cls_attribution, want.cls_attribution, rtol=1e-5, atol=1e-6)


def test_concurrent_requests_each_get_their_own_result(batching_server):
    pairs = [(noise_png(seed), caption(seed)) for seed in range(32)]
    with ExplainClient(batching_server.target, timeout=300) as client:
        solo = [client.explain(image, text, request_id=f"solo-{i}") for i, (image, text) in enumerate(pairs)]
        before = scrape(batching_server.metrics_url)
        order = list(range(32))
        random.Random(7).shuffle(order)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = {i: pool.submit(client.explain, *pairs[i], request_id=f"req-{i}") for i in order}
            results = {i: f.result() for i, f in futures.items()}
    after = scrape(batching_server.metrics_url)
    tokenizer = open_clip.get_tokenizer(TINY)
    for i, result in results.items():
        assert result.request_id == f"req-{i}"
        ids = tokenizer([pairs[i][1]])[0]
        assert list(result.token_ids) == ids[: int(ids.argmax()) + 1].tolist()
        assert_same(result, solo[i])
    # they really shared batches: 32 requests in fewer than 32 batches
    batches = value(after, "explain_batch_size_count", model="tiny") - value(
        before, "explain_batch_size_count", model="tiny"
    )
    assert batches < 32


def test_result_is_the_same_alone_first_and_last_in_a_full_batch(batching_server):
    target = (noise_png(100), "a small red circle")
    others = [(noise_png(200 + i), caption(200 + i)) for i in range(31)]
    with ExplainClient(batching_server.target, timeout=300) as client:
        alone = client.explain(*target)

        def in_batch(first: bool):
            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                if first:
                    mine = pool.submit(client.explain, *target)
                    time.sleep(0.1)  # arrives first, then the batch fills up
                rest = [pool.submit(client.explain, *pair) for pair in others]
                if not first:
                    time.sleep(0.1)
                    mine = pool.submit(client.explain, *target)
                [f.result() for f in rest]
                return mine.result()

        before = scrape(batching_server.metrics_url)
        first, last = in_batch(True), in_batch(False)
        after = scrape(batching_server.metrics_url)
    assert_same(first, alone)
    assert_same(last, alone)
    full = value(after, "explain_batch_size_bucket", model="tiny", le="32.0") - value(
        after, "explain_batch_size_bucket", model="tiny", le="16.0"
    )
    full_before = value(before, "explain_batch_size_bucket", model="tiny", le="32.0") - value(
        before, "explain_batch_size_bucket", model="tiny", le="16.0"
    )
    assert full - full_before >= 1  # at least one batch of more than 16 ran


def test_undecodable_payloads_in_a_batch_leave_the_others_correct(batching_server):
    """Truncated, empty, random and HTML payloads sent together with valid requests."""
    out = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(out, "JPEG")
    bad = {
        "truncated JPEG": out.getvalue()[: len(out.getvalue()) // 2],
        "zero bytes": b"",
        "random bytes": np.random.default_rng(1).bytes(2000),
        "HTML page": b"<!doctype html><html><body>not an image</body></html>",
    }
    valid = [(noise_png(700 + i), caption(700 + i)) for i in range(4)]
    with ExplainClient(batching_server.target, timeout=300) as client:
        solo = [client.explain(*pair) for pair in valid]
        before = scrape(batching_server.metrics_url)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # within the 400 ms queue delay: one batch
            good = [pool.submit(client.explain, *pair) for pair in valid]
            broken = {kind: pool.submit(client.explain, data, "a cat") for kind, data in bad.items()}
            for kind, future in broken.items():
                with pytest.raises(InvalidArgumentError, match="image: (is empty|could not be decoded)"):
                    future.result()
            for future, want in zip(good, solo):
                assert_same(future.result(), want)
        after = scrape(batching_server.metrics_url)
        assert_same(client.explain(*valid[0]), solo[0])  # and the next batch runs normally
    batches = value(after, "explain_batch_size_count", model="tiny") - value(
        before, "explain_batch_size_count", model="tiny"
    )
    requests = value(after, "explain_batch_size_sum", model="tiny") - value(
        before, "explain_batch_size_sum", model="tiny"
    )
    # bad payloads are refused while being prepared, before they can enter a batch; the valid
    # ones arrived together and shared one
    assert requests == 4 and batches < 4


def test_expired_requests_are_dropped_before_compute(batching_server):
    url = batching_server.metrics_url
    before = scrape(url)
    with ExplainClient(batching_server.target) as client:
        for seed in range(3):  # each waits 400 ms for its batch to fill; the deadline is 100 ms
            with pytest.raises(DeadlineExceededError):
                client.explain(noise_png(300 + seed), "a cat", timeout=0.1)
    deadline = time.monotonic() + 30
    while True:  # the batch thread drops them when their batch starts
        after = scrape(url)
        dropped = value(after, "explain_requests_dropped_total", model="tiny", code="DEADLINE_EXCEEDED") - value(
            before, "explain_requests_dropped_total", model="tiny", code="DEADLINE_EXCEEDED"
        )
        if dropped >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert dropped == 3
    assert value(after, "explain_compute_seconds_count", model="tiny") == value(
        before, "explain_compute_seconds_count", model="tiny"
    )
    # the server counts the calls with the code their callers saw, as it counts the drops
    counts = ended(before, after)
    assert counts == {(name, code): 3.0 * (code == "DEADLINE_EXCEEDED") for name, code in counts}


@pytest.mark.parametrize(
    "timeout, cancel_after, code",
    [
        (30.0, 0.1, "CANCELLED"),  # the caller went away
        # the caller's own deadline timer fired: its cancellation may reach the server a little
        # before the server's copy of the deadline runs out
        (0.3, 0.28, "DEADLINE_EXCEEDED"),
    ],
)
def test_a_call_ended_by_its_caller_is_counted_alike_in_every_series(batching_server, timeout, cancel_after, code):
    url = batching_server.metrics_url
    before = scrape(url)
    with ExplainClient(batching_server.target) as client:
        call = explain_pb2_grpc.ExplainStub(client.channel).Explain.future(
            explain_request(noise_png(350), "a cat"), timeout=timeout
        )
        time.sleep(cancel_after)  # it waits 400 ms in the queue for its batch to fill
        call.cancel()
    deadline = time.monotonic() + 30
    while True:  # the batch thread drops the request when its batch starts
        added = ended(before, scrape(url))
        if sum(added.values()) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert added == {(name, c): float(c == code) for name, c in added}


def test_full_queue_answers_resource_exhausted(small_queue_server):
    # through every block: keeps the single batch slot busy while all 24 calls arrive
    slow = {"text_layer": 0, "image_layer": 0, "n_steps": 512, "method": "riemann_right"}
    with ExplainClient(small_queue_server.target, timeout=300) as client:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(client.explain, noise_png(400 + i), "a dog", **slow) for i in range(24)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result())
                except ResourceExhaustedError as err:
                    outcomes.append(err)
    refused = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
    assert refused and len(refused) < 24
    assert "max_queue_size is 8" in str(refused[0])
    # more explanations in one call than the queue holds
    with ExplainClient(small_queue_server.target, timeout=300) as client, pytest.raises(ResourceExhaustedError):
        client.explain_many([noise_png(1)], [f"caption {i}" for i in range(9)])


def test_one_image_against_eight_captions_computes_its_factor_once(small_queue_server):
    image = noise_png(500)
    captions = [caption(500 + i) + f" number {i}" for i in range(8)]
    url = small_queue_server.metrics_url
    with ExplainClient(small_queue_server.target, timeout=300) as client:
        client_limits = client.server_limits()
        assert client_limits.max_explanations_per_call >= 8
        before = scrape(url)
        many = client.explain_many([image], captions, request_id="many")
        middle = scrape(url)
        again = client.explain_many([image], captions)
        after = scrape(url)
        singles = [client.explain(image, text) for text in captions]

    def delta(a, b, name):
        return value(b, name, model="tiny") - value(a, name, model="tiny")

    assert delta(before, middle, "explain_image_factor_cache_misses_total") == 1
    assert delta(before, middle, "explain_image_factor_cache_hits_total") == 7
    assert delta(before, middle, "explain_text_factor_cache_misses_total") == 8
    assert delta(middle, after, "explain_image_factor_cache_hits_total") == 8  # the second call is all hits
    assert delta(middle, after, "explain_text_factor_cache_hits_total") == 8
    assert [e.request_id for e in many] == [f"many/{i}" for i in range(8)]
    logged = [
        line.split("request ")[1].split()[0]
        for line in small_queue_server.log_path.read_text().splitlines()
        if "request many" in line
    ]
    assert logged == [f"many/{i}" for i in range(8)]  # the server's log names each explanation as its response does
    for got, repeat, single in zip(many, again, singles):
        assert_same(got, single)
        assert_same(repeat, single)


def test_explain_many_needs_one_shared_side(small_queue_server):
    with ExplainClient(small_queue_server.target) as client:
        with pytest.raises(InvalidArgumentError, match="images, captions: send one image"):
            client.explain_many([noise_png(1), noise_png(2)], ["a", "b"])
        with pytest.raises(InvalidArgumentError, match=r"captions\[1\]: must contain text"):
            client.explain_many([noise_png(1)], ["a cat", "  "])
        with pytest.raises(InvalidArgumentError, match=r"images\[1\]: could not be decoded"):
            client.explain_many([noise_png(1), b"<html>not an image</html>"], ["a cat"])


SERIES = [
    "explain_requests_total",
    "explain_request_duration_seconds_bucket",
    "explain_queue_wait_seconds_bucket",
    "explain_compute_seconds_bucket",
    "explain_batch_size_bucket",
    "explain_queue_depth",
    "explain_inflight_requests",
    "explain_requests_dropped_total",
    "explain_text_factor_cache_hits_total",
    "explain_text_factor_cache_misses_total",
    "explain_image_factor_cache_hits_total",
    "explain_image_factor_cache_misses_total",
    "explain_factor_cache_bytes",
    "explain_model_load_seconds",
    "explain_similarity_score_bucket",
    "explain_convergence_delta_abs_bucket",
    "explain_images_skipped_total",
    "explain_internal_errors_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
]


def test_metrics_expose_every_series(batching_server):
    with ExplainClient(batching_server.target) as client:
        client.explain(noise_png(600), "a cat")
        with pytest.raises(InvalidArgumentError):
            client.explain(noise_png(600), "")
    samples = scrape(batching_server.metrics_url)
    names = {name for name, _ in samples}
    assert not [s for s in SERIES if s not in names]
    assert value(samples, "explain_requests_total", model="tiny", code="INVALID_ARGUMENT") >= 1
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="explain.v1.Explain",
            grpc_method="Explain",
            grpc_code="OK",
        )
        >= 1
    )
    buckets = {dict(labels)["le"] for name, labels in samples if name == "explain_request_duration_seconds_bucket"}
    assert "120.0" in buckets  # slow explanations still land in a finite bucket
    assert value(samples, "explain_model_load_seconds", model="tiny") > 0


def test_loadgen_reports_throughput_latency_and_codes(batching_server, tmp_path, capsys):
    report = tmp_path / "report.json"
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    code = loadgen_main(
        [
            "--target",
            batching_server.target,
            "--concurrency",
            "4",
            "--requests",
            "12",
            "--json",
            str(report),
            "--metrics-url",
            unreachable,
        ]
    )
    assert code == 0
    result = json.loads(report.read_text())
    assert result["requests"] == 12 and result["codes"] == {"OK": 12}
    assert result["throughput_per_second"] > 0
    assert 0 < result["latency_seconds"]["p50"] <= result["latency_seconds"]["p90"] <= result["latency_seconds"]["p99"]
    # no metrics page: the run still reports, and says why the hit ratio is missing
    assert result["factor_cache"] is None
    missing = f"the server's factor cache hit ratio is not reported: {unreachable}"
    assert [note for note in result["notes"] if note.startswith(missing)]
    assert "hit ratio is not reported" in capsys.readouterr().out


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The server's defaults: batching, and the factor cache on."""
    proc = start(tmp_path_factory, "defaults")
    yield proc
    proc.stop()


def cache_lookups(samples: dict) -> dict[str, float]:
    return {
        f"{side}_{outcome}": value(samples, f"explain_{side}_factor_cache_{outcome}_total", model="tiny")
        for side in ("text", "image")
        for outcome in ("hits", "misses")
    }


def test_loadgen_by_default_sends_new_inputs_that_the_cache_never_answers(default_server, tmp_path, capsys):
    report = tmp_path / "report.json"
    before = scrape(default_server.metrics_url)
    code = loadgen_main(
        [
            "--target",
            default_server.target,
            "--metrics-url",
            default_server.metrics_url,
            "--concurrency",
            "4",
            "--requests",
            "24",
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    after = scrape(default_server.metrics_url)
    assert code == 0
    result = json.loads(report.read_text())
    assert result["codes"] == {"OK": 24} and result["inputs"] == "distinct"
    # every request was a text and an image lookup, and every one missed
    cache = result["factor_cache"]
    assert cache["text"] == cache["image"] == {"hits": 0, "misses": 24, "hit_ratio": 0}
    assert cache["hit_ratio"] == 0 and cache["url"] == default_server.metrics_url
    assert "hit ratio 0.0% (hits: text 0 of 24, image 0 of 24" in out
    assert f"inputs: distinct, seed {result['seed']}" in out
    # what loadgen read is what the server counted (prometheus-client's parser)
    counted = cache_lookups(after)
    assert {key: counted[key] - old for key, old in cache_lookups(before).items()} == {
        "text_hits": 0,
        "text_misses": 24,
        "image_hits": 0,
        "image_misses": 24,
    }
    with urllib.request.urlopen(default_server.metrics_url, timeout=10) as response:
        assert factor_cache_counts(response.read().decode()) == counted


def test_loadgen_repeat_inputs_is_answered_by_the_cache(default_server, tmp_path):
    report = tmp_path / "report.json"
    code = loadgen_main(
        [
            "--target",
            default_server.target,
            "--metrics-url",
            default_server.metrics_url,
            "--repeat-inputs",
            "--seed",
            "1",
            "--image-sides",
            "64",
            "160",
            "--concurrency",
            "4",
            "--requests",
            "40",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    cache = json.loads(report.read_text())["factor_cache"]
    # the fixed mix holds 8 images and 10 captions: each is computed once, then answered by the cache
    assert (cache["image"]["misses"], cache["image"]["hits"]) == (8, 32)
    assert (cache["text"]["misses"], cache["text"]["hits"]) == (10, 30)
    assert cache["hit_ratio"] == pytest.approx(62 / 80)


def test_loadgen_reports_no_latency_when_no_call_succeeds(default_server, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = loadgen_main(
        [
            "--target",
            default_server.target,
            "--metrics-url",
            default_server.metrics_url,
            "--model",
            "no-such-model",
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--json",
            str(report),
        ]
    )
    assert code == 1
    result = json.loads(report.read_text())
    assert result["codes"] == {"NOT_FOUND": 4} and result["latency_seconds"] == {}
    # the server's reason, once however many calls gave it
    (message,) = result["messages"]["NOT_FOUND"]
    assert "no-such-model" in message
    out = capsys.readouterr().out
    assert "latency: no call succeeded" in out and f"  NOT_FOUND: {message}" in out
