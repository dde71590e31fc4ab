"""The real Explain service on a grpc.aio server inside the test process, where faults can be injected.

The front end is the production one; its model worker runs the production message loop
(worker/serve.py) on a thread of this process instead of in a process of its own, over the
same kind of connection, so that a test can reach into the worker's explainer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

import grpc
import torch
from conftest import TINY
from loopback import started

from explain_api import explain_pb2_grpc
from explain_server.lifecycle import Lifecycle
from explain_server.loading import LoadedModel, load_model
from explain_server.malformed import MalformedRequestInterceptor
from explain_server.metrics import GrpcMetricsInterceptor, Metrics
from explain_server.model_spec import ModelSpec
from explain_server.registry import ModelRegistry, ServedModel
from explain_server.service import ExplainService
from explain_server.settings import BatchingConfig, Limits
from explain_server.worker.factor_cache import FactorCache
from explain_server.worker.process import describe, warm_up
from explain_server.worker.protocol import Ready
from explain_server.worker.serve import serve
from explain_server.worker_pool import ModelWorkers, WorkerInstance


def tiny_model() -> LoadedModel:
    """``tiny`` (seeded random weights, as ``tiny=tiny-ViT:random:0``) loaded and warmed up."""
    loaded = load_model(
        ModelSpec.parse(f"tiny={TINY}:random:0"), device=torch.device("cpu"), dtype="float32", memory_bytes=256 << 20
    )
    warm_up(loaded)
    return loaded


class ThreadWorker:
    """A worker's ``run`` on a thread: what ``worker_pool.spawn`` starts as a process.

    ``run`` must close its end of the connection when it returns, as a process's end closes
    when it exits; the exit code then reads ``exitcode_when_done``.
    """

    def __init__(self, run: Callable[[], None], exitcode_when_done: int = 0):
        self._exitcode_when_done = exitcode_when_done
        self._thread = threading.Thread(target=run, name="thread-worker", daemon=True)
        self._thread.start()

    @property
    def exitcode(self) -> int | None:
        return None if self._thread.is_alive() else self._exitcode_when_done

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def kill(self) -> None:
        """A thread cannot be killed; it ends once its connection closes or Stop arrives."""


def serve_loaded(loaded: LoadedModel, connection: Connection, batching: BatchingConfig, cache_bytes: int) -> None:
    """What a worker process does once its model is loaded: announce it, then serve jobs."""
    connection.send(Ready(describe(loaded)))
    serve(connection, loaded.spec.name, loaded.explainer, FactorCache(cache_bytes), batching)
    connection.close()


@dataclass
class Served:
    """A running in-process server: the service, its metrics, a client channel to it and its target
    (for a synchronous client, which must call from another thread than the server's event loop)."""

    service: ExplainService
    metrics: Metrics
    channel: grpc.aio.Channel
    target: str

    @property
    def stub(self) -> explain_pb2_grpc.ExplainStub:
        return explain_pb2_grpc.ExplainStub(self.channel)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one series (0 when it has no sample yet)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def serving(
    loaded: LoadedModel | Sequence[LoadedModel],
    *,
    batching: BatchingConfig = BatchingConfig(),
    limits: Limits = Limits(),
    cache_bytes: int = 256 << 20,
) -> AsyncIterator[Served]:
    """Serve ``loaded`` (one model, or several with the first as the default, each with a worker
    of its own) on a free loopback port, wired as server.py wires it (interceptors, health)."""
    models = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
    metrics = Metrics()

    def workers(model: LoadedModel) -> ModelWorkers:
        instance = WorkerInstance(
            model.spec.name,
            0,
            lambda connection: ThreadWorker(lambda: serve_loaded(model, connection, batching, cache_bytes)),
            metrics,
            on_change=lambda: None,
        )
        return ModelWorkers(model.spec.name, [instance])

    registry = ModelRegistry([ServedModel(m.spec, workers(m)) for m in models], models[0].spec.name)
    service = ExplainService(registry, limits, metrics, Lifecycle())
    server = grpc.aio.server(
        interceptors=[GrpcMetricsInterceptor(metrics), MalformedRequestInterceptor()],
        options=[
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
        ],
    )
    explain_pb2_grpc.add_ExplainServicer_to_server(service, server)
    await registry.start()
    options = [("grpc.max_send_message_length", limits.max_message_bytes)]
    try:
        async with started(server) as target, grpc.aio.insecure_channel(target, options=options) as channel:
            yield Served(service, metrics, channel, target)
    finally:
        service.close()
        registry.stop(60)
