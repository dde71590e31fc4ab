"""Restarts and shutdown of the real server process: determinism, draining, grace periods."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import TINY, TINY_CONFIG
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_end_to_end import noise_image

from explain_client import ExplainClient, ExplainError, UnavailableError
from explain_server.launcher import ServerProcess

pytestmark = pytest.mark.integration

CAPTION = "a red circle and a blue square"
# Through every block of the tiny model: about 6 s of an idle 2-core machine, long enough to be
# unfinished a second after the grace period of 1 s that follows a second of it.
SLOWER = {"text_layer": 0, "image_layer": 0, "method": "riemann_right", "n_steps": 16000}


def tiny_server(tmp_path, *extra: str) -> ServerProcess:
    return ServerProcess(
        ["--model-config", str(TINY_CONFIG), "--model", f"tiny={TINY}:random:0", "--max-n-steps", "50000", *extra],
        tmp_path / f"server-{time.monotonic_ns()}.log",
    ).wait_serving()


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def in_background(fn, *args, **kwargs) -> dict:
    """Run fn in a thread; the returned dict gets 'result' or 'error' when it ends."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except ExplainError as err:
            outcome["error"] = err

    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def test_results_are_bitwise_identical_across_calls_and_restarts(tmp_path):
    image = noise_image(96, 64)
    runs = []
    for _ in range(2):
        server = tiny_server(tmp_path)
        try:
            with ExplainClient(server.target, timeout=120) as client:
                runs += [client.explain(image, CAPTION) for _ in range(5)]
        finally:
            server.stop()
    first = runs[0]
    for other in runs[1:]:
        assert other.attribution.tobytes() == first.attribution.tobytes()
        assert other.cls_attribution.tobytes() == first.cls_attribution.tobytes()
        assert (other.score, other.convergence_delta, other.reference_terms) == (
            first.score,
            first.convergence_delta,
            first.reference_terms,
        )


def test_sigterm_drains_accepted_work_and_refuses_new_calls(tmp_path):
    # SLOWER takes seconds: when the signal comes one call computes and two wait, so there is
    # work to drain.
    server = tiny_server(tmp_path, "--grace-seconds", "300")
    with ExplainClient(server.target, timeout=600) as client:
        slow = [in_background(client.explain, noise_image(64, 64, seed=i), CAPTION, **SLOWER) for i in range(3)]
        time.sleep(1.0)  # one computing, two queued behind it
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while health(server.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(UnavailableError, match="shutting down"):
            client.explain(noise_image(64, 64), CAPTION)
        for outcome in slow:
            outcome["thread"].join(timeout=600)
            assert "result" in outcome, outcome.get("error")
            assert np.isfinite(outcome["result"].attribution).all()
    assert server.process.wait(timeout=30) == 0
    assert server.log_path.read_text().rstrip().endswith("stopped; every accepted call was answered")


def test_work_unfinished_after_the_grace_period_gets_unavailable(tmp_path):
    grace = 1.0
    server = tiny_server(tmp_path, "--grace-seconds", str(grace))
    with ExplainClient(server.target, timeout=120) as client:
        slow = in_background(client.explain, noise_image(64, 64), CAPTION, **SLOWER)
        time.sleep(1.0)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        slow["thread"].join(timeout=60)
        code = server.process.wait(timeout=30)
        exited_after = time.monotonic() - start
    assert isinstance(slow.get("error"), UnavailableError)
    assert "shut down before this request finished" in slow["error"].details
    assert code == 0 and exited_after <= grace + 2.0
