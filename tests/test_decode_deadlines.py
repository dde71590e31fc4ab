"""Decoding on the prepare threads: calls that ended stop decoding, and waiting for a thread is queue time.

In-process (the real service on a tiny seeded model, grpc.aio on loopback), so that the test
can hold the prepare threads and read the server's log and metrics directly.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
import time

import grpc
import pytest
from inprocess import Served, serving, tiny_model
from PIL import Image
from test_batching import noise_png

from explain_api import explain_pb2
from explain_client.client import explain_request
from explain_server.service import _PREPARE_THREADS

pytestmark = pytest.mark.unit

SKIPPED = re.compile(r"request (\S+) model=tiny: ended \((\w+)\) with (\d+) of its (\d+) image\(s\) not decoded")


@pytest.fixture(scope="module")
def loaded():
    return tiny_model()


def skipped_by_request(caplog) -> dict[str, tuple[str, int, int]]:
    """{request id: (code, images skipped, images sent)} from the server's log."""
    found = {}
    for record in caplog.records:
        if match := SKIPPED.match(record.getMessage()):
            request_id, code, skipped, total = match.groups()
            found[request_id] = (code, int(skipped), int(total))
    return found


async def until(condition, what: str) -> None:
    """Poll ``condition`` on the event loop; give up after a minute, naming ``what``."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still waiting for {what}")


async def accepted(served: Served, calls: int) -> None:
    # A handler hands its call to the prepare pool in the same step that counts it accepted.
    await until(lambda: served.service.lifecycle.inflight >= calls, f"{calls} accepted call(s)")


def test_calls_past_their_deadline_stop_decoding_and_a_cheap_call_still_succeeds(loaded, caplog):
    caplog.set_level(logging.INFO, logger="explain_server")
    out = io.BytesIO()
    Image.new("RGB", (4000, 4000), (200, 30, 30)).save(out, "PNG")  # 16 M pixels in 56 KB
    large = out.getvalue()
    count = 12  # 192 M pixels per call, under the per-call limit; seconds of decoding each
    cheap = explain_request(noise_png(960), "a red circle", request_id="cheap")

    async def scenario():
        async with serving(loaded) as served:
            first = await served.stub.Explain(cheap, timeout=300)  # its factors are cached from now on
            expiring = [
                served.stub.ExplainMany(
                    explain_pb2.ExplainManyRequest(
                        images=[large] * count, captions=["a red square"], request_id=f"large-{i}"
                    ),
                    timeout=1.0,
                )
                for i in range(2)
            ]
            await accepted(served, 2)  # they hold both prepare threads; the cheap call waits behind them
            again = await served.stub.Explain(cheap, timeout=300)
            ended = await asyncio.gather(*expiring, return_exceptions=True)
            await until(
                lambda: {"large-0", "large-1"} <= set(skipped_by_request(caplog)), "both calls to stop decoding"
            )
            return served, first, again, ended

    served, first, again, ended = asyncio.run(scenario())
    assert [err.code() for err in ended] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    assert again.score == first.score and again.attribution.data == first.attribution.data
    skipped = skipped_by_request(caplog)
    for request_id in ("large-0", "large-1"):
        code, images, sent = skipped[request_id]
        assert code == "DEADLINE_EXCEEDED" and sent == count and images >= 1
    total = skipped["large-0"][1] + skipped["large-1"][1]
    assert served.sample("explain_images_skipped_total", model="tiny", code="DEADLINE_EXCEEDED") == total
    assert served.sample("explain_requests_total", model="tiny", code="DEADLINE_EXCEEDED") == 2


def test_waiting_for_a_prepare_thread_counts_as_queue_time(loaded, caplog):
    caplog.set_level(logging.INFO, logger="explain_server")
    release = threading.Event()

    async def scenario():
        async with serving(loaded) as served:
            for _ in range(_PREPARE_THREADS):  # stand-ins for other calls' decoding
                served.service._preparing.submit(release.wait)
            call = served.stub.Explain(explain_request(noise_png(970), "a cat", request_id="waits"), timeout=300)
            await accepted(served, 1)
            since = time.perf_counter()
            await asyncio.sleep(0.5)
            held = time.perf_counter() - since
            release.set()
            return served, held, await call

    served, held, response = asyncio.run(scenario())
    # the call was queued for a thread before ``since`` and got one only after ``release``
    assert response.timings.queue_seconds >= held
    assert served.sample("explain_queue_wait_seconds_sum", model="tiny") == response.timings.queue_seconds
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request waits ")]
    assert len(logged) == 1 and f"queue={response.timings.queue_seconds:.3f}s" in logged[0]


def test_a_call_cancelled_while_waiting_for_a_thread_decodes_nothing(loaded, caplog):
    caplog.set_level(logging.INFO, logger="explain_server")
    release = threading.Event()

    async def scenario():
        async with serving(loaded) as served:
            for _ in range(_PREPARE_THREADS):
                served.service._preparing.submit(release.wait)
            call = served.stub.ExplainMany(
                explain_pb2.ExplainManyRequest(
                    images=[noise_png(980 + i) for i in range(3)], captions=["a cat"], request_id="gone"
                ),
                timeout=300,
            )
            await accepted(served, 1)
            call.cancel()
            await until(lambda: "gone" in skipped_by_request(caplog), "the call to be skipped")
            release.set()
            return served

    served = asyncio.run(scenario())
    assert skipped_by_request(caplog)["gone"] == ("CANCELLED", 3, 3)
    assert served.sample("explain_images_skipped_total", model="tiny", code="CANCELLED") == 3
    assert served.sample("explain_requests_total", model="tiny", code="CANCELLED") == 1
