"""A session's upstream connection: held while a command uses it, not in between.

A POP3 session spends most of its life waiting for its client: a device that logged in and
sent STAT, a client reading a long listing, a phone that fell asleep mid-session. None of that
needs the IMAP server. So the session holds its connection only while a command uses it
(`using()`: the login's snapshot, RETR and TOP that are not served from the read-ahead or the
message cache, the read-ahead's next batch, the deletions at QUIT). In between, the pool may
take the connection back to make room for another session (bridge.imap.capacity); the next
command then checks out a connection again, a parked one of the account or a fresh login, and
goes on with the session's snapshot unchanged: the same messages, numbers, sizes and UIDLs,
which name the same messages as long as the maildrop's UIDVALIDITY is the snapshot's
(`ImapMailbox.adopt_snapshot`; otherwise the command fails as after any UIDVALIDITY change).

So ten thousand connected devices need only as many IMAP connections as are busy at once,
within `pool.max_connections`.

The same checkout replaces a connection that broke while no command used it: closed by the
server between commands, or broken under a command that has reported its failure already.
A command fails only for the connection it was using; the session's next one goes on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from bridge.imap import MaildropStore, UpstreamError
from bridge.imap.engines import Credential
from bridge.imap.errors import AuthenticationFailed
from bridge.imap.lease import Lease
from bridge.imap.mailbox import ImapMailbox
from bridge.imap.pool import UpstreamPool
from bridge.ops.logs import get_logger
from bridge.routing.routes import Backend

_log = get_logger()


class StoreAccess(Protocol):
    """How a session's parts reach the maildrop: one connection per command."""

    def using(self) -> AbstractAsyncContextManager[MaildropStore]: ...


class SessionUpstream:
    def __init__(
        self, pool: UpstreamPool, lease: Lease, account: str, password: str, credential: Credential | None,
        backend: Backend, uidvalidity: int,
    ) -> None:
        # What checking out again takes: the same account, password (compared with parked
        # connections') and credential (what a fresh login uses), on the same back end.
        self._pool = pool
        self._lease: Lease | None = lease
        self._checkout_as = (account, password, credential, backend)
        self._uidvalidity = uidvalidity
        self._checking_out = trio.Lock()

    @property
    def holds_connection(self) -> bool:
        return self._lease is not None and not self._lease.taken

    def between_commands(self) -> None:
        """The login is done with the connection: from now on it is used per command."""
        if self._lease is not None:
            self._lease.let_go()

    @asynccontextmanager
    async def using(self) -> AsyncIterator[ImapMailbox]:
        """The session's connection for one command (checked out again if the pool took it
        back). Raises UpstreamError if none can be had or the maildrop changed."""
        lease = await self._hold()
        try:
            yield lease.mailbox
        finally:
            lease.let_go()

    async def _hold(self) -> Lease:
        """The session's lease, checked out again if it was taken, held for a command."""
        async with self._checking_out:
            lease = self._lease
            if lease is not None and not lease.taken:
                if lease.mailbox.usable or lease.busy:
                    # (A connection that broke under a command still running is that
                    # command's to report; it is let go when that command ends.)
                    lease.hold()
                    return lease
                # Broken while the session was between commands (the server's restart,
                # `doveadm kick` or idle logout closed it), or under an earlier command
                # that has failed already (a stall, a reset): nothing of this command has
                # been sent, so another connection serves it with the same snapshot, and a
                # QUIT's deletions are not lost to a connection that broke before it.
                self._lease = None
                await lease.release()
            # (None: a replacement for a broken one that could not be had last time.)
            reason = "taken" if lease is not None and lease.taken else "broken"
            account, password, credential, backend = self._checkout_as
            try:
                lease = await self._pool.checkout(account, password, credential, backend=backend)
            except AuthenticationFailed:
                # The password worked at login; the server refuses it now (changed, revoked).
                raise UpstreamError("login: the server no longer accepts the session's credentials") from None
            try:
                lease.mailbox.adopt_snapshot(self._uidvalidity)
            except UpstreamError:
                await lease.release()
                raise
            # Checked out busy: held for this command from here on.
            self._lease = lease
            # A broken one is worth an operator's eye; one the pool took back is routine.
            (_log.info if reason == "broken" else _log.debug)("upstream_checked_out_again", reason=reason)
            return lease

    async def release(self) -> None:
        """The session is over: the connection goes back to the pool (parked if fit)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()
