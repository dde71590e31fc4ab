"""What the server's interceptors share: a replaced behaviour keeps its method's streaming kind
and codecs, and unary and streaming calls are guarded alike (in-process grpc.aio on loopback)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loopback import in_process

from explain_server.interceptors import replace_behavior
from explain_server.security import BearerTokenInterceptor

pytestmark = pytest.mark.unit

CONSTRUCTORS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def deserialize(data: bytes) -> str:
    return data.decode()


def serialize(message: str) -> bytes:
    return message.encode()


def own(request, context):
    return "own"


def new(request, context):
    return "new"


@pytest.mark.parametrize("kind", CONSTRUCTORS)
def test_a_replaced_behaviour_keeps_the_streaming_kind_and_the_codecs(kind):
    handler = CONSTRUCTORS[kind](own, request_deserializer=deserialize, response_serializer=serialize)
    replaced = replace_behavior(handler, new)
    assert (replaced.request_streaming, replaced.response_streaming) == (
        handler.request_streaming,
        handler.response_streaming,
    )
    assert {name: getattr(replaced, name) for name in CONSTRUCTORS} == {
        name: new if name == kind else None for name in CONSTRUCTORS
    }
    assert (replaced.request_deserializer, replaced.response_serializer) == (deserialize, serialize)
    parsing = replace_behavior(handler, new, request_deserializer=bytes.hex)
    assert (parsing.request_deserializer, parsing.response_serializer) == (bytes.hex, serialize)


async def _outcome(call) -> grpc.StatusCode:
    """How a unary call, or the first message of a streaming one, ends."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await call.read()
            call.cancel()
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_bearer_tokens_guard_unary_and_streaming_calls_alike():
    """Health Check (unary) and Watch (server streaming), without and with a token; a method
    the server lacks passes by the interceptor to gRPC's UNIMPLEMENTED."""

    async def scenario() -> dict:
        server = grpc.aio.server(interceptors=[BearerTokenInterceptor(["s3cret"], exempt=())])
        async with in_process(server) as channel:
            stub, request = health_pb2_grpc.HealthStub(channel), health_pb2.HealthCheckRequest()
            outcomes = {}
            for token in ("", "s3cret"):
                metadata = (("authorization", f"Bearer {token}"),) if token else None
                outcomes[token, "Check"] = await _outcome(stub.Check(request, metadata=metadata, timeout=10))
                outcomes[token, "Watch"] = await _outcome(stub.Watch(request, metadata=metadata, timeout=10))
            outcomes["", "Missing"] = await _outcome(channel.unary_unary("/no.such.Service/Missing")(b"", timeout=10))
            return outcomes

    assert asyncio.run(scenario()) == {
        ("", "Check"): grpc.StatusCode.UNAUTHENTICATED,
        ("", "Watch"): grpc.StatusCode.UNAUTHENTICATED,
        ("s3cret", "Check"): grpc.StatusCode.OK,
        ("s3cret", "Watch"): grpc.StatusCode.OK,
        ("", "Missing"): grpc.StatusCode.UNIMPLEMENTED,
    }
