"""Parked upstream connections: a finished POP3 session's IMAP connection, kept for the same
account's next session.

Devices poll every few minutes; each poll would otherwise pay connect + login + SELECT + a
full listing. When a session ends, its connection (still logged in) is parked here for
`pool.park_seconds`; the account's next session takes it over after its password has been
checked against the one that opened the connection. The pool keeps a salted digest of that
password only (HMAC-SHA256, random salt per connection, compared in constant time); the clear
password is never stored here: a parked connection that breaks is simply dropped, and the
next session opens a fresh one with its own password.

Handing a connection over on a password match means the server is not asked again, so a
password changed (or revoked, or an account disabled) upstream keeps working on a parked
connection. Two rules bound that:

- `pool.max_age_seconds`, counted from the connection's upstream LOGIN and never refreshed:
  an older connection is logged out instead of being handed over or parked again. It is the
  longest an old password can keep working after it changed upstream.
- a fresh login that succeeds for an account retires every connection of that account opened
  with another password: parked ones are logged out at once, ones in use by a session are
  logged out when that session ends.

Connections are parked by back end and account (bridge.routing): a session takes only a
connection of its own back end, opened with exactly the settings and upstream login its route
gives now. When an account's route changes (a lookup answer naming another server), its
connections to the old back end are retired (`route_changed`). A configuration reload retires
every connection its back end's new settings no longer match (`retire_stale`): a reload that
changes one route retires only that back end's connections.

While parked, a connection is held by a keeper task (`keep_alive`: IDLE, re-issued every
`pool.keepalive_seconds`, or NOOP), which also keeps the engine's maildrop listing warm. A
connection that breaks (server restart, `doveadm kick`, network) leaves the pool at once. A
connection is handed over still in IDLE: the session's first command sends DONE with it, so
a login on a parked connection costs one round trip to the server, not two.
Caps: `pool.max_per_account` and `pool.max_connections`, the least recently parked logged out
first.

Opening a connection retries a server that is not listening (bridge.imap.reconnect); a
session's checked-out connection is a `Lease` (bridge.imap.lease).
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from bridge.config import BridgeSettings, account_key
from bridge.imap.capacity import ConnectionSlots
from bridge.imap.channel import StopSignal
from bridge.imap.engines import Credential, open_mailbox
from bridge.imap.errors import UpstreamError
from bridge.imap.lease import Lease, digest_matches, password_digest
from bridge.imap.mailbox import ImapMailbox
from bridge.imap.reconnect import Opener, connect_retrying
from bridge.ops import metrics
from bridge.ops.logs import get_logger
from bridge.routing.routes import Backend

_log = get_logger(component="pool")
_SHUTDOWN_GRACE_SECONDS = 3.0


@dataclass(eq=False)
class _Parked:
    account: str  # its account_key
    salt: bytes
    digest: bytes
    mailbox: ImapMailbox
    # Trio time of the connection's upstream LOGIN, and where and as whom it was opened.
    logged_in_at: float
    backend: Backend
    stop: StopSignal = field(default_factory=StopSignal)
    done: trio.Event = field(default_factory=trio.Event)
    claimed: bool = False
    evicted: str | None = None
    # Logged out to make room for another connection (bridge.imap.capacity).
    reclaimed: bool = False

    def matches(self, password: str) -> bool:
        return digest_matches(self.salt, self.digest, password)


class UpstreamPool:
    """Checks out upstream connections (parked or fresh) and takes them back."""

    def __init__(self, settings: Callable[[], BridgeSettings], opener: Opener = open_mailbox) -> None:
        self._settings = settings
        self._opener = opener
        # Least recently parked first.
        self._parked: OrderedDict[int, _Parked] = OrderedDict()
        # Connections checked out by sessions now (retired in place when they must not be
        # parked again).
        self._leases: set[Lease] = set()
        # The same two by account_key: a login looks at its own account's connections only,
        # not at every session's (thousands of sessions make that a cost on every login).
        self._parked_of: dict[str, dict[int, _Parked]] = {}
        self._leases_of: dict[str, set[Lease]] = {}
        self._nursery: trio.Nursery | None = None
        # Every connection open, in use or parked, counted against pool.max_connections.
        self.slots = ConnectionSlots(lambda: self._settings().pool.max_connections)
        # May a connection opened for this back end still serve it? (bridge.routing.router
        # answers for the routes; without routes, [upstream] as it is now.)
        self.is_current: Callable[[Backend], bool] = lambda backend: backend.upstream == self._settings().upstream

    # -- running ------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[UpstreamPool]:
        """Host the keeper tasks of parked connections for the block's duration; on the way
        out every parked connection is logged out (bounded by a short grace). Connections
        returned while the pool is not running are logged out instead of parked."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            metrics.POOL_MAX_CONNECTIONS.set(self._settings().pool.max_connections)
            try:
                yield self
            finally:
                self._nursery = None
                for entry in list(self._parked.values()):
                    self._evict(entry, "shutdown")
                nursery.cancel_scope.deadline = trio.current_time() + _SHUTDOWN_GRACE_SECONDS

    @property
    def parked(self) -> int:
        return len(self._parked)

    # -- checking out -------------------------------------------------------------------------

    def default_backend(self, account: str) -> Backend:
        """[upstream] as it is now, logged in as the account itself (no routes)."""
        return Backend("default", self._settings().upstream, account)

    async def checkout(
        self, account: str, password: str, credential: Credential | None = None, *, backend: Backend | None = None
    ) -> Lease:
        """A logged-in connection for `account` on `backend` (default: [upstream]): a parked
        one of that back end whose password matches, else a fresh one. `credential`: what a
        fresh connection logs in with, if not `password` (OAuth2: the session's device
        password is `password`, compared with the parked connections', and the token comes
        from `credential`). Raises AuthenticationFailed, UpstreamUnavailable or UpstreamError."""
        settings = self._settings()
        backend = backend or self.default_backend(account)
        salt = secrets.token_bytes(16)
        digest = password_digest(salt, password)
        # Connections are the account's however its name is spelt (the upstream folds case).
        key = account_key(account)
        self._retire_other_routes(key, backend)
        mismatch = False
        for entry in reversed(list(self._parked_of.get(key, {}).values())):
            if entry.backend.name != backend.name:
                continue
            if not entry.matches(password):
                # Maybe the password changed upstream, maybe it is wrong: a fresh login
                # decides (and if it succeeds, retires the connection opened with the other).
                mismatch = True
                continue
            if self._parked.get(id(entry)) is not entry:
                # Claimed by another session (or dropped) while this one waited on a claim
                # that failed: the list walked here is a copy.
                continue
            unfit = self._unfit(entry.logged_in_at, entry.backend, settings, backend)
            if unfit is not None:
                self._evict(entry, unfit)
                continue
            mailbox = await self._claim(entry, backend.upstream.timeout_seconds)
            if mailbox is not None:
                metrics.UPSTREAM_REUSES.inc()
                _log.info("upstream_reused", backend=backend.name)
                lease = self._lease(mailbox, key, salt, digest, entry.logged_in_at, entry.backend)
                lease.reused = True
                return lease
        _log.info(
            "upstream_fresh", reason="password_mismatch" if mismatch else "none_parked", engine=backend.upstream.engine,
            backend=backend.name,
        )
        logged_in_at = trio.current_time()
        mailbox = await self._open(backend, password if credential is None else credential)
        self._retire_other_passwords(key, password)
        return self._lease(mailbox, key, salt, digest, logged_in_at, backend)

    def _lease(
        self, mailbox: ImapMailbox, account: str, salt: bytes, digest: bytes, logged_in_at: float, backend: Backend
    ) -> Lease:
        lease = Lease(self, mailbox, account, salt, digest, logged_in_at, backend)
        self._leases.add(lease)
        self._leases_of.setdefault(account, set()).add(lease)
        return lease

    def _drop_lease(self, lease: Lease) -> None:
        self._leases.discard(lease)
        of_account = self._leases_of.get(lease.account)
        if of_account is not None:
            of_account.discard(lease)
            if not of_account:
                del self._leases_of[lease.account]

    def _unfit(
        self, logged_in_at: float, opened_for: Backend, settings: BridgeSettings, wanted: Backend | None = None
    ) -> str | None:
        """Why a connection must not be handed over (to a session that wants `wanted`) or
        parked again, if it must not."""
        if trio.current_time() - logged_in_at >= settings.pool.max_age_seconds:
            return "max_age"
        if wanted is not None and (opened_for.upstream, opened_for.login) != (wanted.upstream, wanted.login):
            return "upstream_changed"
        if not self.is_current(opened_for):
            return "upstream_changed"
        return None

    def _retire_other_routes(self, account: str, backend: Backend) -> None:
        """`account` (an account_key) is served by `backend` now: its connections to any other
        back end serve no further session (the account moved, or a lookup says so)."""
        for entry in list(self._parked_of.get(account, {}).values()):
            if entry.backend.name != backend.name:
                self._evict(entry, "route_changed")
        for lease in self._leases_of.get(account, ()):
            if lease.retired is None and lease.backend.name != backend.name:
                lease.retired = "route_changed"

    def _retire_other_passwords(self, account: str, password: str) -> None:
        """`password` just logged `account` (an account_key) in upstream: connections opened
        with any other password of it must serve no further session (the other one may be an
        old password, changed since)."""
        for entry in list(self._parked_of.get(account, {}).values()):
            if not entry.matches(password):
                self._evict(entry, "password_changed")
        for lease in self._leases_of.get(account, ()):
            if lease.retired is None and not lease.matches(password):
                lease.retired = "password_changed"

    def retire_stale(self) -> int:
        """After a configuration reload: log out every parked connection whose back end the
        configuration now gives other settings (or no longer has), and retire those in use
        (their sessions keep them to the end). Returns how many parked connections were
        logged out."""
        stale = [entry for entry in self._parked.values() if not self.is_current(entry.backend)]
        for entry in stale:
            self._evict(entry, "upstream_changed")
        for lease in self._leases:
            if lease.retired is None and not self.is_current(lease.backend):
                lease.retired = "upstream_changed"
        return len(stale)

    async def _claim(self, entry: _Parked, wait_seconds: float) -> ImapMailbox | None:
        if entry.claimed:
            return None  # never hand one connection to two sessions
        entry.claimed = True
        self._forget(entry)
        entry.stop.set()
        # The keeper stops reading and hands the connection over with its IDLE still running:
        # the session's first command ends it (bridge.imap.trio_engine.channel, `_open_idle`).
        with trio.move_on_after(wait_seconds):
            await entry.done.wait()
        if entry.done.is_set() and entry.mailbox.usable:
            return entry.mailbox
        _log.info("pool_connection_dropped", reason="broken")
        await self._close(entry.mailbox, entry.reclaimed)
        return None

    async def _open(self, backend: Backend, credential: Credential) -> ImapMailbox:
        upstream = backend.upstream
        deadline = trio.current_time() + upstream.timeout_seconds
        await self.slots.acquire(self._reclaim_one, deadline)
        try:
            return await connect_retrying(self._opener, backend, credential, deadline)
        except BaseException:
            self.slots.release()
            raise

    def _reclaim_one(self) -> bool:
        """Start logging out one connection to make room (bridge.imap.capacity): the least
        recently parked, else that of the session idle longest between commands (it gets a
        connection back for its next command). False: every connection is busy."""
        if self._parked:
            entry = next(iter(self._parked.values()))
            entry.reclaimed = True
            self._evict(entry, "total_cap")
            return True
        idle = [lease for lease in self._leases if not lease.busy and not lease.taken]
        if not idle or self._nursery is None:
            return False
        lease = min(idle, key=lambda candidate: candidate.idle_since)
        lease.taken = True
        self._drop_lease(lease)
        metrics.POOL_EVICTIONS.labels("idle_session").inc()
        _log.debug("pool_connection_closed", reason="idle_session", backend=lease.backend.name)
        self._nursery.start_soon(self._close, lease.mailbox, True)
        return True

    async def _close(self, mailbox: ImapMailbox, reclaimed: bool = False) -> None:
        """Log out and close a connection; its slot is free once it is closed."""
        try:
            await mailbox.aclose()
        finally:
            self.slots.release(reclaimed)

    # -- taking back --------------------------------------------------------------------------

    async def checkin(self, lease: Lease) -> None:
        if lease.taken:
            return  # logged out already, to make room for another session's connection
        self._drop_lease(lease)
        mailbox = lease.mailbox
        bridge_settings = self._settings()
        settings = bridge_settings.pool
        metrics.POOL_MAX_CONNECTIONS.set(settings.max_connections)
        if not mailbox.usable:
            if mailbox.abandoned:
                # Closed half-way through a command its session gave up (a client that left
                # in the middle of a RETR): routine, the session's end says why.
                _log.debug("pool_connection_dropped", reason="abandoned")
            else:
                # Broken in the session, or closed by the server since its last command.
                _log.info("pool_connection_dropped", reason="broken")
            await self._close(mailbox)
            return
        if self._nursery is None or settings.park_seconds <= 0:
            await self._close(mailbox)
            return
        retired = lease.retired or self._unfit(lease.logged_in_at, lease.backend, bridge_settings)
        if retired is not None:
            _log.log(_level(retired), "pool_connection_closed", reason=retired, backend=lease.backend.name)
            await self._close(mailbox)
            return
        entry = _Parked(lease.account, lease.salt, lease.digest, mailbox, lease.logged_in_at, lease.backend)
        self._parked[id(entry)] = entry
        same_account = self._parked_of.setdefault(entry.account, {})
        same_account[id(entry)] = entry
        metrics.UPSTREAM_POOLED.inc()
        metrics.backend_pooled(entry.backend.name).inc()
        # Parked for park_seconds, or until the connection reaches its maximum age.
        age_left = settings.max_age_seconds - (trio.current_time() - lease.logged_in_at)
        expiry = (settings.park_seconds, "expired") if settings.park_seconds <= age_left else (age_left, "max_age")
        self._nursery.start_soon(self._keep, entry, expiry, settings.keepalive_seconds)
        for old in list(same_account.values())[: max(0, len(same_account) - settings.max_per_account)]:
            self._evict(old, "account_cap")
        while len(self._parked) > settings.max_connections:
            self._evict(next(iter(self._parked.values())), "total_cap")
        self.slots.wake()
        _log.debug("pool_parked", parked=len(self._parked))

    def _forget(self, entry: _Parked) -> None:
        same_account = self._parked_of.get(entry.account)
        if same_account is not None:
            same_account.pop(id(entry), None)
            if not same_account:
                del self._parked_of[entry.account]
        if self._parked.pop(id(entry), None) is not None:
            metrics.UPSTREAM_POOLED.dec()
            metrics.backend_pooled(entry.backend.name).dec()

    def _evict(self, entry: _Parked, reason: str) -> None:
        if entry.evicted is None and self._parked.get(id(entry)) is entry:
            metrics.POOL_EVICTIONS.labels(reason).inc()
        self._forget(entry)
        entry.evicted = reason
        entry.stop.set()

    async def _keep(self, entry: _Parked, expiry: tuple[float, str], keepalive_seconds: float) -> None:
        error: str | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def expire() -> None:
                    seconds, reason = expiry
                    await trio.sleep(seconds)
                    if not entry.claimed and entry.evicted is None:
                        self._evict(entry, reason)

                nursery.start_soon(expire)
                try:
                    await entry.mailbox.keep_alive(entry.stop, keepalive_seconds)
                    if entry.claimed:
                        # Handed over now: the session need not wait for the expiry timer
                        # to unwind (nothing below touches the connection).
                        entry.done.set()
                except UpstreamError as exc:
                    # Caught inside the nursery: escaping it, the error would arrive wrapped in
                    # an ExceptionGroup, which the handlers below do not match (and during a
                    # shutdown, grouped with Cancelled, it took the whole service down).
                    error = str(exc)
                finally:
                    nursery.cancel_scope.cancel()
        except UpstreamError as exc:
            error = str(exc)
        except Exception:  # a keeper must never take the service down
            _log.exception("pool_keeper_crashed")
            error = "keeper crashed"
        finally:
            if entry.claimed:
                entry.done.set()
            else:
                self._forget(entry)
                if error is not None:
                    _log.info("pool_connection_dropped", reason="broken", error=error)
                else:
                    _log.log(_level(entry.evicted), "pool_connection_closed", reason=entry.evicted, backend=entry.backend.name)
                await self._close(entry.mailbox, entry.reclaimed)
                entry.done.set()


def _level(reason: str | None) -> int:
    # Retirements for security reasons are worth an operator's eye; routine ones are not.
    return logging.INFO if reason in ("password_changed", "upstream_changed", "route_changed") else logging.DEBUG
