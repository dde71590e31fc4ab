"""A dynamic batcher per model worker, after NVIDIA Triton's: a bounded queue, a batch-size cap and a queue delay.

Requests wait in a bounded queue. The worker's batch thread takes the oldest and, while the
batch holds fewer than ``max_batch_size`` items, waits for more until
``max_queue_delay_seconds`` after that oldest one arrived; then it runs the whole batch as one
call. One batch runs at a time per worker: torch already spreads a batch over its intra-op
threads (or the GPU).

A batch that raises as a whole is run again one item at a time, so that an item that trips
a bug fails alone, not the unrelated items queued beside it. That policy lives here rather
than in the batch function because the batcher is what put those items together; every
batch function gets it, and needs to handle only the failures it expects, item by item.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from .settings import BatchingConfig

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queue cannot take the items; answered with RESOURCE_EXHAUSTED."""


# run_batch(items) -> one outcome per item, in order: a result, or an Exception to raise
RunBatch = Callable[[list[Any]], list[Any]]


class DynamicBatcher:
    """Collects submitted items into batches and runs them on a daemon thread.

    Results are matched to submissions by identity (each item keeps its own future), never by
    position in a completion order.
    """

    def __init__(self, name: str, run_batch: RunBatch, config: BatchingConfig, on_depth: Callable[[int], None]):
        """Start the thread, named after the model.

        Args:
            name: model name, for the thread name and the log.
            run_batch: computes a batch. When it raises, each item of the batch is run alone,
                and an exception from that run fails the item.
            config: the limits.
            on_depth: told the queue depth whenever it changes (for a gauge).
        """
        self.config = config
        self._name = name
        self._run_batch = run_batch
        self._on_depth = on_depth
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: list[Any]) -> list[Future]:
        """Queue ``items`` together (all or none); each future gets its item's outcome.

        Raises:
            QueueFullError: fewer than ``len(items)`` free places in the queue.
        """
        futures: list[Future] = [Future() for _ in items]
        with self._cond:
            if len(self._pending) + len(items) > self.config.max_queue_size:
                raise QueueFullError(
                    f"cannot queue {len(items)} more request(s): max_queue_size is {self.config.max_queue_size} "
                    f"and {len(self._pending)} are waiting; retry with backoff or on another replica"
                )
            now = time.monotonic()
            self._pending.extend((future, item, now) for future, item in zip(futures, items))
            self._on_depth(len(self._pending))
            self._cond.notify()
        return futures

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the thread; wait up to ``timeout`` seconds for it (None: no limit)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[tuple] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            fill_by = self._pending[0][2] + self.config.max_queue_delay_seconds
            while len(self._pending) < self.config.max_batch_size and not self._closed:
                remaining = fill_by - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            size = min(self.config.max_batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(size)]
            self._on_depth(len(self._pending))
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            outcomes = self._outcomes([item for _, item, _ in batch])
            for (future, _, _), outcome in zip(batch, outcomes):
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _outcomes(self, items: list[Any]) -> list[Any]:
        try:
            return self._run_batch(items)
        except Exception as err:
            if len(items) == 1:  # handed to the awaiting caller, which maps it to a status
                return [err]
            # logged here: when every item then succeeds alone, this is the only trace of the bug
            log.exception("model %s: a batch of %d raised; running each of its items alone", self._name, len(items))
        return [self._outcomes([item])[0] for item in items]
