"""How many upstream connections are open at once: at most `pool.max_connections`.

Every connection counts from the moment it starts connecting until it is closed: in use by a
session, parked, being opened or being logged out. A session that needs one more while all
are taken first has the pool free one (the least recently parked, else the connection of the
session idle longest between commands: `reclaim`), then waits for one to close, at most until
its deadline. So the IMAP server never sees more connections from one bridge process than
configured, however many POP3 sessions are connected.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from bridge.imap.errors import UpstreamUnavailable
from bridge.ops import metrics


class ConnectionSlots:
    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self.open = 0
        # Connections being closed to make room: each frees its slot once it is closed.
        self.reclaiming = 0
        self._freed = trio.Event()

    async def acquire(self, reclaim: Callable[[], bool], deadline: float) -> None:
        """Take a slot for a connection about to be opened. `reclaim()` starts closing one
        connection and says whether it could; with nothing to close, this waits for a slot
        until `deadline`, then raises UpstreamUnavailable."""
        while self.open >= self._limit():
            if self.open - self.reclaiming >= self._limit() and reclaim():
                self.reclaiming += 1
            freed = self._freed
            with trio.move_on_at(deadline):
                await freed.wait()
                continue
            metrics.POOL_FULL.inc()
            raise UpstreamUnavailable(f"all {self._limit()} upstream connections (pool.max_connections) are in use")
        self.open += 1
        metrics.UPSTREAM_CONNECTIONS.set(self.open)

    def wake(self) -> None:
        """A connection became free to reclaim (its session went idle, or it was parked):
        whoever waits asks `reclaim` again."""
        self._freed.set()
        self._freed = trio.Event()

    def release(self, reclaimed: bool = False) -> None:
        """A connection is closed (or was never opened): its slot is free. `reclaimed`: it
        was closed to make room."""
        self.open -= 1
        if reclaimed:
            self.reclaiming -= 1
        metrics.UPSTREAM_CONNECTIONS.set(self.open)
        self.wake()
