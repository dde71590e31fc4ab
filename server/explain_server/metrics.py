"""Prometheus metrics: the service's own series and the standard gRPC server series.

Names follow Prometheus' rules (base units, ``_seconds``, ``_total``, ``_bytes``); the
service's labels are limited to ``model`` and ``code`` (a gRPC status code name), so
cardinality stays bounded whatever callers send. The gRPC series use the labels of
go-grpc-prometheus (``grpc_type``, ``grpc_service``, ``grpc_method``, ``grpc_code``), which
dashboards for gRPC services expect. py-grpc-prometheus provides those only for the
synchronous server, hence :class:`GrpcMetricsInterceptor` for grpc.aio.

How a call ends is decided here too, so that every series counts it as its caller saw it:
:func:`cancellation_code` for calls that ended early, :func:`abort_internal` for server bugs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from explain_api.summary import Summary

from .interceptors import HandlerInterceptor, replace_behavior
from .worker.protocol import BatchReport, Tower

log = logging.getLogger(__name__)

# Explanations take milliseconds on small models and up to minutes for large models at high
# n_steps on a CPU: the buckets span both.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SCORE_BUCKETS = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))  # cosine similarity in [-1, 1]
_DELTA_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
# interaction share: interactions carry most of the score (the paper), and reference terms that
# oppose them push it past 1 (the shapes model's median is 1.67): 0.1 wide over [-1, 3], so that
# the alert's 0.1 shift of the median is one bucket wherever the median lies
_SHARE_BUCKETS = (*(round(-1.0 + 0.1 * i, 1) for i in range(41)), 4.0, 6.0, 10.0)
# grounding concentration lies in [k / cells, 1] with k = the top 10% of cells
_CONCENTRATION_BUCKETS = tuple(round(0.1 + 0.05 * i, 2) for i in range(19))


# The client cancels a call when its deadline passes; that cancellation can reach the server a
# few milliseconds before the server's copy of the deadline (counted from the call's arrival)
# runs out: 0.2 to 8 ms measured under load on 2 CPU cores.
_DEADLINE_SLACK_SECONDS = 0.1


def cancellation_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a call that ended with ``asyncio.CancelledError`` is counted under.

    DEADLINE_EXCEEDED when the call had a deadline and less than 100 ms of it was left (what
    the caller saw), CANCELLED otherwise (the caller went away).
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def abort_internal(context: grpc.aio.ServicerContext, metrics: Metrics, model: str, where: str) -> NoReturn:
    """End the call INTERNAL for the exception being handled: a server bug, never the caller's fault.

    Call it from an ``except`` block. The traceback is logged under a new error id, which the
    status message gives the caller, and ``internal_errors`` counts the call.

    Args:
        context: the call's context.
        metrics: where to count.
        model: the hosted model the call resolved to, or "" before one is resolved.
        where: what failed, for the log (e.g. the RPC method).

    Raises:
        grpc.aio.AbortError: always (how grpc.aio ends a call).
    """
    error_id = secrets.token_hex(6)
    log.exception("internal error %s in %s (model %r)", error_id, where, model)
    metrics.internal_errors.labels(model).inc()
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal server error {error_id}: a bug in the server, not a problem with the request; "
        "the server's log has the traceback under this id",
    )


class Metrics:
    """Every series the server exports, registered in one registry.

    Attributes (the Prometheus name is the attribute's, prefixed ``explain_``; counters gain
    ``_total``):
        requests: Explain and ExplainMany calls by model and final gRPC code (one per call, as is
            ``request_duration_seconds``; the queue, compute, batch, cache, score and delta
            series count each explanation of an ExplainMany call).
        request_duration_seconds: end to end, from arrival to answer.
        queue_wait_seconds: time spent waiting, first for a thread to decode the call's
            images, then in the model's queue until the batch that computed the request started.
        compute_seconds: wall time of the batch that computed the request; requests dropped
            before compute record nothing.
        batch_size: requests per batch the dynamic batcher ran. A batch that raises as a whole
            is run again one request at a time: those runs count as batches too, and the cache
            series count their lookups again.
        queue_depth: requests accepted and waiting for a batch, over the model's workers.
        inflight_requests: requests accepted and not yet answered.
        requests_dropped: requests skipped because their deadline passed (code
            DEADLINE_EXCEEDED) or their caller cancelled (code CANCELLED), by the rule of
            :func:`cancellation_code`, which ``requests`` and the gRPC series follow too.
        images_skipped: images never decoded because their call ended first (deadline passed
            or cancelled, by ``code`` as for ``requests_dropped``): decoding stops at the next
            image of a call that ended.
        internal_errors: calls answered INTERNAL because of a server bug (an unexpected
            exception; see :func:`abort_internal`); model "" for calls that had not resolved
            a model (ListModels, other services).
        factor_cache_lookups: by (tower, hit), the series ``explain_{text,image}_factor_cache_{hits,misses}``:
            factor lookups; a side computed once for several requests of one batch counts one
            miss and hits for the others.
        factor_cache_bytes: bytes held by the factor cache of the model's worker that ran the
            latest batch.
        worker_restarts: worker processes of the model started again after they died.
        model_load_seconds: how long loading and warming up the model took.
        similarity_score: cosine score of successful explanations.
        convergence_delta_abs: |convergence delta| of successful explanations.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        """Create the series in ``registry`` (a new private registry by default)."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        model = ["model"]
        self.requests = Counter(
            "explain_requests", "Explain requests by final gRPC status code.", ["model", "code"], registry=r
        )
        self.request_duration_seconds = Histogram(
            "explain_request_duration_seconds",
            "End-to-end request duration.",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "explain_queue_wait_seconds",
            "Time waiting for a decoding thread and for the request's batch to start.",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "explain_compute_seconds",
            "Wall time of the batch that computed the request.",
            model,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "explain_batch_size", "Requests per executed batch.", model, buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("explain_queue_depth", "Requests waiting for a batch.", model, registry=r)
        self.inflight_requests = Gauge(
            "explain_inflight_requests", "Requests accepted and not yet answered.", model, registry=r
        )
        self.requests_dropped = Counter(
            "explain_requests_dropped",
            "Requests skipped before or during compute: deadline passed or cancelled.",
            ["model", "code"],
            registry=r,
        )
        self.images_skipped = Counter(
            "explain_images_skipped",
            "Images never decoded because their call ended first.",
            ["model", "code"],
            registry=r,
        )
        self.internal_errors = Counter(
            "explain_internal_errors", "Calls answered INTERNAL because of a server bug.", model, registry=r
        )
        # exported as four series, the names dashboards and explain-loadgen read
        self.factor_cache_lookups = {
            (tower, hit): Counter(
                f"explain_{tower.value}_factor_cache_{'hits' if hit else 'misses'}",
                f"{tower.value.capitalize()} factor cache {'hits' if hit else 'misses'}.",
                model,
                registry=r,
            )
            for tower in Tower
            for hit in (True, False)
        }
        self.worker_restarts = Counter(
            "explain_worker_restarts", "Worker processes restarted after they died.", model, registry=r
        )
        self.factor_cache_bytes = Gauge(
            "explain_factor_cache_bytes", "Bytes held by the factor cache.", model, registry=r
        )
        self.model_load_seconds = Gauge(
            "explain_model_load_seconds", "Time to load and warm up the model.", model, registry=r
        )
        self.similarity_score = Histogram(
            "explain_similarity_score",
            "Cosine similarity of explained pairs.",
            model,
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.convergence_delta_abs = Histogram(
            "explain_convergence_delta_abs",
            "Absolute convergence delta of explained pairs.",
            model,
            buckets=_DELTA_BUCKETS,
            registry=r,
        )
        self.interaction_share = Histogram(
            "explain_interaction_share",
            "Part of the score carried by token x image interactions (ExplanationSummary.interaction_share).",
            model,
            buckets=_SHARE_BUCKETS,
            registry=r,
        )
        self.word_grounding_concentration = Histogram(
            "explain_word_grounding_concentration",
            "Share of a caption word's absolute interaction mass in its top 10% grid cells, one per word.",
            model,
            buckets=_CONCENTRATION_BUCKETS,
            registry=r,
        )
        self.grpc_started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=r,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def add_model(self, name: str) -> None:
        """Create ``name``'s series at zero, so that dashboards and rate() see them before the first event."""
        for metric in (
            self.request_duration_seconds,
            self.queue_wait_seconds,
            self.compute_seconds,
            self.batch_size,
            self.queue_depth,
            self.inflight_requests,
            *self.factor_cache_lookups.values(),
            self.factor_cache_bytes,
            self.model_load_seconds,
            self.similarity_score,
            self.convergence_delta_abs,
            self.interaction_share,
            self.word_grounding_concentration,
            self.internal_errors,
            self.worker_restarts,
        ):
            metric.labels(name)
        for code in ("DEADLINE_EXCEEDED", "CANCELLED"):
            self.requests_dropped.labels(name, code)
            self.images_skipped.labels(name, code)

    def observe_summary(self, model: str, summary: Summary) -> None:
        """Record an answered explanation's monitoring signals (a NaN share is not observed)."""
        if not math.isnan(summary.interaction_share):
            self.interaction_share.labels(model).observe(summary.interaction_share)
        concentration = self.word_grounding_concentration.labels(model)
        for word in summary.words:
            concentration.observe(word.concentration)

    def record_batch(self, model: str, report: BatchReport) -> None:
        """Record one batch a worker of ``model`` ran."""
        self.batch_size.labels(model).observe(report.size)
        for tower in Tower:
            self.factor_cache_lookups[tower, True].labels(model).inc(report.cache_hits[tower])
            self.factor_cache_lookups[tower, False].labels(model).inc(report.cache_misses[tower])
        self.factor_cache_bytes.labels(model).set(report.cache_bytes)

    def serve(self, port: int, host: str = "") -> None:
        """Serve ``/metrics`` over HTTP on ``port`` (prometheus-client's server, a daemon thread).

        Raises:
            OSError: the port cannot be bound; the message names it and ``--metrics-port``.
        """
        addr = host or "0.0.0.0"
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {addr}:{port} (--metrics-port): {err.strerror or err}; "
                "choose another port, or 0 to turn the metrics server off"
            ) from err


class GrpcMetricsInterceptor(HandlerInterceptor):
    """Counts and times unary-unary RPCs as ``grpc_server_*`` series (go-grpc-prometheus names).

    As the outermost interceptor it is also the last line against server bugs: an unexpected
    exception from any unary handler ends the call INTERNAL (:func:`abort_internal`, model ""),
    where grpc.aio would answer UNKNOWN. Streaming RPCs (health Watch, reflection) pass through
    uncounted.
    """

    def __init__(self, metrics: Metrics):
        """Record into ``metrics``."""
        self._metrics = metrics

    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """Wrap the handler of a unary-unary method."""
        if handler.unary_unary is None:
            return handler
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        labels = ("unary", service, method)
        m = self._metrics
        behavior = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.grpc_started.labels(*labels).inc()
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                response = await behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                code = cancellation_code(context)
                raise
            except grpc.aio.AbortError:  # the code the handler ended the call with
                code = context.code()
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                await abort_internal(context, m, "", handler_call_details.method)
            finally:
                m.grpc_handled.labels(*labels, code.name).inc()
                m.grpc_handling_seconds.labels(*labels).observe(time.perf_counter() - start)

        return replace_behavior(handler, observed)
