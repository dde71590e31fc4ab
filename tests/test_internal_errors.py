"""Server bugs end calls INTERNAL with an error id, never UNKNOWN, and fail no other request of their batch.

Faults are injected in-process into the real service (tiny seeded model, grpc.aio on loopback).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from inprocess import serving, tiny_model
from test_batching import noise_png

from explain_api import explain_pb2
from explain_client.client import explain_request
from explain_server import service as service_module
from explain_server.batching import DynamicBatcher
from explain_server.inputs import decode_image, tokenize
from explain_server.settings import BatchingConfig, ImageLimits

pytestmark = pytest.mark.unit

POISON = "a poisoned caption"
ERROR_ID = re.compile(r"^internal server error ([0-9a-f]{12}): a bug in the server, not a problem with the request")
EXPLAIN = {"grpc_type": "unary", "grpc_service": "explain.v1.Explain"}


@pytest.fixture(scope="module")
def loaded():
    return tiny_model()


def error_id(err: grpc.aio.AioRpcError) -> str:
    assert err.code() == grpc.StatusCode.INTERNAL, (err.code(), err.details())
    match = ERROR_ID.match(err.details())
    assert match, err.details()
    return match.group(1)


def logged_traceback(caplog, error_id: str) -> str:
    """The traceback logged under ``error_id`` (exactly one record names it)."""
    records = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info, [r.getMessage() for r in records]
    return logging.Formatter().formatException(records[0].exc_info)


def test_a_request_that_trips_a_bug_fails_alone_and_the_rest_of_its_batch_succeeds(loaded, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="explain_server")
    pairs = [(noise_png(900 + i), text) for i, text in enumerate(["a red circle", POISON, "a cat", "two blue squares"])]
    expected = {
        text: loaded.explainer.explain(
            tokenize(loaded.tokenizer, text).token_ids,
            loaded.transform(decode_image(image, ImageLimits())),
            text_layer=loaded.default_text_layer,
            image_layer=loaded.default_image_layer,
            method=loaded.default_method,
            n_steps=loaded.default_n_steps,
        )
        for image, text in pairs
        if text != POISON
    }
    poison_ids = tokenize(loaded.tokenizer, POISON).token_ids
    factors = loaded.explainer.factors

    def poisoned(tower: str, sides: list) -> list:
        if tower is loaded.explainer.text and any(torch.equal(side.inputs, poison_ids) for side in sides):
            raise RuntimeError("injected fault: the engine cannot take this caption")
        return factors(tower, sides)

    monkeypatch.setattr(loaded.explainer, "factors", poisoned)
    # the batch starts when its fourth request arrives, so all four share it; no cache, so
    # every side is computed in it
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_seconds=300)

    async def scenario():
        async with serving(loaded, batching=batching, cache_bytes=0) as served:
            calls = [served.stub.Explain(explain_request(image, text), timeout=300) for image, text in pairs]
            return served, await asyncio.gather(*calls, return_exceptions=True)

    served, outcomes = asyncio.run(scenario())
    for (image, text), outcome in zip(pairs, outcomes):
        if text == POISON:
            continue
        assert isinstance(outcome, explain_pb2.ExplainResponse), outcome
        want = expected[text]
        assert outcome.score == pytest.approx(want.score, abs=1e-5)
        got = np.frombuffer(outcome.attribution.data, dtype="<f4").reshape(tuple(outcome.attribution.shape))
        np.testing.assert_allclose(got, want.interactions[:, 1:].reshape(got.shape), rtol=1e-5, atol=1e-6)
    traceback = logged_traceback(caplog, error_id(outcomes[1]))
    assert "RuntimeError: injected fault: the engine cannot take this caption" in traceback
    # one batch of four, then each of its requests alone
    assert served.sample("explain_batch_size_count", model="tiny") == 5
    assert served.sample("explain_batch_size_sum", model="tiny") == 8
    assert served.sample("explain_batch_size_bucket", model="tiny", le="2.0") == 4
    assert any(
        "a batch of 4 raised; running each of its items alone" in r.getMessage() and r.exc_info for r in caplog.records
    )
    assert served.sample("explain_internal_errors_total", model="tiny") == 1
    assert served.sample("explain_requests_total", model="tiny", code="INTERNAL") == 1
    assert served.sample("explain_requests_total", model="tiny", code="OK") == 3
    handled = {
        code: served.sample("grpc_server_handled_total", **EXPLAIN, grpc_method="Explain", grpc_code=code)
        for code in ("OK", "INTERNAL", "UNKNOWN")
    }
    assert handled == {"OK": 3, "INTERNAL": 1, "UNKNOWN": 0}


def test_a_bug_while_building_a_response_is_internal(loaded, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="explain_server")

    def broken_crop_box(*args):
        raise ZeroDivisionError("injected fault in crop_box")

    monkeypatch.setattr(service_module, "crop_box", broken_crop_box)

    async def scenario():
        async with serving(loaded) as served:
            outcomes = {}
            for method, call in [
                ("Explain", served.stub.Explain(explain_request(noise_png(950), "a cat"), timeout=300)),
                (
                    "ExplainMany",
                    served.stub.ExplainMany(
                        explain_pb2.ExplainManyRequest(images=[noise_png(951)], captions=["a cat", "a dog"]),
                        timeout=300,
                    ),
                ),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                outcomes[method] = info.value
            return served, outcomes

    served, outcomes = asyncio.run(scenario())
    for method, err in outcomes.items():
        assert "ZeroDivisionError: injected fault in crop_box" in logged_traceback(caplog, error_id(err))
        assert served.sample("grpc_server_handled_total", **EXPLAIN, grpc_method=method, grpc_code="INTERNAL") == 1
        assert served.sample("grpc_server_handled_total", **EXPLAIN, grpc_method=method, grpc_code="UNKNOWN") == 0
    assert served.sample("explain_internal_errors_total", model="tiny") == 2
    assert served.sample("explain_requests_total", model="tiny", code="INTERNAL") == 2


def test_a_bug_in_list_models_or_another_service_is_internal(loaded, monkeypatch, caplog):
    """The metrics interceptor answers INTERNAL for any unary handler that raises, counted under model ""."""
    caplog.set_level(logging.INFO, logger="explain_server")

    def broken_model_info(*args):
        raise KeyError("injected fault in _model_info")

    async def broken_check(self, request, context):
        raise AttributeError("injected fault in Health.Check")

    monkeypatch.setattr(service_module, "_model_info", broken_model_info)
    monkeypatch.setattr(health.aio.HealthServicer, "Check", broken_check)

    async def scenario():
        async with serving(loaded) as served:
            errors = []
            for call in (
                served.stub.ListModels(explain_pb2.ListModelsRequest(), timeout=60),
                health_pb2_grpc.HealthStub(served.channel).Check(health_pb2.HealthCheckRequest(), timeout=60),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                errors.append(info.value)
            return served, errors

    served, (list_models, check) = asyncio.run(scenario())
    assert "KeyError: 'injected fault in _model_info'" in logged_traceback(caplog, error_id(list_models))
    assert "AttributeError: injected fault in Health.Check" in logged_traceback(caplog, error_id(check))
    assert served.sample("explain_internal_errors_total", model="") == 2
    assert served.sample("explain_internal_errors_total", model="tiny") == 0
    for service, method in (("explain.v1.Explain", "ListModels"), ("grpc.health.v1.Health", "Check")):
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
        assert served.sample("grpc_server_handled_total", **labels, grpc_code="INTERNAL") == 1
        assert served.sample("grpc_server_handled_total", **labels, grpc_code="UNKNOWN") == 0


def test_the_batcher_runs_each_item_of_a_failed_batch_alone():
    """Only the item that raises alone fails; the others get their own results."""
    runs: list[list[int]] = []
    all_queued = threading.Event()

    def run_batch(items: list[int]) -> list:
        all_queued.wait()
        runs.append(items)
        if 13 in items:
            raise ValueError(f"cannot take 13 (batch {items})")
        return [item * 10 for item in items]

    async def scenario():
        batcher = DynamicBatcher("test", run_batch, BatchingConfig(max_batch_size=4), lambda depth: None)
        try:
            futures = batcher.submit([1, 13, 3, 4])
            all_queued.set()
            return await asyncio.gather(*map(asyncio.wrap_future, futures), return_exceptions=True)
        finally:
            batcher.close()

    one, thirteen, three, four = asyncio.run(scenario())
    assert (one, three, four) == (10, 30, 40)
    assert isinstance(thirteen, ValueError) and str(thirteen) == "cannot take 13 (batch [13])"
    assert runs == [[1, 13, 3, 4], [1], [13], [3], [4]]
