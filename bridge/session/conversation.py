"""One POP3 session: the sans-IO core (bridge.pop3) driven with the client's bytes.

The core decides what every command means; this module does the I/O it asks for: STLS, the
login (`bridge.session.login`), RETR and TOP (`bridge.session.retrieval`), and at QUIT the
deletions by the account's policy (bridge.policy.deletion). A session that ends any other way
(client gone, timeout, error, shutdown) deletes nothing. Its waits for the client are bounded
by the watchdog (bridge.net.client_timeouts): the login timeout until it has logged in, then
autologout, the send timeout and the session limit.

Each session registers itself with the service (bridge.session.registry) for the admin API:
`admin who` lists it, `admin kick` ends it through its kick scope, as a dropped connection
would end it (outcome "kicked", nothing deleted).
"""

from __future__ import annotations

import math
import secrets
import time
from contextlib import ExitStack

import structlog
import trio

from bridge.imap import UpstreamError
from bridge.net.addresses import host_of_peer
from bridge.net.client_stream import SEND_PIECE, ClientStream
from bridge.net.client_timeouts import ClientWait
from bridge.net.listeners import ClientConnection, plaintext_auth_allowed
from bridge.net.tls import HandshakeFailed, accept_tls
from bridge.ops import metrics
from bridge.ops.logs import get_logger
from bridge.policy.deletion import MaildropView, apply_deletions, expire_capability
from bridge.pop3 import (
    NEED_DATA,
    SUPPORTED_MECHANISMS,
    Close,
    CommitRequest,
    LoginRequest,
    Pop3Server,
    RetrieveRequest,
    Send,
    StartTls,
)
from bridge.session.errors import EndSession
from bridge.session.login import LoginRefused, log_in, refuse
from bridge.session.message_cache import AccountCache
from bridge.session.readahead import Readahead
from bridge.session.registry import SessionRecord
from bridge.session.retrieval import Retriever
from bridge.session.services import SharedServices
from bridge.session.uidl import maildrop_from_snapshot
from bridge.session.upstream import SessionUpstream

_log = get_logger()
_BYTES_SENT = metrics.BYTES_SENT
_RECEIVE_SIZE = 65536


class Pop3Session:
    def __init__(
        self, stream: trio.abc.Stream, peer: str, services: SharedServices, client: ClientConnection | None = None
    ) -> None:
        self._stream = stream
        # The session's waits for its client and their timeouts (bridge.net.client_timeouts).
        self._wait = ClientWait()
        self._peer = peer
        self._services = services
        self._settings = services.settings
        self._io = ClientStream(stream, self._wait, poll_seconds=self._settings.pop3.poll_microseconds / 1e6)
        # The real client (behind a PROXY balancer, the one its header named) and whether its
        # connection is encrypted already (bridge.net.listeners).
        self._client = client or ClientConnection(stream, host_of_peer(peer), peer)
        pop3 = self._settings.pop3
        self._core = Pop3Server(
            max_line_length=pop3.max_line_length,
            implementation=pop3.implementation,
            extra_capabilities=[expire_capability(self._settings, None)],
            sasl_mechanisms=SUPPORTED_MECHANISMS,
            stls_available=pop3.stls and services.server_tls is not None,
            tls_active=self._client.tls_active,
            plaintext_auth_allowed=plaintext_auth_allowed(
                pop3.allow_plaintext_auth, self._client.address, balancer_local=self._client.balancer_local
            ),
        )
        # A logger bound once for the per-command debug event (the module's lazy logger builds
        # a new one on every call, and the event is on the path of every RETR), or None.
        self._command_log = _log.bind() if self._settings.logging.level == "debug" else None
        # The session's upstream connection once logged in, held per command.
        self._upstream: SessionUpstream | None = None
        self._view: MaildropView | None = None
        self._retriever: Retriever | None = None
        self._background: trio.Nursery | None = None
        self._exits = ExitStack()
        self._session_deadline = math.inf
        self.session_id = secrets.token_hex(6)
        self._backend = "default"
        self._login_attempts = 0
        # What `admin who` shows; `admin kick` cancels `_kick`.
        self._kick = trio.CancelScope()
        self.record = SessionRecord(self.session_id, self._peer, self._client.tls_active, end=self._kick.cancel)

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(session=self.session_id, peer=self._peer)
        started = time.monotonic()
        pop3 = self._settings.pop3
        now = trio.current_time()
        if pop3.session_timeout_seconds:
            self._session_deadline = now + pop3.session_timeout_seconds
        # Until it has logged in, the client has pop3.login_timeout_seconds (_login lifts it).
        if now + pop3.login_timeout_seconds < self._session_deadline:
            self._io.deadline, self._io.deadline_reason = now + pop3.login_timeout_seconds, "login_timeout"
        else:
            self._io.deadline = self._session_deadline
        _log.info("session_start", tls=self._client.tls_active, proxied_by=self._client.proxied_by)
        metrics.SESSIONS_ACTIVE.inc()
        outcome = "error"
        self._services.watchdog.add(self._wait)
        self._services.sessions.register(self.record)
        try:
            with self._kick:
                outcome = await self._converse_in_time()
            if self._kick.cancelled_caught:
                outcome = "kicked"
        except EndSession as end:
            outcome = end.outcome
        except trio.Cancelled:
            # Only the service cancels sessions: shutdown after the grace period.
            outcome = "shutdown"
            raise
        except trio.BrokenResourceError:
            outcome = "client_gone"
        except trio.ClosedResourceError:
            outcome = "closed"
        except Exception:
            _log.exception("session_crashed")
        finally:
            self._services.sessions.unregister(self.record)
            self._services.watchdog.discard(self._wait)
            await self._cleanup()
            # Counted and logged before it stops being active: whoever sees no active session
            # sees every ended one in the totals and the log.
            metrics.SESSIONS.labels(outcome).inc()
            _log.info("session_end", outcome=outcome, seconds=round(time.monotonic() - started, 3))
            metrics.SESSIONS_ACTIVE.dec()

    async def _cleanup(self) -> None:
        if self._retriever is not None:
            self._retriever.close()
        with trio.CancelScope(shield=True):
            if self._upstream is not None:
                await self._upstream.release()
            self._exits.close()
            with trio.move_on_after(1):
                await self._stream.aclose()

    async def _send(self, data: bytes) -> bool:
        """True if the client was slower than the data (the send had to wait for it)."""
        # A client that stops reading is dropped after pop3.send_timeout_seconds.
        waited = await self._io.send(data, self._settings.pop3.send_timeout_seconds)
        self._count_sent(len(data))
        return waited

    async def _send_file(self, fd: int, length: int, start: int = 0, piece_size: int = SEND_PIECE) -> None:
        await self._io.send_file(fd, length, self._settings.pop3.send_timeout_seconds, start, piece_size)
        self._count_sent(length - start)

    def _count_sent(self, length: int) -> None:
        # The metric and what `admin who` shows, from the same count.
        _BYTES_SENT.inc(length)
        self.record.bytes_sent += length

    async def _receive(self) -> bytes:
        return await self._io.receive(_RECEIVE_SIZE, self._settings.pop3.autologout_seconds)

    async def _converse_in_time(self) -> str:
        with self._wait.scope:
            return await self._converse_with_background()
        # The watchdog ended a wait for the client that ran out of time.
        reason = self._wait.reason
        pop3 = self._settings.pop3
        if reason == "autologout":
            # RFC 1939 autologout: close without a reply and without entering UPDATE.
            _log.info("autologout", seconds=pop3.autologout_seconds)
        elif reason == "login_timeout":
            # Closed like an autologout: without a reply (the client may not be reading).
            _log.info("login_timeout", seconds=pop3.login_timeout_seconds)
        elif reason == "send_timeout":
            _log.info("client_not_reading", seconds=pop3.send_timeout_seconds)
        else:
            _log.info("session_timeout", seconds=pop3.session_timeout_seconds)
        raise EndSession(reason)

    async def _converse_with_background(self) -> str:
        """The conversation, with a nursery for the work it starts in the background (the
        read-ahead's next FETCH); what is still running when it ends is cancelled."""
        try:
            async with trio.open_nursery() as background:
                self._background = background
                try:
                    return await self._converse()
                finally:
                    background.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Background tasks keep their errors to themselves: what arrives here came from
            # the conversation, and its handlers in run() expect it as it was raised.
            raise _sole_exception(group) from None

    async def _converse(self) -> str:
        core = self._core
        await self._send(core.greeting())
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                data = await self._receive()
                retriever = self._retriever
                # A download in order: the reply to this RETR was made while the client read
                # the last one, and goes out before anything else is done.
                if retriever is not None and retriever.prepared is not None and core.take_prepared(
                    data, retriever.prepared
                ):
                    await retriever.send_prepared()
                    continue
                core.receive_data(data)
                if not data:
                    _log.debug("client_closed")
            elif isinstance(event, RetrieveRequest):
                assert self._retriever is not None
                await self._retriever.retrieve(event)
            elif isinstance(event, Send):
                if event.command is not None:
                    # Commands the core answers itself (STAT, LIST, UIDL, DELE, ...); RETR,
                    # TOP and QUIT are counted where their work is done.
                    metrics.command_count(event.command, "ok" if event.data[:1] == b"+" else "err").inc()
                await self._send(event.data)
                for piece in event.rest:
                    await self._send(piece)
            elif isinstance(event, StartTls):
                await self._send(event.data)
                await self._start_tls()
            elif isinstance(event, LoginRequest):
                await self._send(await self._login(event))
            elif isinstance(event, CommitRequest):
                reply, outcome = await self._commit(event)
                await self._send(reply)
                return outcome
            elif isinstance(event, Close):
                return "quit" if self._upstream is None else "closed_without_quit"
            else:  # pragma: no cover - the core's event set is closed
                raise AssertionError(f"unexpected event {event!r}")

    async def _start_tls(self) -> None:
        """STLS: TLS on this connection; the core has already dropped what came before."""
        server_tls = self._services.server_tls
        assert server_tls is not None  # the core offers STLS only with a certificate
        with trio.move_on_after(self._settings.pop3.handshake_timeout_seconds):
            try:
                tls_stream = await accept_tls(self._stream, server_tls.context)
            except HandshakeFailed as exc:
                self._core.tls_failed()
                _log.info("tls_handshake_failed", reason=str(exc))
                raise EndSession("tls_failed") from None
            self._stream = tls_stream
            self._io = ClientStream(tls_stream, self._wait, self._io.deadline, self._io.deadline_reason)
            self._core.tls_established()
            self.record.tls = True
            _log.info("stls_started", version=tls_stream.version())
            return
        self._core.tls_failed()
        _log.info("tls_handshake_failed", reason="timeout")
        raise EndSession("tls_failed")

    async def _login(self, request: LoginRequest) -> bytes:
        core = self._core
        self._login_attempts += 1
        try:
            logged_in = await log_in(
                request, self._services, self._settings, self._client.address, self._exits,
                client=self._client, attempt_number=self._login_attempts,
            )
        except LoginRefused as refusal:
            await refuse(refusal)
            return core.reject_login(refusal.text, refusal.code)
        self._view = logged_in.view
        # From now on the back end's upstream settings (bridge.routing) are the session's.
        self._settings = logged_in.settings
        self._backend = logged_in.backend.name
        record, identity = self.record, logged_in.identity
        record.user, record.account, record.device = request.username, identity.account, identity.device
        record.backend, record.state = self._backend, "transaction"
        self._io.deadline, self._io.deadline_reason = self._session_deadline, "session_timeout"
        snapshot, identity = logged_in.view.snapshot, logged_in.identity
        # The audit record: user, account and device (context), peer (the real client), TLS.
        _log.info(
            "login_ok", messages=len(snapshot.uids), uidvalidity=snapshot.uidvalidity, policy=identity.policy,
            mechanism=request.mechanism, tls=core.tls_active,
        )
        maildrop = maildrop_from_snapshot(snapshot, logged_in.view.uidls)
        upstream = self._settings.upstream
        lease = logged_in.lease
        self._upstream = SessionUpstream(
            self._services.pool, lease, identity.account, logged_in.pool_password, logged_in.credential,
            logged_in.backend, snapshot.uidvalidity,
        )
        self._upstream.between_commands()
        assert self._background is not None
        readahead = Readahead(
            self._upstream, maildrop, upstream.fetch_chunk, self._services.readahead_budget, self._background
        )
        cache = AccountCache(
            self._services.message_cache, f"{upstream.host}:{upstream.port}", lease.account, upstream.mailbox,
            snapshot.uidvalidity,
        )
        self._retriever = Retriever(
            core, self._upstream, readahead, upstream, self._send, self._command_log, cache, self._send_file,
            self._backend,
        )
        return core.accept_login(maildrop, extra_capabilities=[expire_capability(self._settings, identity)])

    async def _commit(self, request: CommitRequest) -> tuple[bytes, str]:
        core = self._core
        assert self._upstream is not None and self._view is not None
        uids = [entry.ref for entry in request.marked]
        self.record.state = "update"
        try:
            with metrics.CommandTimer("QUIT", self._command_log):
                async with self._upstream.using() as mailbox:
                    if self._view.store is not None:
                        # The state records go over the connection QUIT has, maybe not the
                        # login's (bridge.session.upstream).
                        self._view.store.rebind(mailbox)
                    await apply_deletions(mailbox, self._view, uids, self._settings)
        except UpstreamError as exc:
            _log.warning("deletions_failed", count=len(uids), policy=self._view.identity.policy, error=str(exc))
            metrics.backend_error(self._backend, "quit").inc()
            return core.commit_failed("could not apply the deletions on the mail server; try again"), "quit_failed"
        return core.commit_succeeded(), "quit"


def _sole_exception(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group
