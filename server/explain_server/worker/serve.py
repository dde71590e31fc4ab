"""A worker's message loop: jobs in from the front end, outcomes and reports back.

The loop reads the connection on the calling thread, queues jobs on the worker's
:class:`DynamicBatcher` (whose thread runs :meth:`ExplainBackend.execute`), and sends each
job's outcome as soon as it is known. It ends when the front end sends :class:`Stop` (after
the queued jobs) or closes its end of the connection.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection

from ..batching import DynamicBatcher, QueueFullError
from ..engine.explainer import Explainer
from ..settings import BatchingConfig
from .backend import ExplainBackend, QueuedJob
from .factor_cache import FactorCache
from .protocol import Cancel, Failed, Finished, Outcome, QueueDepth, Stop, Submit

log = logging.getLogger(__name__)


class _Sender:
    """Sends messages from several threads, one whole message at a time; gives up quietly once the front end is gone."""

    def __init__(self, connection: Connection):
        self._connection = connection
        self._lock = threading.Lock()

    def __call__(self, message) -> None:
        with self._lock:
            try:
                self._connection.send(message)
            except (BrokenPipeError, ConnectionResetError, OSError):  # nobody is left to read it
                pass


def _internal(err: BaseException) -> Failed:
    """A bug: logged here with its traceback under a new error id, which the caller is given."""
    error_id = secrets.token_hex(6)
    log.error("internal error %s in the worker", error_id, exc_info=err)
    return Failed(
        "internal",
        f"internal server error {error_id}: a bug in the server, not a problem with the request; "
        "the server's log has the traceback under this id",
        error_id,
    )


def serve(
    connection: Connection, name: str, explainer: Explainer, cache: FactorCache, batching: BatchingConfig
) -> None:
    """Serve jobs for model ``name`` with ``explainer`` on ``connection`` until :class:`Stop` or the front end goes away."""
    send = _Sender(connection)
    backend = ExplainBackend(explainer, cache, send)
    queued: dict[int, QueuedJob] = {}
    queued_lock = threading.Lock()
    batcher = DynamicBatcher(name, backend.execute, batching, lambda depth: send(QueueDepth(depth)))

    def settle(job: QueuedJob, future: Future) -> None:
        err = future.exception()
        outcome: Outcome = _internal(err) if err is not None else future.result()
        with queued_lock:
            queued.pop(job.spec.job_id, None)
        send(Finished(job.spec.job_id, outcome))

    try:
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):  # the front end is gone: nobody awaits anything
                for job in queued.values():
                    job.cancelled.set()
                break
            if isinstance(message, Submit):
                jobs = [QueuedJob(spec) for spec in message.jobs]
                with queued_lock:
                    queued.update((job.spec.job_id, job) for job in jobs)
                try:
                    futures = batcher.submit(jobs)
                except QueueFullError as err:
                    with queued_lock:
                        for job in jobs:
                            queued.pop(job.spec.job_id, None)
                    for job in jobs:
                        send(Finished(job.spec.job_id, Failed("queue_full", f"model {name}: {err}")))
                    continue
                for job, future in zip(jobs, futures):
                    future.add_done_callback(lambda f, job=job: settle(job, f))
            elif isinstance(message, Cancel):
                with queued_lock:
                    for job_id in message.job_ids:
                        if (job := queued.get(job_id)) is not None:
                            job.cancelled.set()
            elif isinstance(message, Stop):
                break
    finally:
        batcher.close()
