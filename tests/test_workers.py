"""Model workers in processes of their own: crashes, instances and shutdown, on the real server."""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import TINY, TINY_CONFIG
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_batching import caption, noise_png, scrape, value

from explain_client import ExplainClient, ExplainError
from explain_server.launcher import ServerProcess, is_worker, process_tree

pytestmark = pytest.mark.integration

# about half a second per call on the tiny model: calls are in flight when the worker dies
SLOW = {"text_layer": 0, "image_layer": 0, "method": "riemann_right", "n_steps": 400}


def tiny_server(tmp_path: pathlib.Path, *extra: str) -> ServerProcess:
    return ServerProcess(
        ["--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0", "--max-n-steps", "1000", *extra],
        tmp_path / f"server-{time.monotonic_ns()}.log",
    ).wait_serving()


def workers(pid: int) -> set[int]:
    """The worker processes of the server ``pid``."""
    return {child for child in process_tree(pid)[1:] if is_worker(child)}


def alive(pid: int) -> bool:
    """Running: its /proc entry exists and it is not a zombie awaiting its reaper."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


def test_a_killed_worker_fails_only_its_calls_with_unavailable_and_comes_back(tmp_path):
    server = tiny_server(tmp_path)
    try:
        (worker,) = workers(server.process.pid)
        deadline_seconds = 60.0
        outcomes: list[tuple[str, float]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def caller(index: int) -> None:
            with ExplainClient(server.target, timeout=deadline_seconds) as client:
                n = 0
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        client.explain(noise_png(10_000 * index + n), caption(n), **SLOW)
                        code = "OK"
                    except ExplainError as err:
                        code = err.code.name
                    with lock:
                        outcomes.append((code, time.monotonic() - start))
                    n += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        os.kill(worker, signal.SIGKILL)
        # the front end notices at once and reports the model NOT_SERVING until a new worker is warm
        deadline = time.monotonic() + 10
        while health(server.target, "explain.v1.Explain/tiny") == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the model stayed SERVING after its worker died"
            time.sleep(0.01)
        deadline = time.monotonic() + 120
        while health(server.target) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the model never served again"
            time.sleep(0.1)
        time.sleep(2.0)  # calls go through the new worker
        stop.set()
        for thread in threads:
            thread.join(timeout=deadline_seconds + 10)
            assert not thread.is_alive(), "a call hung"
        codes = [code for code, _ in outcomes]
        assert set(codes) <= {"OK", "UNAVAILABLE"}, sorted(set(codes))
        assert "UNAVAILABLE" in codes and codes[-16:].count("OK") == 16
        assert max(seconds for _, seconds in outcomes) < deadline_seconds
        assert value(scrape(server.metrics_url), "explain_worker_restarts_total", model="tiny") == 1
        (new_worker,) = workers(server.process.pid)
        assert new_worker != worker
        log = server.log_path.read_text()
        assert f"model tiny worker 0 (pid {worker}) ended with exit code -9" in log
        with ExplainClient(server.target, timeout=60) as client:
            assert np.isfinite(client.explain(noise_png(7), "a red circle").attribution).all()
    finally:
        server.stop()


def test_two_instances_answer_as_one_does(tmp_path):
    pairs = [(noise_png(500 + i), caption(i)) for i in range(12)]
    results = {}
    for instances in ("1", "2"):
        server = tiny_server(tmp_path, "--instances", instances)
        try:
            assert len(workers(server.process.pid)) == int(instances)
            with ExplainClient(server.target, timeout=120) as client:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(8) as pool:
                    results[instances] = list(pool.map(lambda pair: client.explain(*pair), pairs))
            if instances == "2":
                log = server.log_path.read_text()
                assert "model tiny worker 0 ready" in log and "model tiny worker 1 ready" in log
        finally:
            assert server.stop() == 0
    for one, two in zip(results["1"], results["2"]):
        np.testing.assert_allclose(two.attribution, one.attribution, rtol=1e-5, atol=1e-7)
        # a cosine: batch composition moves float32 results by rounding only (1e-5, as the engine's tests)
        assert two.score == pytest.approx(one.score, rel=1e-5, abs=1e-6)


def test_sigterm_leaves_no_process_and_no_shared_memory(tmp_path):
    shm_before = set(os.listdir("/dev/shm"))
    server = tiny_server(tmp_path, "--instances", "2")
    spawned = set(process_tree(server.process.pid)[1:])
    assert len(workers(server.process.pid)) == 2
    with ExplainClient(server.target, timeout=120) as client:
        for i in range(4):
            client.explain(noise_png(600 + i), caption(i))
    assert server.stop() == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in spawned):
        assert time.monotonic() < deadline, [pid for pid in spawned if alive(pid)]
        time.sleep(0.1)
    assert set(os.listdir("/dev/shm")) - shm_before == set()
