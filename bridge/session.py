"""One POP3 session: drives the sans-IO POP3 core with client bytes and an upstream mailbox.

The core (`bridge.pop3`) decides what every command means; this module does the I/O the core
asks for: authenticate upstream and snapshot the maildrop at PASS, stream a message in
partial FETCH chunks for RETR/TOP, apply the deletions at QUIT. A session that ends any other
way (client gone, timeout, error, shutdown) deletes nothing.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from bridge import metrics
from bridge.client_stream import SEND_PIECE, ClientStream
from bridge.client_timeouts import ClientWait, ClientWatchdog
from bridge.config import BridgeSettings
from bridge.delete_policy import MaildropView, apply_deletions, expire_capability, open_maildrop
from bridge.devices import InvalidLogin, resolve_login
from bridge.listeners import ClientConnection, host_of_peer, plaintext_auth_allowed
from bridge.login_limiter import LoginLimiter
from bridge.maildrop_locks import MaildropInUse, MaildropLocks
from bridge.observability import get_logger
from bridge.pop3 import (
    NEED_DATA,
    SUPPORTED_MECHANISMS,
    Close,
    CommitRequest,
    LoginRequest,
    Maildrop,
    MaildropEntry,
    MessageList,
    Pop3Server,
    ResponseCode,
    RetrieveRequest,
    Send,
    StartTls,
)
from bridge.tls import ServerTls
from bridge.upstream import (
    AuthenticationFailed,
    MailboxSnapshot,
    MessageGone,
    UpstreamError,
    UpstreamMailbox,
)
from bridge.upstream.pool import UpstreamPool

_log = get_logger()
_BYTES_SENT = metrics.BYTES_SENT
_RECEIVE_SIZE = 65536
# At most this many messages are fetched in one read-ahead round trip (and at most
# upstream.fetch_chunk bytes of them): a download of 1,000 small messages waits for the
# upstream 4 times instead of 1,000.
_READAHEAD_MESSAGES = 256


def unique_id(uidvalidity: int, uid: int) -> str:
    """UIDL for a message: Dovecot's default pop3_uidl_format (%08Xu%08Xv), so mailboxes that
    move from Dovecot's own POP3 to the bridge keep their UIDLs and devices don't re-download.
    16 characters of 0-9a-f: within RFC 1939's 0x21-0x7E, 70-character rule."""
    return f"{uid:08x}{uidvalidity:08x}"


def maildrop_from_snapshot(snapshot: MailboxSnapshot) -> Maildrop:
    """The session's maildrop. Its messages are worked out once per snapshot: the engine
    hands every session the same snapshot while the mailbox stays unchanged."""

    def messages() -> MessageList:
        uidvalidity = snapshot.uidvalidity
        return MessageList(snapshot.sizes, [unique_id(uidvalidity, uid) for uid in snapshot.uids], snapshot.uids)

    return Maildrop(snapshot.memo("pop3_messages", messages))


class _CommandTimer:
    """Counts and times one RETR, TOP or QUIT (metrics, and with `log` a debug log event). A
    class, not a generator context manager: a download runs it once per message."""

    __slots__ = ("command", "log", "started", "value")

    def __init__(self, command: str, log: Any) -> None:
        self.command = command
        self.log = log
        self.value = "ok"  # "err" once the command is answered -ERR

    def __enter__(self) -> _CommandTimer:
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        command = self.command
        if exc_type is not None:
            metrics.command_count(command, "error").inc()
            return
        seconds = time.monotonic() - self.started
        metrics.command_count(command, self.value).inc()
        if command != "QUIT" and self.value == "ok":
            metrics.retrieve_time(command).observe(seconds)
        if self.log is not None:
            self.log.debug("command", command=command, ms=round(seconds * 1000, 2))


def _count_login_failure(reason: str) -> None:
    metrics.LOGINS.labels("failed").inc()
    metrics.LOGIN_FAILURES.labels(reason).inc()


class _EndSession(Exception):
    """Stop the session now, without a reply (the reason is logged where it is raised)."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome


@dataclass
class ServiceState:
    """What sessions of one service share."""

    settings: BridgeSettings
    locks: MaildropLocks = field(default_factory=MaildropLocks)
    active_sessions: int = 0
    # Ends the sessions' waits for their clients that run out of time (autologout, a
    # client not reading, the session limit); the service runs its task.
    watchdog: ClientWatchdog = field(default_factory=ClientWatchdog)

    # Parked connections for the next session of the same account (bridge.upstream.pool); a
    # session's `mailbox.aclose()` hands its connection back here.
    pool: UpstreamPool = field(init=False)

    # Failed-login delays and blocks (bridge.login_limiter); the POP3 side's TLS context, if
    # a certificate is configured (bridge.tls).
    login_limiter: LoginLimiter = field(init=False)
    server_tls: ServerTls | None = None

    def __post_init__(self) -> None:
        self.pool = UpstreamPool(lambda: self.settings)
        self.login_limiter = LoginLimiter(self.settings.login_limits)

    async def connect_upstream(self, username: str, password: str) -> UpstreamMailbox:
        return await self.pool.checkout(username, password)


class Pop3Session:
    def __init__(
        self, stream: trio.abc.Stream, peer: str, service: ServiceState, client: ClientConnection | None = None
    ) -> None:
        self._stream = stream
        # The session's waits for its client and their timeouts (bridge.client_timeouts).
        self._wait = ClientWait()
        self._io = ClientStream(stream, self._wait)
        self._peer = peer
        self._service = service
        self._settings = service.settings
        # The real client (behind a PROXY balancer, the one its header named) and whether its
        # connection is encrypted already (bridge.listeners).
        self._client = client or ClientConnection(stream, host_of_peer(peer), peer)
        pop3 = self._settings.pop3
        self._core = Pop3Server(
            max_line_length=pop3.max_line_length,
            implementation=pop3.implementation,
            extra_capabilities=[expire_capability(self._settings, None)],
            sasl_mechanisms=SUPPORTED_MECHANISMS,
            stls_available=pop3.stls and service.server_tls is not None,
            tls_active=self._client.tls_active,
            plaintext_auth_allowed=plaintext_auth_allowed(
                pop3.allow_plaintext_auth, self._client.address, balancer_local=self._client.balancer_local
            ),
        )
        # A logger bound once for the per-command debug event: the module's lazy logger
        # builds a new one on every call, and the event is on the path of every RETR.
        self._command_log = _log.bind()
        self._mailbox: UpstreamMailbox | None = None
        self._view: MaildropView | None = None
        self._maildrop: Maildrop | None = None
        # Read-ahead for clients downloading small messages in order (bridge.session
        # _first_chunk): UID -> whole message, at most upstream.fetch_chunk bytes in all.
        self._readahead: dict[int, bytes] = {}
        self._last_retrieved = 0
        self._exits = ExitStack()
        self._session_deadline = math.inf
        self.session_id = secrets.token_hex(6)

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
        self._service.watchdog.add(self._wait)
        try:
            outcome = await self._converse_in_time()
        except _EndSession as end:
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
            self._service.watchdog.discard(self._wait)
            await self._cleanup()
            # Counted and logged before it stops being active: whoever sees no active session
            # sees every ended one in the totals and the log.
            metrics.SESSIONS.labels(outcome).inc()
            _log.info("session_end", outcome=outcome, seconds=round(time.monotonic() - started, 3))
            metrics.SESSIONS_ACTIVE.dec()

    async def _cleanup(self) -> None:
        with trio.CancelScope(shield=True):
            if self._mailbox is not None:
                await self._mailbox.aclose()
            self._exits.close()
            with trio.move_on_after(1):
                await self._stream.aclose()

    async def _send(self, data: bytes) -> None:
        # A client that stops reading is dropped after pop3.send_timeout_seconds.
        await self._io.send(data, self._settings.pop3.send_timeout_seconds)
        _BYTES_SENT.inc(len(data))

    async def _receive(self) -> bytes:
        return await self._io.receive(_RECEIVE_SIZE, self._settings.pop3.autologout_seconds)

    async def _converse_in_time(self) -> str:
        with self._wait.scope:
            return await self._converse()
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
        raise _EndSession(reason)

    async def _start_tls(self) -> None:
        """STLS: TLS on this connection; the core has already dropped what came before."""
        server_tls = self._service.server_tls
        assert server_tls is not None  # the core offers STLS only with a certificate
        tls_stream = trio.SSLStream(self._stream, server_tls.context, server_side=True)
        with trio.move_on_after(self._settings.pop3.handshake_timeout_seconds):
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                self._core.tls_failed()
                _log.info("tls_handshake_failed", reason=type(exc.__cause__ or exc).__name__)
                raise _EndSession("tls_failed") from None
            self._stream = tls_stream
            self._io = ClientStream(tls_stream, self._wait, self._io.deadline, self._io.deadline_reason)
            self._core.tls_established()
            _log.info("stls_started", version=tls_stream.version())
            return
        self._core.tls_failed()
        _log.info("tls_handshake_failed", reason="timeout")
        raise _EndSession("tls_failed")

    async def _converse(self) -> str:
        core = self._core
        await self._send(core.greeting())
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                data = await self._receive()
                core.receive_data(data)
                if not data:
                    _log.debug("client_closed")
            elif isinstance(event, RetrieveRequest):
                await self._retrieve(event)
            elif isinstance(event, Send):
                if event.command is not None:
                    # Commands the core answers itself (STAT, LIST, UIDL, DELE, ...); RETR,
                    # TOP and QUIT are counted where the session does their work.
                    metrics.command_count(event.command, "ok" if event.data[:1] == b"+" else "err").inc()
                await self._send(event.data)
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
                return "quit" if self._mailbox is None else "closed_without_quit"
            else:  # pragma: no cover - the core's event set is closed
                raise AssertionError(f"unexpected event {event!r}")

    def _timed(self, command: str) -> _CommandTimer:
        return _CommandTimer(command, self._command_log if self._settings.logging.level == "debug" else None)

    async def _login(self, request: LoginRequest) -> bytes:
        core = self._core
        structlog.contextvars.bind_contextvars(user=request.username)
        try:
            identity = resolve_login(request.username, self._settings.delete)
        except InvalidLogin as exc:
            _log.info("login_failed", reason="device_name")
            _count_login_failure("device_name")
            return core.reject_login(f"invalid login: {exc}", ResponseCode.AUTH)
        structlog.contextvars.bind_contextvars(account=identity.account, device=identity.device)
        limiter, address = self._service.login_limiter, self._client.address
        # Limited by the account as the upstream compares it: "Alice" and "alice" are one.
        # Counted as in progress until the mail server has answered (bridge.login_limiter);
        # may wait for other attempts from this address to end first.
        account = identity.account_key
        attempt = await limiter.begin(address, account)
        if attempt.blocked:
            # Refused without asking the mail server; not counted, so the block does not grow.
            _log.warning("login_blocked", retry_after=round(attempt.retry_after, 1))
            _count_login_failure("blocked")
            await trio.sleep(limiter.blocked_delay(address, account))
            return core.reject_login("too many failed logins, try again later", ResponseCode.SYS_TEMP)
        try:
            mailbox = await self._service.connect_upstream(identity.account, request.password)
        except AuthenticationFailed:
            delay = attempt.failed()
            _log.info("login_failed", reason="credentials", mechanism=request.mechanism, delay=delay)
            _count_login_failure("credentials")
            await trio.sleep(delay)
            return core.reject_login("invalid user name or password", ResponseCode.AUTH)
        except UpstreamError as exc:
            _log.warning("login_failed", reason="upstream", error=str(exc))
            _count_login_failure("upstream")
            return core.reject_login("mail server unavailable, try again later", ResponseCode.SYS_TEMP)
        finally:
            attempt.end()
        try:
            self._exits.enter_context(self._service.locks.hold(identity.lock_key))
        except MaildropInUse:
            await mailbox.aclose()
            _log.info("login_failed", reason="in_use")
            _count_login_failure("in_use")
            return core.reject_login("maildrop already in use by another session", ResponseCode.IN_USE)
        self._mailbox = mailbox
        try:
            view = await open_maildrop(mailbox, identity, self._settings)
        except UpstreamError as exc:
            _log.warning("login_failed", reason="snapshot", error=str(exc))
            _count_login_failure("snapshot")
            self._mailbox = None
            self._exits.close()
            self._exits = ExitStack()
            await mailbox.aclose()
            return core.reject_login("mail server unavailable, try again later", ResponseCode.SYS_TEMP)
        self._view = view
        snapshot = view.snapshot
        metrics.LOGINS.labels("ok").inc()
        limiter.record_success(address, account)
        self._io.deadline, self._io.deadline_reason = self._session_deadline, "session_timeout"
        # The audit record: user, account and device (context), peer (the real client), TLS.
        _log.info(
            "login_ok",
            messages=len(snapshot.uids),
            uidvalidity=snapshot.uidvalidity,
            policy=identity.policy,
            mechanism=request.mechanism,
            tls=core.tls_active,
        )
        self._maildrop = maildrop_from_snapshot(snapshot)
        return core.accept_login(self._maildrop, extra_capabilities=[expire_capability(self._settings, identity)])

    async def _retrieve(self, request: RetrieveRequest) -> None:
        assert self._mailbox is not None
        mailbox = self._mailbox
        entry = request.entry
        command = "RETR" if request.body_lines is None else "TOP"
        with self._timed(command) as timing:
            try:
                data = await self._first_chunk(request)
                if data is not None and len(data) >= entry.size:
                    await self._send_whole(data)
                    return
                if data is not None:
                    await self._send_message(request, data, self._chunk_fetcher(entry))
                    return
                # RETR of a message not read ahead: one partial FETCH of all of it, streamed
                # to the client as the upstream delivers it (memory stays flat).
                async with mailbox.open_range(entry.ref, 0, entry.size) as reader:
                    data = await reader.next_piece()
                    await self._send_message(request, data, lambda _offset: reader.next_piece())
            except MessageGone:
                _log.info("message_gone", uid=entry.ref, number=request.number)
                timing.value = "err"
                await self._send(self._core.refuse_message(f"message {request.number} was removed from the mailbox"))
            except UpstreamError as exc:
                _log.warning("upstream_error", command=command, error=str(exc))
                timing.value = "err"
                await self._send(
                    self._core.refuse_message("mail server unavailable, try again later", ResponseCode.SYS_TEMP)
                )

    def _chunk_fetcher(self, entry: MaildropEntry) -> Callable[[int], Awaitable[bytes]]:
        """The rest of a message after its first piece, one partial FETCH per fetch_chunk: TOP
        usually ends within the first chunk, so streaming all of it would waste the rest."""
        assert self._mailbox is not None
        mailbox, chunk = self._mailbox, self._settings.upstream.fetch_chunk

        async def next_chunk(offset: int) -> bytes:
            return await mailbox.fetch_range(entry.ref, offset, min(chunk, entry.size - offset))

        return next_chunk

    def _readahead_batch(self, number: int) -> list[MaildropEntry]:
        """This message and the next small, not deleted ones: at most _READAHEAD_MESSAGES of
        them and upstream.fetch_chunk bytes."""
        assert self._maildrop is not None
        budget = self._settings.upstream.fetch_chunk
        small = budget // 4
        batch: list[MaildropEntry] = []
        while len(batch) < _READAHEAD_MESSAGES:
            found = self._maildrop.lookup(number)
            number += 1
            if not isinstance(found, MaildropEntry):
                if number > len(self._maildrop):
                    break
                continue
            if found.size > small or found.size > budget:
                break
            budget -= found.size
            batch.append(found)
        return batch

    async def _first_chunk(self, request: RetrieveRequest) -> bytes | None:
        """The first piece of a message: from the read-ahead, or one batched FETCH of this
        and the following small messages when the client reads them in order (POP3 clients
        download 1, 2, 3, ...: one upstream round trip then serves many RETRs), or for TOP a
        partial FETCH of the first chunk. None: a RETR to stream. Raises MessageGone."""
        assert self._mailbox is not None
        entry = request.entry
        sequential = request.number == self._last_retrieved + 1
        self._last_retrieved = request.number
        if not entry.size:
            return b""
        cached = self._readahead.pop(entry.ref, None)
        if cached is not None:
            return cached
        if request.body_lines is not None:
            return await self._mailbox.fetch_range(entry.ref, 0, min(self._settings.upstream.fetch_chunk, entry.size))
        if sequential:
            batch = self._readahead_batch(request.number)
            if len(batch) > 1 and batch[0] is entry:
                found = await self._mailbox.fetch_messages([e.ref for e in batch])
                self._readahead = {e.ref: found[e.ref] for e in batch[1:] if len(found.get(e.ref, b"")) == e.size}
                if entry.ref not in found:
                    raise MessageGone(f"UID {entry.ref} no longer exists")
                return found[entry.ref]
        return None

    async def _send_whole(self, data: bytes) -> None:
        """The +OK line, the body and the terminator in one write: the message is in hand (a
        client downloading hundreds of small messages gets each in one piece)."""
        core = self._core
        status_line = core.start_message()
        encoder = core.message_body_encoder()
        await self._send(b"".join((status_line, encoder.feed(data), encoder.finish())))
        core.end_message()

    async def _send_message(
        self, request: RetrieveRequest, data: bytes, next_chunk: Callable[[int], Awaitable[bytes]]
    ) -> None:
        """The +OK line, the body (starting with `data`, which is in hand) and the terminator."""
        core = self._core
        await self._stream_body(request, core.start_message(), data, next_chunk)
        core.end_message()

    async def _stream_body(
        self, request: RetrieveRequest, status_line: bytes, data: bytes,
        next_chunk: Callable[[int], Awaitable[bytes]],
    ) -> None:
        core, entry = self._core, request.entry
        encoder = core.message_body_encoder()
        pending = [status_line]
        offset = 0
        while True:
            out = encoder.feed(data)
            pending.append(out)
            offset += len(data)
            if encoder.done or offset >= entry.size or not data:
                break
            # More to fetch: what we have goes out first, so the client is never kept
            # waiting on the upstream for bytes we already hold.
            await self._send_pieces(pending)
            pending.clear()
            try:
                data = await next_chunk(offset)
            except (MessageGone, UpstreamError) as exc:
                # Part of the body may be out; a terminator now would pass off a truncated
                # message as whole. Dropping the connection is the only honest answer.
                core.abort_message()
                _log.warning("retrieve_aborted", uid=entry.ref, offset=offset, error=type(exc).__name__)
                raise _EndSession("upstream_failed_mid_message") from None
        pending.append(encoder.finish())
        await self._send_pieces(pending)

    async def _send_pieces(self, pieces: list[bytes]) -> None:
        # Small pieces are joined into one write; a big chunk of a message goes out as it
        # is rather than being copied once more only to sit next to a status line.
        if sum(len(piece) for piece in pieces) <= SEND_PIECE:
            await self._send(b"".join(pieces))
            return
        for piece in pieces:
            if piece:
                await self._send(piece)

    async def _commit(self, request: CommitRequest) -> tuple[bytes, str]:
        core = self._core
        assert self._mailbox is not None and self._view is not None
        uids = [entry.ref for entry in request.marked]
        try:
            with self._timed("QUIT"):
                await apply_deletions(self._mailbox, self._view, uids, self._settings)
        except UpstreamError as exc:
            _log.warning("deletions_failed", count=len(uids), policy=self._view.identity.policy, error=str(exc))
            return (
                core.commit_failed("could not apply the deletions on the mail server; try again"),
                "quit_failed",
            )
        return core.commit_succeeded(), "quit"
