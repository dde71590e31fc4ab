"""The front end's side of the model workers: starting, routing to, watching and restarting them.

Each hosted model runs in ``instances`` worker processes (Triton's instance groups). A
:class:`WorkerInstance` owns one: a supervisor thread starts the process, reads its messages
(outcomes, batch reports, queue depth) and notices at once when it dies, because the
process's end of the connection closes with it. The jobs it had in flight then fail with
:class:`WorkerLost` (answered UNAVAILABLE: safe to retry), and the process is started again
after an exponential backoff. :class:`ModelWorkers` routes each call to the ready instance
with the fewest jobs in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Protocol

from .metrics import Metrics
from .worker import process
from .worker.protocol import (
    BatchReport,
    Cancel,
    Finished,
    JobSpec,
    LoadFailed,
    ModelDescription,
    Outcome,
    QueueDepth,
    Ready,
    Stop,
    Submit,
)

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


class WorkerLost(Exception):
    """The worker computing a job died; the job may be retried."""


class ModelUnavailable(Exception):
    """No worker of the model is ready (starting, or restarting after a crash)."""


class Launched(Protocol):
    """A started worker: a ``multiprocessing.Process`` in production."""

    exitcode: int | None

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...


# start a worker serving on the given connection end (the worker's); the worker owns that end
Launch = Callable[[Connection], Launched]


def spawn(settings: process.WorkerSettings) -> Launch:
    """A :data:`Launch` that starts a worker process for ``settings``."""

    def launch(connection: Connection) -> Launched:
        worker = _SPAWN.Process(
            target=process.main, args=(connection, settings), name=f"worker-{settings.spec.name}", daemon=True
        )
        worker.start()
        # the worker's copy is now the only one: its death closes the pipe
        connection.close()
        return worker

    return launch


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial`` seconds, doubling up to ``maximum``; back to ``initial``
    once a worker has stayed up for ``reset_after`` seconds."""

    initial: float = 0.5
    maximum: float = 30.0
    reset_after: float = 60.0


class WorkerInstance:
    """One worker of one model, as the front end sees it.

    Outcomes settle futures of the event loop given to :meth:`start`. ``on_change`` runs on
    that loop whenever the instance becomes ready or stops being ready.
    """

    def __init__(
        self,
        model: str,
        index: int,
        launch: Launch,
        metrics: Metrics,
        on_change: Callable[[], None],
        backoff: Backoff = Backoff(),
    ):
        self.model, self.index = model, index
        self._launch, self._metrics, self._on_change, self._backoff = launch, metrics, on_change, backoff
        self.description: ModelDescription | None = None
        self.ready = False
        self.failure: str | None = None  # why the first start failed
        self.queue_depth = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._lock = threading.Lock()  # _pending, _connection
        self._connection: Connection | None = None
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._first_start = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._worker: Launched | None = None

    @property
    def inflight(self) -> int:
        """Jobs sent and not yet answered."""
        return len(self._pending)

    def start(self) -> None:
        """Start the worker and its supervisor thread (call on the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._supervise, name=f"supervisor-{self.model}-{self.index}", daemon=True
        )
        self._thread.start()

    async def started(self) -> None:
        """Wait until the first start ends: ready, or ``failure`` set."""
        await self._first_start.wait()

    def submit(self, jobs: list[JobSpec]) -> list[asyncio.Future]:
        """Send ``jobs`` (on the event loop); each future gets its job's :data:`Outcome` or :class:`WorkerLost`."""
        futures = [self._loop.create_future() for _ in jobs]
        with self._lock:
            connection = self._connection
            if connection is not None:
                self._pending.update((job.job_id, future) for job, future in zip(jobs, futures))
                try:
                    connection.send(Submit(jobs))
                    return futures
                except OSError:  # died just now; the supervisor fails what else it had
                    for job in jobs:
                        self._pending.pop(job.job_id, None)
        for future in futures:
            future.set_exception(WorkerLost(f"model {self.model}: its worker {self.index} stopped; retry"))
        return futures

    def next_job_id(self) -> int:
        """A job id unique on this instance."""
        return next(self._ids)

    def cancel(self, job_ids: list[int]) -> None:
        """Tell the worker nobody awaits these jobs (on the event loop)."""
        with self._lock:
            live = [job_id for job_id in job_ids if job_id in self._pending]
            if not live or self._connection is None:
                return
            try:
                self._connection.send(Cancel(live))
            except OSError:
                pass

    def request_stop(self) -> None:
        """Ask the worker to finish its queued jobs and exit; no restart follows."""
        self._stopping.set()
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.send(Stop())
                except OSError:
                    pass

    def wait_stopped(self, timeout: float) -> None:
        """After :meth:`request_stop`: wait up to ``timeout`` seconds for a ready worker to exit, then
        kill it; a worker still loading holds no work and is killed at once. Blocking."""
        if self.ready and self._thread is not None:
            self._thread.join(timeout)
        worker = self._worker
        if worker is not None and worker.exitcode is None:
            if self.ready:
                log.warning("model %s worker %d did not stop in time; killing it", self.model, self.index)
            worker.kill()
            worker.join()
        if self._thread is not None:
            self._thread.join()

    def _supervise(self) -> None:
        delay = self._backoff.initial
        first = True
        while not self._stopping.is_set():
            ours, theirs = _SPAWN.Pipe()
            worker = self._launch(theirs)
            self._worker = worker
            with self._lock:
                self._connection = ours
            started = time.monotonic()
            failure = self._read(ours)
            with self._lock:
                self._connection = None
                lost, self._pending = self._pending, {}
            ours.close()
            worker.join()
            was_ready, self.ready, self.queue_depth = self.ready, False, 0
            self._call_soon(self._on_change)
            for future in lost.values():
                self._call_soon(_settle, future, WorkerLost(f"model {self.model}: its worker restarted; retry"))
            if first:
                first = False
                if not was_ready:
                    self.failure = failure or f"its worker exited with code {worker.exitcode} before it was ready"
                self._call_soon(self._first_start.set)
                if self.failure is not None:
                    return
            if self._stopping.is_set():
                return
            if time.monotonic() - started > self._backoff.reset_after:
                delay = self._backoff.initial
            log.error(
                "model %s worker %d (pid %s) ended with exit code %s%s; restarting in %.1f s",
                self.model,
                self.index,
                getattr(worker, "pid", "?"),
                worker.exitcode,
                f" ({failure})" if failure else "",
                delay,
            )
            self._metrics.worker_restarts.labels(self.model).inc()
            self._stopping.wait(delay)
            delay = min(2 * delay, self._backoff.maximum)

    def _read(self, connection: Connection) -> str | None:
        """Handle the worker's messages until its end closes; the load failure it reported, if any."""
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                return None
            if isinstance(message, Finished):
                with self._lock:
                    future = self._pending.pop(message.job_id, None)
                if future is not None:
                    self._call_soon(_settle, future, message.outcome)
            elif isinstance(message, BatchReport):
                self._metrics.record_batch(self.model, message)
            elif isinstance(message, QueueDepth):
                self.queue_depth = message.depth
                self._call_soon(self._on_change)
            elif isinstance(message, Ready):
                self.description, self.ready = message.description, True
                log.info("model %s worker %d ready", self.model, self.index)
                self._call_soon(self._on_change)
                self._call_soon(self._first_start.set)
            elif isinstance(message, LoadFailed):
                return message.message

    def _call_soon(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed: the server is gone, nobody awaits this
            pass


def _settle(future: asyncio.Future, outcome: Outcome | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class ModelWorkers:
    """The worker instances of one model."""

    def __init__(self, model: str, instances: list[WorkerInstance]):
        self.model = model
        self.instances = instances

    @property
    def ready(self) -> bool:
        """At least one instance takes jobs."""
        return any(instance.ready for instance in self.instances)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a batch, over all instances."""
        return sum(instance.queue_depth for instance in self.instances)

    def pick(self) -> WorkerInstance:
        """The ready instance with the fewest jobs in flight.

        Raises:
            ModelUnavailable: none is ready.
        """
        ready = [instance for instance in self.instances if instance.ready]
        if not ready:
            raise ModelUnavailable(f"model {self.model} is starting or restarting its worker; retry shortly")
        return min(ready, key=lambda instance: instance.inflight)
