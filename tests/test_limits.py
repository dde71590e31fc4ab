"""Message and image size limits: the same in the server, the client defaults and ListModels."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from test_batching import scrape

from explain_api import explain_pb2, explain_pb2_grpc
from explain_client import DeadlineExceededError, ExplainClient, InvalidArgumentError, MessageTooLargeError
from explain_client.client import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, DEFAULT_MAX_SEND_MESSAGE_BYTES

pytestmark = pytest.mark.integration

CAPTION = "a red circle"


def test_list_models_reports_the_limits_the_client_assumes(client):
    limits = client.server_limits()
    assert limits.max_message_bytes == DEFAULT_MAX_SEND_MESSAGE_BYTES == DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    assert (limits.max_image_pixels, limits.max_image_side) == (50_000_000, 20_000)
    assert limits.max_pixels_per_call == 800_000_000  # 64 photos of 12.5 megapixels


def test_a_16_mb_image_is_accepted(client):
    noise = np.random.default_rng(0).integers(0, 256, size=(2400, 2400, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG", compress_level=0)
    data = out.getvalue()
    assert len(data) > 16 * 2**20
    assert client.explain(data, CAPTION).image_size == (2400, 2400)


def test_the_client_refuses_an_oversized_request_before_sending(server):
    limit = 1 << 20
    with ExplainClient(server.target, options=[("grpc.max_send_message_length", limit)]) as small:
        with pytest.raises(MessageTooLargeError) as info:
            small.explain(b"\x00" * (limit + 1), CAPTION)
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.limit == limit and err.size > limit
    assert f"the request is {err.size} bytes, above the limit of {limit} bytes" in str(err)


def test_the_server_refuses_messages_over_its_limit(server):
    huge = 65 << 20
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", huge + 1024)]) as channel:
        stub = explain_pb2_grpc.ExplainStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(explain_pb2.ExplainRequest(image=b"\x00" * huge, caption=CAPTION), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_image_size_limits_are_enforced_by_the_server(client):
    out = io.BytesIO()
    Image.new("L", (20_001, 1)).save(out, format="PNG")
    with pytest.raises(InvalidArgumentError, match="image: is 20001x1; the limit is 20000 pixels per side"):
        client.explain(out.getvalue(), CAPTION)


def test_the_pixels_of_a_call_are_capped_from_the_headers_before_decoding(client):
    out = io.BytesIO()
    Image.new("RGB", (7000, 7000), (200, 30, 30)).save(out, format="PNG")
    # a valid header (49 M pixels, under the per-image limit) on pixel data cut short: decoding
    # it fails, so only a check made before decoding can answer with the per-call limit
    cut = out.getvalue()[: len(out.getvalue()) // 2]
    with pytest.raises(InvalidArgumentError) as info:
        client.explain_many([cut] * 17, [CAPTION])
    assert str(info.value) == (
        "INVALID_ARGUMENT: images: 17 image(s) of 833000000 pixels in all; the limit is 800000000 pixels per call "
        "(send fewer or smaller images per call)"
    )
    with pytest.raises(InvalidArgumentError, match=r"^INVALID_ARGUMENT: images\[0\]: could not be decoded"):
        client.explain_many([cut] * 16, [CAPTION])  # 784 M pixels: within the limit, so it is decoded


def test_calls_whose_deadline_passes_at_once_end_deadline_exceeded_and_are_no_bug(server):
    """A deadline can pass before the server has decoded the image: gRPC answers the caller
    DEADLINE_EXCEEDED, and the server must not count that as a server bug or log a traceback."""
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image, "PNG")

    def internal_errors() -> float:  # every model's, "" included
        return sum(v for (name, _), v in scrape(server.metrics_url).items() if name == "explain_internal_errors_total")

    before = internal_errors()
    expired = 0
    with ExplainClient(server.target) as client:
        for i in range(100):
            # once the image's factor is cached, a tiny model can answer a new caption within the
            # longest of these deadlines: an answer is fine, any other error is not
            try:
                client.explain(image.getvalue(), f"a red circle {i}", timeout=0.0005 * (1 + i % 20))
            except DeadlineExceededError:
                expired += 1
    assert expired >= 50
    assert internal_errors() == before
