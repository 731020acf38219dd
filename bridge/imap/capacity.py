"""How many upstream connections are open at once: at most `pool.max_connections`.

Every connection counts from the moment it starts connecting until it is closed: in use by a
session, parked, being opened or being logged out. A session that needs one more while all
are taken first has the pool free one (the least recently parked, else the connection of the
session idle longest between commands: `reclaim`), then waits for one to close, at most until
its deadline. So the IMAP server never sees more connections from one bridge process than
configured, however many POP3 sessions are connected. Waiters are served in the order they
came, and as many connections are being closed at once as there are waiters short of a slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from bridge.imap.errors import UpstreamUnavailable
from bridge.ops import metrics


class _Waiter:
    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = trio.Event()


class ConnectionSlots:
    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self.open = 0
        # Connections being closed to make room: each frees its slot once it is closed.
        self.reclaiming = 0
        # Who waits for a slot, first come first served: a free slot goes to the longest
        # waiting, so no login waits out its timeout while later ones get in.
        self._queue: deque[_Waiter] = deque()
        self._reclaim: Callable[[], bool] = lambda: False

    async def acquire(self, reclaim: Callable[[], bool], deadline: float) -> None:
        """Take a slot for a connection about to be opened. `reclaim()` starts closing one
        connection and says whether it could; with nothing to close, this waits for a slot
        until `deadline`, then raises UpstreamUnavailable."""
        self._reclaim = reclaim
        if not self._queue and self.open < self._limit():
            self._take()
            return
        waiter = _Waiter()
        self._queue.append(waiter)
        try:
            self._make_room()
            while not (self._queue[0] is waiter and self.open < self._limit()):
                with trio.move_on_at(deadline):
                    await waiter.turn.wait()
                    waiter.turn = trio.Event()
                    continue
                metrics.POOL_FULL.inc()
                raise UpstreamUnavailable(
                    f"all {self._limit()} upstream connections (pool.max_connections) are in use"
                )
            self._queue.popleft()
            self._take()
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)
            self._next_turn()

    def _take(self) -> None:
        self.open += 1
        metrics.UPSTREAM_CONNECTIONS.set(self.open)

    def _make_room(self) -> None:
        # Every waiter needs a slot that is free or being freed: start closing as many as
        # they are short of, at once, rather than one close after the other.
        while (
            self._queue
            and self._limit() - self.open + self.reclaiming < len(self._queue)
            and self._reclaim()
        ):
            self.reclaiming += 1

    def _next_turn(self) -> None:
        if self._queue and self.open < self._limit():
            self._queue[0].turn.set()

    def wake(self) -> None:
        """A connection became free to reclaim (its session went idle, or it was parked):
        close it if someone waits for room."""
        self._make_room()

    def release(self, reclaimed: bool = False) -> None:
        """A connection is closed (or was never opened): its slot is free. `reclaimed`: it
        was closed to make room."""
        self.open -= 1
        if reclaimed:
            self.reclaiming -= 1
        metrics.UPSTREAM_CONNECTIONS.set(self.open)
        self._next_turn()
