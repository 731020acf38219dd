"""Opening a fresh upstream connection for the pool (bridge.imap.pool), retrying a server that
is not listening.

A refused connection (nothing listening: the server restarting, say) is tried again with
capped exponential backoff (`upstream.reconnect_initial_seconds` doubling up to
`upstream.reconnect_max_seconds`) and jitter, within `upstream.timeout_seconds` in all, so a
POP3 client never waits longer; a server that accepts and then fails is reported at once.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from bridge.config import UpstreamSettings
from bridge.imap.engines import Credential
from bridge.imap.errors import UpstreamNotListening, UpstreamUnavailable
from bridge.imap.mailbox import ImapMailbox
from bridge.ops import metrics
from bridge.ops.logs import get_logger
from bridge.routing.routes import Backend

# The pool's events: an operator reads retries with the rest of the pool's log.
_log = get_logger(component="pool")

Opener = Callable[[UpstreamSettings, str, Credential], Awaitable[ImapMailbox]]


async def connect_retrying(opener: Opener, backend: Backend, credential: Credential, deadline: float) -> ImapMailbox:
    """A fresh connection to `backend`, logged in with `credential`, retrying while nothing
    listens, given up at `deadline` (Trio time). Raises UpstreamUnavailable (no answer in
    time), UpstreamNotListening (still refused at the deadline) or what the opener raises."""
    upstream = backend.upstream
    started = trio.current_time()
    delay = upstream.reconnect_initial_seconds
    attempt = 1
    while True:
        try:
            with trio.fail_at(deadline):
                mailbox = await opener(upstream, backend.login, credential)
            metrics.backend_connect_time(backend.name).observe(trio.current_time() - started)
            return mailbox
        except trio.TooSlowError:
            if attempt > 1:
                # The deadline fell during a retry rather than between two: the same
                # giving up as below, and logged the same way.
                _log.warning("upstream_retries_exhausted", attempts=attempt)
            raise UpstreamUnavailable(f"connect: no answer within {upstream.timeout_seconds:g} s") from None
        except UpstreamNotListening:
            # Nothing listening (a restart?): worth another try. A server that answers
            # and then refuses is reported at once.
            # Full jitter on the upper half: sessions that failed together retry apart.
            wait = min(delay, upstream.reconnect_max_seconds) * random.uniform(0.5, 1.0)
            if trio.current_time() + wait >= deadline:
                _log.warning("upstream_retries_exhausted", attempts=attempt)
                raise
            _log.info("upstream_retry", attempt=attempt, wait_seconds=round(wait, 3))
            await trio.sleep(wait)
            delay = min(delay * 2, upstream.reconnect_max_seconds)
            attempt += 1
