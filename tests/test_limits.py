"""Message and image size limits: the same in the server, the client defaults and ListModels."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from explain_client import ExplainClient, InvalidArgumentError, MessageTooLargeError
from explain_client._proto import explain_pb2, explain_pb2_grpc
from explain_client.client import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, DEFAULT_MAX_SEND_MESSAGE_BYTES

CAPTION = "a red circle"


def test_list_models_reports_the_limits_the_client_assumes(client):
    limits = client.server_limits()
    assert limits.max_message_bytes == DEFAULT_MAX_SEND_MESSAGE_BYTES == DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    assert (limits.max_image_pixels, limits.max_image_side) == (50_000_000, 20_000)


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
