"""The real Explain service on a grpc.aio server inside the test process, where faults can be injected."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch
from conftest import TINY
from loopback import in_process

from explain_client._proto import explain_pb2_grpc
from explain_server.batching import BatchingConfig
from explain_server.malformed import MalformedRequestInterceptor
from explain_server.metrics import GrpcMetricsInterceptor, Metrics
from explain_server.models import ModelSpec
from explain_server.registry import ModelRegistry
from explain_server.service import ExplainService, Limits


def tiny_registry() -> ModelRegistry:
    """``tiny`` (seeded random weights, as ``tiny=tiny-ViT:random:0``) loaded and warmed up."""
    registry = ModelRegistry(
        [ModelSpec.parse(f"tiny={TINY}:random:0")], "tiny", device=torch.device("cpu"), dtype="float32",
        memory_bytes=256 << 20,
    )
    registry.load_all()
    return registry


@dataclass
class Served:
    """A running in-process server: the service, its metrics and a client channel to it."""

    service: ExplainService
    metrics: Metrics
    channel: grpc.aio.Channel

    @property
    def stub(self) -> explain_pb2_grpc.ExplainStub:
        return explain_pb2_grpc.ExplainStub(self.channel)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one series (0 when it has no sample yet)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def serving(
    registry: ModelRegistry, *, batching: BatchingConfig = BatchingConfig(), limits: Limits = Limits(),
    cache_bytes: int = 256 << 20,
) -> AsyncIterator[Served]:
    """Serve ``registry`` on a free loopback port, wired as server.py wires it (interceptors, health)."""
    metrics = Metrics()
    service = ExplainService(registry, limits, batching, cache_bytes, metrics)
    server = grpc.aio.server(
        interceptors=[GrpcMetricsInterceptor(metrics), MalformedRequestInterceptor()],
        options=[("grpc.max_send_message_length", limits.max_message_bytes),
                 ("grpc.max_receive_message_length", limits.max_message_bytes)],
    )
    explain_pb2_grpc.add_ExplainServicer_to_server(service, server)
    try:
        async with in_process(server, [("grpc.max_send_message_length", limits.max_message_bytes)]) as channel:
            yield Served(service, metrics, channel)
    finally:
        service.close()
