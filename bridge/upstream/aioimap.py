"""Upstream engine: aioimaplib under trio-asyncio.

This is the only module that imports aioimaplib or trio_asyncio. It exposes `upstream_runtime()`
(the asyncio loop the engine needs, opened inside Trio) and `open_mailbox()` (an authenticated
connection with the maildrop folder selected, implementing `UpstreamMailbox`).

aioimaplib 2.0.3 needs these fixes, all made here by subclassing (pinned version):
- its response handler recurses once per line (a ~1,000-line read raises RecursionError) and
  copies the unread tail for every line; `_handle_responses` is replaced by a loop over offsets;
- its FETCH completeness check rescans every line of the response for every new line
  (quadratic); `_IncrementalFetchCommand` keeps a running parenthesis depth instead;
- a lost connection is not surfaced, the next command hangs; `connection_lost` now fails every
  pending command at once;
- it formats every received chunk into a debug log string even when debug is off (and would
  log message bodies); `data_received` and `send` skip that;
- LOGIN does not quote the user name; we authenticate with our own commands;
- NO/BAD come back as result strings; every call here checks them and raises typed errors;
- concurrent commands on one connection corrupt its state; each mailbox serialises with a lock;
- under trio-asyncio any exception escaping an asyncio callback kills `trio.run`;
  `upstream_runtime()` installs an exception handler that logs instead;
- it has no STARTTLS: `_connect` sends it and upgrades with `loop.start_tls`, dropping any
  plaintext the server sent after its OK (a response-injection defence), then asks for the
  capabilities again (RFC 3501 6.2.1: those from before TLS must be forgotten);
- it takes "PREAUTH" or "OK" anywhere in the greeting for its status; `welcome` goes by the
  status alone and refuses PREAUTH (interface.PreauthGreeting);
- it reads a literal of whatever size the server announces; each command here has a budget
  of literal bytes (interface.MAX_*), and a literal beyond it drops the connection.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio
from aioimaplib import aioimaplib as _aio

from bridge import metrics
from bridge.config import UpstreamSettings
from bridge.observability import get_logger
from bridge.tls import load_client_context
from bridge.upstream import imap_syntax
from bridge.upstream.interface import (
    MAX_BODY_FETCH_BYTES,
    MAX_MAILDROP_MESSAGES,
    MAX_OTHER_LITERAL_BYTES,
    TEXT_FETCH_LIMIT,
    AuthenticationFailed,
    ChunkedRangeReader,
    MailboxSnapshot,
    MessageGone,
    MessageInfo,
    PreauthGreeting,
    RangeReader,
    UpstreamError,
    UpstreamImplausible,
    UpstreamNotListening,
    UpstreamUnavailable,
    chunked_uid_sets,
)

_T = TypeVar("_T")
_log = get_logger(component="upstream")

# Codes (RFC 5530) with which a server says "not now" rather than "wrong password".
_TEMPORARY_AUTH_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "CONTACTADMIN"})
_CLOSE_GRACE_SECONDS = 2.0
_PARTIAL = re.compile(r"BODY\.PEEK\[[^\]]*\]<\d+\.(\d+)>", re.IGNORECASE)


def _literal_budget(message_set: str, message_parts: str) -> int:
    """The literal bytes a FETCH may bring back (interface.MAX_*)."""
    if "BODY.PEEK[" not in message_parts.upper():
        return MAX_OTHER_LITERAL_BYTES
    partial = _PARTIAL.search(message_parts)
    if partial is not None and message_set.isdigit():
        return int(partial.group(1)) + MAX_OTHER_LITERAL_BYTES
    return MAX_BODY_FETCH_BYTES


def _log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    _log.warning(
        "upstream_asyncio_error",
        message=context.get("message"),
        error=type(exc).__name__ if exc else None,
    )


@asynccontextmanager
async def upstream_runtime() -> AsyncIterator[None]:
    """The asyncio loop (inside Trio) that the engine runs on; wrap the service in it."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        yield


class _IncrementalFetchCommand(_aio.FetchCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._depth = 0

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        # Literal payloads arrive as bytearray and never count towards parentheses.
        if type(line) is bytes:
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._depth = line.count(b"(") - line.count(b")")
            else:
                self._depth += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._depth > 0


class _ClientProtocol(_aio.IMAP4ClientProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.lost = False
        self.greeting_error: str | None = None
        # STARTTLS: the tag of the command in flight, and whether its tagged answer came in.
        # From that answer until TLS takes over, received bytes are plaintext nobody may
        # inject into the encrypted session: they are dropped.
        self.starttls_tag: bytes | None = None
        self.plaintext_closed = False
        # Literal bytes the current command may still bring back (set per command, see
        # AioImapMailbox._call); `violation` says why the connection was dropped past it.
        self.literal_budget = MAX_OTHER_LITERAL_BYTES
        self.violation: str | None = None

    def data_received(self, d: bytes) -> None:
        if self.plaintext_closed or self.violation is not None:
            return
        try:
            self._handle_responses(self.incomplete_line + d, self._handle_line, self.current_command)
            self.incomplete_line = b""
            self.current_command = None
        except _aio.IncompleteRead as incomplete_read:
            self.current_command = incomplete_read.cmd
            self.incomplete_line = incomplete_read.data

    def send(self, line: str, scrub: str | None = None) -> None:
        # surrogateescape: credentials that were not valid UTF-8 go out as the bytes the client sent.
        self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_pending(_aio.Abort("upstream connection lost"))

    def _refuse(self, violation: str) -> None:
        """The server sent something no sane server does: drop the connection."""
        self.violation = violation
        self._fail_pending(_aio.Abort(violation))
        if self.transport is not None:
            self.transport.close()

    def _fail_pending(self, error: Exception) -> None:
        pending = [*self.pending_async_commands.values(), self.pending_sync_command]
        for command in pending:
            if command is not None and not command._event.is_set():
                command._exception = error
                command.close(b"connection lost", "BYE")

    async def welcome(self, command: bytes) -> None:
        # aioimaplib looks for "PREAUTH" and "OK" anywhere in the greeting: "* BYE ... OK"
        # would pass for OK, and "PREAUTH" in an OK greeting's text would skip LOGIN and
        # STARTTLS. Only the greeting's status counts here, and PREAUTH is refused
        # (interface.PreauthGreeting).
        status = command[:10].upper()
        try:
            if status.startswith(b"* PREAUTH"):
                raise PreauthGreeting()
            if not status.startswith(b"* OK"):
                raise _aio.Error(command.decode("utf-8", "replace"))
            await super().welcome(b"* OK")
        except Exception as exc:  # PREAUTH, a BYE greeting or a non-IMAP4rev1 server
            self.greeting_error = "PREAUTH" if isinstance(exc, PreauthGreeting) else type(exc).__name__
            async with self.state_condition:
                self.state = _aio.LOGOUT
                self.state_condition.notify_all()

    def _handle_responses(
        self,
        data: bytes,
        line_handler: Callable[[bytes, _aio.Command], _aio.Command | None],
        current_cmd: _aio.Command | None = None,
    ) -> None:
        pos, end_of_data = 0, len(data)
        while True:
            if pos >= end_of_data:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise _aio.IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                missing = current_cmd._expected_size - len(current_cmd._resp_literal_data)
                piece = data[pos : pos + missing]
                pos += len(piece)
                current_cmd.append_literal_data(piece)
                if current_cmd.wait_literal_data():
                    raise _aio.IncompleteRead(current_cmd)
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                raise _aio.IncompleteRead(current_cmd, data[pos:])
            line = data[pos:line_end]
            pos = line_end + 2
            command = line_handler(line, current_cmd)
            if self.starttls_tag is not None and line.startswith(self.starttls_tag + b" "):
                self.plaintext_closed = True
                return
            literal = _aio.literal_data_re.match(line)
            if literal:
                size = int(literal.group("size"))
                if size > self.literal_budget:
                    self._refuse(f"a {size}-byte literal, more than the {self.literal_budget} bytes left for this command")
                    return
                self.literal_budget -= size
                if command is None:
                    command = _aio.Command("NIL", "unused", loop=self.loop)
                command.begin_literal_data(int(literal.group("size")))
                current_cmd = command
            elif command is not None and command.wait_data():
                current_cmd = command
            else:
                current_cmd = None

    async def fetch(
        self, message_set: str, message_parts: str, by_uid: bool = False, timeout: float | None = None  # noqa: ASYNC109 (aioimaplib signature)
    ) -> _aio.Response:
        self.literal_budget = _literal_budget(message_set, message_parts)
        return await self.execute(
            _IncrementalFetchCommand(
                self.new_tag(), message_set, message_parts,
                prefix="UID" if by_uid else "", loop=self.loop, timeout=timeout,
            )
        )

    async def authenticate(self, *args: str, scrub: str) -> _aio.Response:
        response = await self.execute(_aio.Command(args[0], self.new_tag(), *args[1:], loop=self.loop), scrub=scrub)
        if response.result == "OK":
            self.state = _aio.AUTH
        return response


class _StartTlsRefused(Exception):
    """The server offers no STARTTLS or refused it: never carry on in plaintext."""


async def _connect(settings: UpstreamSettings) -> _ClientProtocol:
    loop = asyncio.get_running_loop()
    protocol = _ClientProtocol(loop)
    context = load_client_context(settings.ca_file, verify=settings.verify) if settings.tls != "none" else None
    if settings.tls == "implicit":
        await loop.create_connection(
            lambda: protocol, settings.host, settings.port, ssl=context, server_hostname=settings.host
        )
    else:
        await loop.create_connection(lambda: protocol, settings.host, settings.port)
    try:
        await protocol.wait(f"{_aio.AUTH}|{_aio.NONAUTH}|{_aio.LOGOUT}")
        if settings.tls == "starttls" and protocol.state == _aio.NONAUTH:
            assert context is not None
            await _starttls(loop, protocol, context, settings.host)
    except BaseException:
        if protocol.transport is not None:
            protocol.transport.close()
        raise
    return protocol


async def _starttls(
    loop: asyncio.AbstractEventLoop, protocol: _ClientProtocol, context: ssl.SSLContext, host: str
) -> None:
    if not protocol.capabilities:
        await protocol.capability()
    if "STARTTLS" not in {c.upper() for c in protocol.capabilities}:
        raise _StartTlsRefused("the server does not offer STARTTLS")
    tag = protocol.new_tag()
    protocol.starttls_tag = tag.encode("ascii")
    response = await protocol.execute(_aio.Command("STARTTLS", tag, loop=loop))
    if response.result != "OK":
        raise _StartTlsRefused(f"the server answered {response.result} to STARTTLS")
    protocol.starttls_tag = None
    # No await between here and start_tls taking the transport over: nothing can slip in.
    protocol.plaintext_closed = False
    protocol.incomplete_line = b""
    transport = await loop.start_tls(protocol.transport, protocol, context, server_hostname=host)
    if transport is None:
        raise ConnectionResetError("connection closed during the TLS handshake")
    protocol.transport = transport
    protocol.capabilities = set()
    await protocol.capability()


class AioImapMailbox:
    """`UpstreamMailbox` on one aioimaplib connection."""

    def __init__(self, protocol: _ClientProtocol, settings: UpstreamSettings) -> None:
        self._protocol = protocol
        self._settings = settings
        self._lock = trio.Lock()
        self._broken = False
        self._capabilities: frozenset[str] = frozenset(c.upper() for c in protocol.capabilities)
        self._selected: str | None = None
        # The maildrop's UIDVALIDITY at the last snapshot: the session's UIDs mean something
        # only within it.
        self._snapshot_uidvalidity: int | None = None

    @property
    def capabilities(self) -> frozenset[str]:
        return self._capabilities - self._settings.ignore_capabilities_set

    @property
    def usable(self) -> bool:
        return not self._broken and not self._protocol.lost

    def _break(self) -> None:
        self._broken = True
        transport = self._protocol.transport
        if transport is not None:
            transport.close()

    async def _call(self, what: str, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        async with self._lock:
            if not self.usable:
                raise UpstreamUnavailable(f"{what}: upstream connection is closed")
            self._protocol.literal_budget = MAX_OTHER_LITERAL_BYTES
            try:
                with trio.fail_after(self._settings.timeout_seconds):
                    return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
            except trio.TooSlowError:
                self._break()
                raise UpstreamUnavailable(f"{what}: no answer within {self._settings.timeout_seconds:g} s") from None
            except (_aio.AioImapException, OSError, asyncio.CancelledError) as exc:
                self._break()
                if self._protocol.violation is not None:
                    raise UpstreamImplausible(f"{what}: {self._protocol.violation}") from None
                raise UpstreamUnavailable(f"{what}: {type(exc).__name__}") from None
            except trio.Cancelled:
                # A command cut off half-way leaves the protocol state unknown.
                self._break()
                raise

    async def _checked(self, what: str, fn: Callable[..., Awaitable[_aio.Response]], *args: Any, **kwargs: Any) -> _aio.Response:
        response = await self._call(what, fn, *args, **kwargs)
        if response.result != "OK":
            raise UpstreamError(f"{what}: server answered {response.result}")
        return response

    async def _login(self, username: str, password: str) -> None:
        caps = self._capabilities
        if "AUTH=PLAIN" in caps and "SASL-IR" in caps:
            # SASL PLAIN carries any byte sequence (RFC 4616); LOGIN's quoted strings cannot.
            token = base64.b64encode(
                b"\0" + username.encode("utf-8", "surrogateescape") + b"\0" + password.encode("utf-8", "surrogateescape")
            ).decode("ascii")
            response = await self._call("login", self._protocol.authenticate, "AUTHENTICATE", "PLAIN", token, scrub=token)
        else:
            try:
                args = (imap_syntax.quote_string(username), imap_syntax.quote_string(password))
            except ValueError:
                raise AuthenticationFailed("credentials cannot be sent to the server") from None
            response = await self._call("login", self._protocol.authenticate, "LOGIN", *args, scrub=password)
        if response.result != "OK":
            text = response.lines[-1] if response.lines else b""
            if response.result == "NO" and imap_syntax.response_code(text) not in _TEMPORARY_AUTH_CODES:
                raise AuthenticationFailed("upstream rejected the credentials")
            raise UpstreamError(f"login: server answered {response.result} [{imap_syntax.response_code(text)}]")
        caps_after = imap_syntax.find_capabilities(list(response.lines))
        if caps_after is None:
            await self._call("capability", self._protocol.capability)
            caps_after = frozenset(c.upper() for c in self._protocol.capabilities)
        self._capabilities = caps_after

    async def _select(self, folder: str) -> _aio.Response:
        self._selected = None
        response = await self._checked("select", self._protocol.select, _wire_name(folder))
        self._selected = folder
        return response

    async def _ensure_selected(self, folder: str) -> None:
        if self._selected != folder:
            await self._select(folder)

    async def _execute(self, what: str, name: str, *args: str, prefix: str = "") -> _aio.Response:
        command = _aio.Command(name, self._protocol.new_tag(), *args, prefix=prefix, loop=self._protocol.loop)
        return await self._checked(what, self._protocol.execute, command)

    async def snapshot(self) -> MailboxSnapshot:
        selected = await self._select(self._settings.mailbox)
        uidvalidity = imap_syntax.find_uidvalidity(selected.lines)
        exists = imap_syntax.find_exists(selected.lines)
        if uidvalidity is None or exists is None:
            raise UpstreamError("select: server sent no UIDVALIDITY or EXISTS")
        if exists > MAX_MAILDROP_MESSAGES:
            self._break()
            raise UpstreamImplausible(f"select: EXISTS {exists}: more than {MAX_MAILDROP_MESSAGES} messages")
        messages: list[MessageInfo] = []
        if exists:
            listing = await self._checked(
                "listing", self._protocol.fetch, "1:*", "(UID RFC822.SIZE FLAGS)", by_uid=True
            )
            seen: set[int] = set()
            for line in listing.lines:
                if type(line) is not bytes:
                    continue
                parsed = imap_syntax.parse_listing_line(line)
                if parsed is None:
                    continue
                uid, size, flags = parsed
                if "\\deleted" in flags or uid in seen:
                    continue
                seen.add(uid)
                messages.append(MessageInfo(uid, size))
            messages.sort(key=lambda info: info.uid)
        self._snapshot_uidvalidity = uidvalidity
        return MailboxSnapshot.of(uidvalidity, messages)

    async def _confirm_maildrop(self) -> None:
        """Select the maildrop afresh before changing it by UID, and make sure it is still the
        folder the snapshot was taken in: a server may keep a session's view of a folder that
        another client deleted and recreated (Dovecot 2.3 does) and apply the old UIDs to the
        new folder's messages. Only a new SELECT reads the folder as it is now."""
        selected = await self._select(self._settings.mailbox)
        if (
            self._snapshot_uidvalidity is not None
            and imap_syntax.find_uidvalidity(selected.lines) != self._snapshot_uidvalidity
        ):
            raise UpstreamError("maildrop UIDVALIDITY changed since the session's snapshot")

    async def fetch_range(self, uid: int, offset: int, length: int) -> bytes:
        await self._ensure_selected(self._settings.mailbox)
        response = await self._call(
            "fetch", self._protocol.fetch, str(uid), f"(BODY.PEEK[]<{offset}.{length}>)", by_uid=True
        )
        data = imap_syntax.extract_body_section(list(response.lines), uid)
        if data is None:
            if response.result in ("OK", "NO"):
                raise MessageGone(f"UID {uid} no longer exists")
            raise UpstreamError(f"fetch: server answered {response.result}")
        if response.result != "OK":
            raise UpstreamError(f"fetch: server answered {response.result}")
        return data

    @asynccontextmanager
    async def open_range(self, uid: int, offset: int, length: int) -> AsyncIterator[RangeReader]:
        # aioimaplib hands over a response only once it is complete: one partial FETCH per
        # upstream.fetch_chunk is as close to streaming as it gets.
        yield ChunkedRangeReader(self, uid, offset, length, self._settings.fetch_chunk)

    async def _remove_selected(self, uids: Sequence[int]) -> None:
        """Flag exactly `uids` of the selected folder \\Deleted and expunge exactly them."""
        pieces = chunked_uid_sets(uids)
        for piece in pieces:
            await self._checked("store", self._protocol.store, piece, "+FLAGS.SILENT", "(\\Deleted)", by_uid=True)
        if "UIDPLUS" in self.capabilities:
            for piece in pieces:
                await self._checked("expunge", self._protocol.expunge, piece, by_uid=True)
        # Without UIDPLUS a plain EXPUNGE would also remove messages other clients flagged;
        # the messages stay flagged \Deleted (hidden from POP) until the folder is expunged by
        # its owner or the server (README, "Deletion, exactly").

    async def delete(self, uids: Sequence[int]) -> None:
        if uids:
            await self._confirm_maildrop()
            await self._remove_selected(uids)

    async def add_flags(self, uids: Sequence[int], flags: str) -> None:
        if uids:
            await self._confirm_maildrop()
            for piece in chunked_uid_sets(uids):
                await self._checked("store", self._protocol.store, piece, "+FLAGS.SILENT", f"({flags})", by_uid=True)

    async def move(self, uids: Sequence[int], folder: str) -> None:
        if not uids:
            return
        await self.ensure_folder(folder)
        await self._confirm_maildrop()
        target = _wire_name(folder)
        if "MOVE" in self.capabilities:
            for piece in chunked_uid_sets(uids):
                await self._execute("move", "MOVE", piece, target, prefix="UID")
            _log.debug("messages_moved", count=len(uids), method="MOVE")
            return
        # RFC 6851's fallback, limited to exactly these UIDs: if the copy fails nothing is
        # flagged; if the expunge fails the originals stay (flagged), never lost.
        for piece in chunked_uid_sets(uids):
            await self._execute("copy", "COPY", piece, target, prefix="UID")
        await self._remove_selected(uids)
        _log.debug("messages_moved", count=len(uids), method="COPY")

    async def ensure_folder(self, folder: str) -> None:
        command = _aio.Command("CREATE", self._protocol.new_tag(), _wire_name(folder), loop=self._protocol.loop)
        response = await self._call("create", self._protocol.execute, command)
        if response.result == "OK":
            return
        # [ALREADYEXISTS] is RFC 5530; older servers just say NO. STATUS tells for sure.
        await self._execute("status", "STATUS", _wire_name(folder), "(UIDNEXT)")

    async def append(self, folder: str, message: bytes) -> None:
        await self._checked("append", self._protocol.append, message, mailbox=_wire_name(folder))

    async def search(self, folder: str, *criteria: str) -> list[int]:
        """UID SEARCH in `folder`; criteria are IMAP search keys (strings already quoted)."""
        if self._selected == folder:
            # A selected folder shows what other sessions appended only after a command
            # that syncs it (NOOP does; Dovecot's CREATE and STATUS do not), and SEARCH
            # answers from this session's view: without the NOOP it misses new messages.
            await self._execute("noop", "NOOP")
        else:
            await self._select(folder)
        response = await self._checked("search", self._protocol.search, *criteria, charset=None, by_uid=True)
        return imap_syntax.parse_search(list(response.lines))

    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]:
        return await self._fetch_sections(folder, uids, "TEXT", f"<0.{TEXT_FETCH_LIMIT}>")

    async def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        return await self._fetch_sections(self._settings.mailbox, uids, "")

    async def _fetch_sections(
        self, folder: str, uids: Sequence[int], section: str, partial: str = ""
    ) -> dict[int, bytes]:
        if not uids:
            return {}
        await self._ensure_selected(folder)
        found: dict[int, bytes] = {}
        for piece in chunked_uid_sets(uids):
            response = await self._checked(
                "fetch", self._protocol.fetch, piece, f"(UID BODY.PEEK[{section}]{partial})", by_uid=True
            )
            for uid, _line, data in imap_syntax.iter_fetch_literals(list(response.lines)):
                if uid is not None:
                    found[uid] = data
        return found

    async def delete_in(self, folder: str, uids: Sequence[int]) -> None:
        if uids:
            await self._ensure_selected(folder)
            await self._remove_selected(uids)

    async def keep_alive(self, stop: trio.Event, interval: float) -> None:
        """Hold a parked connection (bridge.upstream.pool) until `stop` is set: NOOP every
        `interval` seconds. This engine keeps no warm listing; `snapshot` re-selects."""
        while True:
            with trio.move_on_after(interval):
                await stop.wait()
                return
            await self._checked("noop", self._protocol.noop)

    async def aclose(self) -> None:
        if not self.usable:
            self._break()
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE_SECONDS):
            try:
                async with self._lock:
                    await trio_asyncio.aio_as_trio(self._protocol.logout)()
            except Exception:  # logging out is a courtesy; the connection closes regardless
                pass
        self._break()


def _wire_name(folder: str) -> str:
    return imap_syntax.quote_string(imap_syntax.encode_mailbox_name(folder))


async def open_mailbox(settings: UpstreamSettings, username: str, password: str) -> AioImapMailbox:
    """Connect, authenticate as the POP3 user. Raises AuthenticationFailed or UpstreamUnavailable."""
    try:
        with trio.fail_after(settings.timeout_seconds):
            protocol = await trio_asyncio.aio_as_trio(_connect)(settings)
    except trio.TooSlowError:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("timeout").inc()
        raise UpstreamUnavailable(f"connect: no greeting within {settings.timeout_seconds:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        # Not "unavailable": retrying cannot help until the certificate or upstream.ca_file changes.
        metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
        raise UpstreamError(f"tls: certificate verification failed: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
        raise UpstreamError(f"tls: handshake failed: {exc.reason or type(exc).__name__}") from None
    except _StartTlsRefused as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
        raise UpstreamError(f"starttls: {exc} (upstream.tls = \"starttls\")") from None
    except _aio.AioImapException as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable(f"connect: {type(exc).__name__}") from None
    except ConnectionRefusedError as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("refused").inc()
        raise UpstreamNotListening(f"connect: {exc.strerror or type(exc).__name__}") from None
    except OSError as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("refused").inc()
        raise UpstreamUnavailable(f"connect: {exc.strerror or type(exc).__name__}") from None
    mailbox = AioImapMailbox(protocol, settings)
    if protocol.greeting_error == "PREAUTH":
        mailbox._break()
        metrics.UPSTREAM_CONNECT_FAILURES.labels("preauth").inc()
        raise PreauthGreeting()
    if protocol.state != _aio.NONAUTH:
        mailbox._break()
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable(f"connect: server refused the session ({protocol.greeting_error})")
    metrics.UPSTREAM_CONNECTS.inc()
    try:
        await mailbox._login(username, password)
    except BaseException:
        mailbox._break()
        raise
    return mailbox
