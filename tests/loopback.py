"""gRPC servers run in the test process, on a free loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from explain_server.launcher import HOST


def bind(server: grpc.Server | grpc.aio.Server) -> str:
    """Bind ``server`` (not yet started) to a free plaintext port on ``HOST``; its target."""
    # port 0: the server takes a port itself, so nothing can take it in between
    return f"{HOST}:{server.add_insecure_port(f'{HOST}:0')}"


@contextlib.asynccontextmanager
async def started(server: grpc.aio.Server) -> AsyncIterator[str]:
    """Serve ``server`` (its services added, not yet started) on a free port of ``HOST`` with the
    health service added, SERVING; yield its target, and stop it afterwards."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    target = bind(server)
    await server.start()
    try:
        yield target
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def in_process(
    server: grpc.aio.Server, channel_options: Sequence[tuple[str, object]] = ()
) -> AsyncIterator[grpc.aio.Channel]:
    """:func:`started`, yielding a plaintext channel to the server instead of its target."""
    async with started(server) as target, grpc.aio.insecure_channel(target, options=channel_options) as channel:
        yield channel
