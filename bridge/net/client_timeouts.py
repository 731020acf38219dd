"""Timeouts of the waits for POP3 clients (RFC 1939 autologout, a client that stops reading,
the session limit), enforced by one watchdog task for the whole service instead of a Trio
deadline per wait.

Why: a download of 1,000 small messages is 2,000 waits for the client (each command, each
reply), and entering and leaving a cancel scope with a deadline cost about 14 µs each on the
2-core benchmark machine, a third of the time Dovecot's own POP3 needs for a whole RETR. Here
starting a wait is two attribute writes. The watchdog looks at the waiting sessions every
`tick` seconds (a tenth of the shortest timeout, between 50 ms and 1 s) and cancels the
waits whose time is up: a timeout fires at most one tick late, never early.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from bridge.config import BridgeSettings


class ClientWait:
    """One session's current wait for its client: when it ends (`due`, Trio time; infinite
    while the session is not waiting for the client) and why it would (`reason`). The
    session runs its conversation inside `scope`, which the watchdog cancels."""

    __slots__ = ("due", "reason", "scope")

    def __init__(self) -> None:
        self.due = math.inf
        self.reason = ""
        self.scope = trio.CancelScope()


def watchdog_tick(settings: BridgeSettings) -> float:
    """Seconds between two looks of the watchdog under these settings."""
    pop3 = settings.pop3
    shortest = min(
        pop3.autologout_seconds, pop3.send_timeout_seconds, pop3.login_timeout_seconds,
        pop3.session_timeout_seconds or math.inf,
    )
    return min(1.0, max(0.05, shortest / 10))


class ClientWatchdog:
    """The sessions' client waits, and the task that ends those that ran out of time."""

    def __init__(self) -> None:
        self._waits: set[ClientWait] = set()

    def add(self, wait: ClientWait) -> None:
        self._waits.add(wait)

    def discard(self, wait: ClientWait) -> None:
        self._waits.discard(wait)

    def expire(self, now: float) -> int:
        """Cancel every wait due by `now`; returns how many."""
        expired = [wait for wait in self._waits if wait.due <= now]
        for wait in expired:
            wait.scope.cancel()
        return len(expired)

    async def run(self, tick: Callable[[], float]) -> None:
        """Until cancelled; `tick()` is asked again each time, so a reload that shortens a
        timeout also shortens the tick."""
        while True:
            await trio.sleep(tick())
            self.expire(trio.current_time())
