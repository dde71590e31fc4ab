"""``explain-server``: gRPC server with health checking, reflection and preloaded models."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Callable

import grpc
import open_clip
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from explain_api import explain_pb2, explain_pb2_grpc

from .config import ServerConfig, instance_devices, load_config
from .lifecycle import Lifecycle
from .loading import ModelLoadError
from .malformed import MalformedRequestInterceptor
from .metrics import GrpcMetricsInterceptor, Metrics
from .registry import ModelRegistry, ServedModel
from .security import BearerTokenInterceptor, load_tokens, server_credentials
from .service import ExplainService
from .settings import BatchingConfig, ImageLimits, Limits
from .shapes import model as shapes_model
from .worker.process import WorkerSettings
from .worker_pool import ModelWorkers, WorkerInstance, spawn

log = logging.getLogger("explain_server")

SERVICE_NAME = explain_pb2.DESCRIPTOR.services_by_name["Explain"].full_name
# how long a worker may take to drop its abandoned jobs and exit before it is killed
_WORKER_STOP_SECONDS = 5.0


def model_health_service(model: str) -> str:
    """The health service name that reports one model: SERVING while one of its workers takes jobs."""
    return f"{SERVICE_NAME}/{model}"


async def _set_health(servicer: health.aio.HealthServicer, registry: ModelRegistry, lifecycle: Lifecycle) -> None:
    """ "" (the whole server, what probes ask by default) and the Explain service: SERVING while every
    model can serve and the server is not shutting down; ``explain.v1.Explain/MODEL``: that model alone."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    draining = lifecycle.shutting_down
    for model in registry.models.values():
        ok = registry.started and model.workers.ready and not draining
        await servicer.set(model_health_service(model.name), serving if ok else not_serving)
    for name in ("", SERVICE_NAME):
        await servicer.set(name, serving if registry.ready and not draining else not_serving)


def _worker_threads(config: ServerConfig, workers: int) -> int:
    """Torch threads per worker: the configured count, else the cores this process may use
    shared out among the workers, so that no two processes spin for the same core."""
    if config.intra_op_threads:
        return config.intra_op_threads
    return max(1, len(os.sched_getaffinity(0)) // workers)


def build_registry(config: ServerConfig, metrics: Metrics, on_change: Callable[[], None]) -> ModelRegistry:
    """The configured models, each with its worker instances (not started).

    ``on_change`` runs on the event loop whenever a worker becomes ready or stops being ready.

    Raises:
        ValueError: a model's device names a CUDA device this machine lacks.
    """
    batching = BatchingConfig(
        max_batch_size=config.max_batch_size,
        max_queue_delay_seconds=config.max_queue_delay_ms / 1000,
        max_queue_size=config.max_queue_size,
    )
    threads = _worker_threads(config, sum(spec.instances for spec in config.models))
    cuda_count = torch.cuda.device_count()
    models = []
    for spec in config.models:
        instances = []
        for index, device in enumerate(instance_devices(spec.device, spec.instances, cuda_count)):
            settings = WorkerSettings(
                spec=spec,
                model_configs=tuple(config.model_configs),
                device=device,
                dtype=config.dtype,
                memory_bytes=config.jvp_memory_mb << 20,
                chunk_seconds=config.jvp_chunk_seconds or None,
                cache_bytes=config.factor_cache_mb << 20,
                batching=batching,
                threads=threads,
                log_level=config.log_level,
            )
            instances.append(WorkerInstance(spec.name, index, spawn(settings), metrics, on_change))
        models.append(ServedModel(spec, ModelWorkers(spec.name, instances)))
    return ModelRegistry(models, config.default_model_name)


async def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM or SIGINT.

    Health is NOT_SERVING while models load and warm up, SERVING after, and NOT_SERVING again
    for a model while none of its workers is ready. On a signal, health turns NOT_SERVING,
    new calls get UNAVAILABLE, calls in progress get ``grace_seconds`` to finish, and then
    the workers stop.

    Returns:
        The process exit code: 0 after a clean shutdown, 1 if a model failed to load.
    """
    # the front end's torch work is preprocessing; the cores are for the workers
    torch.set_num_threads(1)
    # the shipped shapes architecture is always known, like open_clip's own
    for path in [shapes_model.CONFIG, *config.model_configs]:
        open_clip.add_model_config(path)
    metrics = Metrics()
    lifecycle = Lifecycle()
    health_servicer = health.aio.HealthServicer()

    readiness: list[tuple[bool, ...]] = []

    def on_change() -> None:
        for model in registry.models.values():
            metrics.queue_depth.labels(model.name).set(model.workers.queue_depth)
        # queue depths change with every job; health only when a model's readiness does
        now = tuple(model.workers.ready for model in registry.models.values())
        if readiness[-1:] != [now]:
            readiness[:] = [now]
            asyncio.ensure_future(_set_health(health_servicer, registry, lifecycle))

    registry = build_registry(config, metrics, on_change)
    max_bytes = config.max_message_mb << 20
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    tokens = load_tokens(config.auth_tokens_file, config.auth_tokens_env)
    # metrics first: it counts the calls the token check refuses too
    interceptors: list[grpc.aio.ServerInterceptor] = [GrpcMetricsInterceptor(metrics), MalformedRequestInterceptor()]
    if tokens:
        interceptors.insert(1, BearerTokenInterceptor(tokens, tuple(config.auth_exempt)))
    options = [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # a second server on a busy port must fail, not silently share its traffic
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age_seconds:
        # clients reconnect, re-resolve and so spread over replicas added since; calls in
        # progress get the shutdown grace period to finish
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
        ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    limits = Limits(
        max_n_steps=config.max_n_steps,
        image=ImageLimits(max_pixels=config.max_image_pixels, max_side=config.max_image_side),
        max_message_bytes=max_bytes,
        max_pixels_per_call=config.max_pixels_per_call,
    )
    service = ExplainService(registry, limits, metrics, lifecycle)
    explain_pb2_grpc.add_ExplainServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, registry, lifecycle)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{config.host}:{config.port}"
    try:
        bound = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError as err:  # grpc raises when it cannot bind
        raise OSError(f"cannot listen on {address}: {err}") from err
    if not bound:
        raise OSError(f"cannot listen on {address}")
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.host)
    await server.start()
    log.info(
        "listening on %s (%s%s); loading %d model(s)",
        address,
        "plaintext"
        if credentials is None
        else "TLS" + (", client certificates required" if config.tls_client_ca else ""),
        f", bearer tokens required except for {', '.join(config.auth_exempt) or 'no service'}" if tokens else "",
        len(registry.specs),
    )
    if config.metrics_port:
        log.info("Prometheus metrics on http://%s:%d/metrics", config.host, config.metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loading = asyncio.ensure_future(registry.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading.done():
        try:
            loading.result()
            for model in registry.models.values():
                metrics.model_load_seconds.labels(model.name).set(model.description.load_seconds)
            await _set_health(health_servicer, registry, lifecycle)
            log.info("all models loaded and warmed up; SERVING")
            await stopping
        except ModelLoadError as err:
            log.error("start-up failed: %s", err)
            exit_code = 1
    else:
        loading.cancel()
    log.info("shutting down (grace %g s)", config.grace_seconds)
    lifecycle.shutting_down = True
    await _set_health(health_servicer, registry, lifecycle)
    # Keep listening while draining, so that new calls get our UNAVAILABLE message, not a
    # refused connection.
    await lifecycle.drain(config.grace_seconds)
    await server.stop(1.0)
    service.close()
    # every accepted call is answered: what the workers still hold is abandoned work
    await asyncio.get_running_loop().run_in_executor(None, registry.stop, _WORKER_STOP_SECONDS)
    log.info("stopped; every accepted call was answered")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``explain-server`` (flags: ``explain-server --help``).

    Exits the process: 0 after a clean shutdown, 1 when a model fails to load, 2 on bad
    configuration. Returns only for argument errors (2). ``--version`` prints the version and
    exits 0 (``SystemExit``).
    """
    try:
        config = load_config(argv)
    except (ValueError, OSError) as err:
        print(f"explain-server: {err}", file=sys.stderr)
        return 2
    # open_clip logs routine steps at INFO on the root logger: keep those at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(config.log_level.upper())
    try:
        code = asyncio.run(serve(config))
    except (ValueError, OSError) as err:
        log.error("%s", err)
        code = 2
    # Every accepted call has been answered by now. A model thread may still be inside torch
    # finishing abandoned work; interpreter finalization around a running native thread aborts
    # the process, so leave without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
