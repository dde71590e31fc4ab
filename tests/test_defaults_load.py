"""What a user runs: `explain-server` with no flags, under concurrent load that never repeats.

The server gets only its ports: the embedded default model (shapes) with its own default
settings (block 0 of both towers, 8 trapezoid nodes), the default batcher and cache. Callers
send distinct photo-like images (crops of photographs, 64-800 px, JPEG and PNG) and captions of
1-30 words, at concurrency 16, beside ExplainMany calls in both directions. Every answer must be
OK and well formed, and the server's log must hold no traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from explain_api import explain_pb2, explain_pb2_grpc
from explain_client.client import explain_request
from explain_client.workload import distinct_requests
from explain_server.launcher import ServerProcess

pytestmark = pytest.mark.slow

CONCURRENCY = 16
EXPLAIN_CALLS = 64
# ExplainMany beside them: one image against several captions, and one caption against several images
MANY_CALLS = 4
PER_MANY = 3
DEADLINE = 600  # seconds: generous on 2 CPU cores; what is asserted is every answer's code


def check(response: explain_pb2.ExplainResponse) -> None:
    """A well-formed explanation: one row per token, an 8x8 grid, every number finite."""
    shape = tuple(response.attribution.shape)
    grid = np.frombuffer(response.attribution.data, dtype="<f4").reshape(shape)
    assert shape[1:] == (8, 8) and shape[0] == len(response.tokens) == len(response.token_ids)
    assert np.isfinite(grid).all() and np.isfinite([response.score, response.convergence_delta]).all()
    assert (response.options.text_layer, response.options.image_layer) == (0, 0)
    assert (response.options.method, response.options.n_steps) == ("riemann_trapezoid", 8)


async def load(target: str) -> tuple[list[grpc.StatusCode], list[str]]:
    pairs = iter(distinct_requests(EXPLAIN_CALLS + 2 * MANY_CALLS * PER_MANY, seed=21))
    explains = [explain_request(image, caption) for image, caption in itertools.islice(pairs, EXPLAIN_CALLS)]
    manys = []
    for index in range(MANY_CALLS):
        group = list(itertools.islice(pairs, PER_MANY))
        if index % 2:
            manys.append(explain_pb2.ExplainManyRequest(images=[group[0][0]], captions=[c for _, c in group]))
        else:
            manys.append(explain_pb2.ExplainManyRequest(images=[i for i, _ in group], captions=[group[0][1]]))
    codes: list[grpc.StatusCode] = []
    failures: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = explain_pb2_grpc.ExplainStub(channel)
        queue = iter(explains)

        async def caller() -> None:
            for request in queue:
                try:
                    check(await stub.Explain(request, timeout=DEADLINE))
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
                    failures.append(f"Explain: {err.code().name}: {err.details()}")

        async def many(request: explain_pb2.ExplainManyRequest) -> None:
            try:
                response = await stub.ExplainMany(request, timeout=DEADLINE)
                assert len(response.explanations) == PER_MANY
                for explanation in response.explanations:
                    check(explanation)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
                failures.append(f"ExplainMany: {err.code().name}: {err.details()}")

        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)), *(many(r) for r in manys))
    return codes, failures


def test_defaults_answer_every_call_of_distinct_concurrent_traffic(tmp_path):
    server = ServerProcess([], tmp_path / "server.log").wait_serving()
    try:
        codes, failures = asyncio.run(load(server.target))
        with urllib.request.urlopen(server.metrics_url, timeout=10) as page:
            samples = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(page.read().decode())
                for sample in family.samples
            }
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert failures == [], failures[:5]
    assert codes == [grpc.StatusCode.OK] * (EXPLAIN_CALLS + MANY_CALLS)
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:3000]
    # concurrent calls did share batches
    assert samples[("explain_batch_size_count", (("model", "shapes"),))] < EXPLAIN_CALLS + MANY_CALLS * PER_MANY
