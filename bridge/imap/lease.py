"""A connection checked out by one session (`Lease`), and the password digest the pool keeps
in place of the password (bridge.imap.pool).

The pool keeps a salted digest only (HMAC-SHA256, a random salt per connection, compared in
constant time), so a parked connection or a lease never holds a clear password.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

import trio

from bridge.config import UpstreamSettings
from bridge.imap.capacity import ConnectionSlots
from bridge.imap.mailbox import ImapMailbox
from bridge.routing.routes import Backend


def password_digest(salt: bytes, password: str) -> bytes:
    return hmac.new(salt, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def digest_matches(salt: bytes, digest: bytes, password: str) -> bool:
    """Whether `password` is the one `digest` was made from (in constant time)."""
    return hmac.compare_digest(digest, password_digest(salt, password))


class LeaseOwner(Protocol):
    """What a lease needs of its pool (bridge.imap.pool.UpstreamPool)."""

    slots: ConnectionSlots

    async def checkin(self, lease: Lease) -> None: ...


class Lease:
    """A connection checked out by one session: `mailbox` serves the session; `release()`
    hands it back to the pool (parked if still fit) instead of logging out."""

    def __init__(
        self, pool: LeaseOwner, mailbox: ImapMailbox, account: str, salt: bytes, digest: bytes,
        logged_in_at: float, backend: Backend,
    ) -> None:
        self.mailbox = mailbox
        self.account = account  # its account_key: how the pool compares accounts
        self.salt = salt
        self.digest = digest
        self.logged_in_at = logged_in_at
        self.backend = backend
        # Why this connection must not be parked again (None: it may be).
        self.retired: str | None = None
        # Handed over from the parked ones rather than opened for this checkout.
        self.reused = False
        self._pool: LeaseOwner | None = pool
        # Commands using the connection now (the login that checked it out is the first);
        # at 0 the session is between commands and the pool may take the connection back
        # to make room (`taken`): the session then checks out another for its next command.
        self.busy = 1
        self.idle_since = trio.current_time()
        self.taken = False

    def hold(self) -> None:
        self.busy += 1

    def let_go(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle_since = trio.current_time()
            if self._pool is not None:
                self._pool.slots.wake()  # a login waiting for room may take this one

    @property
    def upstream(self) -> UpstreamSettings:
        return self.backend.upstream

    def matches(self, password: str) -> bool:
        return digest_matches(self.salt, self.digest, password)

    async def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.checkin(self)
