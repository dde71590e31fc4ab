"""Drain: which calls the server still accepts, and ending the rest when the grace period is over."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """The server is draining and takes no new calls, or ended an accepted call at the end of its grace period."""


class Lifecycle:
    """Counts accepted calls and drains them (use on the event loop only)."""

    def __init__(self):
        self.shutting_down = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace_seconds = 0.0
        self._grace_over = asyncio.Event()

    @property
    def inflight(self) -> int:
        """Accepted calls not yet answered."""
        return self._inflight

    def accept(self) -> None:
        """Count a new call as accepted: drain waits for it from now on.

        Raises:
            ShuttingDown: the server is draining.
        """
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        self._inflight += 1
        self._idle.clear()

    def done(self) -> None:
        """An accepted call was answered."""
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    async def until_grace_over(self) -> None:
        """Return when the grace period of a drain ends; raises :class:`ShuttingDown`."""
        await self._grace_over.wait()
        raise ShuttingDown(
            f"the server shut down before this request finished (grace period {self._grace_seconds:g} s); "
            "retry on another replica"
        )

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new calls, let accepted ones finish for up to ``grace_seconds``, then end the rest.

        Calls still unfinished when the grace period ends get :class:`ShuttingDown` from
        :meth:`until_grace_over`.
        """
        self.shutting_down = True
        self._grace_seconds = grace_seconds
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning("grace period over with %d request(s) unfinished; ending them", self._inflight)
            self._grace_over.set()
            await self._idle.wait()
