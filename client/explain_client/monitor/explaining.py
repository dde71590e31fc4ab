"""Explaining a sample through a running service: DETAIL_SUMMARY calls with bounded concurrency,
retries with backoff, and a stop that lets the calls in flight finish.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import queue
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from explain_api import explain_pb2, explain_pb2_grpc
from explain_client.client import DEFAULT_MAX_SEND_MESSAGE_BYTES, explain_request
from explain_client.errors import ExplainError, MessageTooLargeError, from_rpc_error
from explain_client.monitor.rows import summary_row
from explain_client.monitor.sample import Record

__all__ = ["RETRIED_CODES", "Backoff", "Outcome", "SummaryCaller", "explain_records"]

RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""The codes a call is retried on: the server is starting, draining or its queue is full. Every
other code is the request's own (INVALID_ARGUMENT, ...) or final (DEADLINE_EXCEEDED) and is not."""


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: before retry ``n`` (0-based) wait a uniform time in
    [0, min(maximum, initial * 2**n)] seconds."""

    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.maximum, self.initial * 2.0**retry))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of a record: ``row`` (explained), ``failure`` (failed for good: a row of
    ``store.FAILURES``), or neither (abandoned by a stop while waiting to retry)."""

    record: Record
    row: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


class SummaryCaller:
    """Sends one record's DETAIL_SUMMARY ``Explain`` call over ``channel``, retrying
    :data:`RETRIED_CODES` up to ``max_retries`` times.

    Args:
        channel: a channel to the service (e.g. ``ExplainClient.channel``).
        metadata: call metadata (the bearer token), or None.
        timeout: deadline of each call (each attempt), seconds; None = none.
        max_retries: retries after the first attempt (>= 0).
        backoff: the waits between attempts.
        options: request options for :func:`~explain_client.client.explain_request` (model,
            text_layer, image_layer, n_steps, method; None = the model's default) and
            ``summary_top_k`` (None = the server's default).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        metadata: Sequence[tuple[str, str]] | None = None,
        timeout: float | None = None,
        max_retries: int = 8,
        backoff: Backoff = Backoff(),
        **options: Any,
    ):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {max_retries}")
        self._stub = explain_pb2_grpc.ExplainStub(channel)
        self._metadata = metadata
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff = backoff
        self._top_k = options.pop("summary_top_k", None)
        self._options = options
        self._rng = random.Random()

    def request(self, record: Record) -> explain_pb2.ExplainRequest:
        """The request for ``record``.

        Raises:
            OSError: its image path can no longer be read.
            MessageTooLargeError: the request exceeds the channel's default send limit.
            TypeError, ValueError: as :func:`explain_request`.
        """
        request = explain_request(record.image_bytes(), record.caption, **self._options)
        request.detail = explain_pb2.DETAIL_SUMMARY
        if self._top_k is not None:
            request.summary_top_k = self._top_k
        if request.ByteSize() > DEFAULT_MAX_SEND_MESSAGE_BYTES:
            raise MessageTooLargeError(request.ByteSize(), DEFAULT_MAX_SEND_MESSAGE_BYTES)
        return request

    def explain(self, record: Record, stop: threading.Event) -> Outcome:
        """Explain ``record``; never raises. A ``stop`` set while waiting to retry abandons it."""
        attempts = 0
        try:
            request = self.request(record)
        except ExplainError as err:
            return self._failed(record, err.code.name, err.details, attempts)
        except (OSError, TypeError, ValueError) as err:
            return self._failed(record, "LOCAL_ERROR", str(err), attempts)
        while True:
            attempts += 1
            try:
                response = self._stub.Explain(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
                if err.code not in RETRIED_CODES or attempts > self._max_retries:
                    return self._failed(record, err.code.name, err.details, attempts)
                if stop.wait(self._backoff.delay(attempts - 1, self._rng)):
                    return Outcome(record)
                continue
            return Outcome(record, row=summary_row(record, response, dt.datetime.now(dt.UTC)))

    @staticmethod
    def _failed(record: Record, code: str, message: str, attempts: int) -> Outcome:
        failure = {
            "record_id": record.record_id,
            "row": record.row,
            "code": code,
            "message": message,
            "attempts": attempts,
            "failed_at": dt.datetime.now(dt.UTC),
        }
        return Outcome(record, failure=failure)


def explain_records(
    records: Sequence[Record],
    call: Callable[[Record, threading.Event], Outcome],
    handle: Callable[[Outcome], None],
    *,
    concurrency: int,
    stop: threading.Event,
    tick: Callable[[], None] = lambda: None,
) -> None:
    """Explain ``records`` with ``concurrency`` worker threads and pass every outcome to
    ``handle`` on this thread, as it comes.

    At most ``concurrency`` records are between being taken and handled, calls in flight
    included: a worker takes its next record once its last outcome was handled. So a process
    killed at any moment has explained at most ``concurrency`` records that ``handle`` did not
    see. Once ``stop`` is set no new record is taken; the calls in flight finish and are
    handled. ``tick`` runs on this thread at least every 0.2 s (for time-based flushes).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1; got {concurrency}")
    pending = iter(records)
    lock = threading.Lock()
    slots = threading.Semaphore(concurrency)
    outcomes: queue.Queue[Outcome] = queue.Queue()

    def work() -> None:
        while not stop.is_set():
            if not slots.acquire(timeout=0.1):
                continue
            with lock:
                record = None if stop.is_set() else next(pending, None)
            if record is None:
                slots.release()
                return
            outcomes.put(call(record, stop))

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(concurrency, len(records)))]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers) or not outcomes.empty():
        try:
            outcome = outcomes.get(timeout=0.2)
        except queue.Empty:
            pass
        else:
            try:
                handle(outcome)
            finally:
                slots.release()
        tick()
