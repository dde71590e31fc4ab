"""One model's work, run one item at a time on its own thread, awaited from the event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable


class ModelWorker:
    """A daemon thread that runs submitted callables in order.

    torch already spreads one explanation over its intra-op threads, so one item at a time
    per model keeps the cores busy without oversubscribing them. The thread is a daemon: at
    shutdown, work whose caller was already answered never delays the process's exit.
    """

    def __init__(self, name: str):
        """Start the thread, named after the model."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"model-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Queue ``fn``; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn))
        return future

    def close(self) -> None:
        """Stop taking work after the items already queued."""
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, fn = item
            try:
                outcome, failed = fn(), False
            except Exception as err:  # handed to the awaiting caller, which maps it to a status
                outcome, failed = err, True
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, failed)
            except RuntimeError:  # the loop closed during shutdown; nobody awaits this result
                pass


def _settle(future: asyncio.Future, outcome: Any, failed: bool) -> None:
    if future.cancelled():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
