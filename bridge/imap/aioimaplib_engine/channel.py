"""The aioimaplib engine: aioimaplib (protocol fixes in `.protocol`) under trio-asyncio, as an
`ImapChannel`. The only modules that import aioimaplib or trio_asyncio are this package's,
and they are imported only when `upstream.engine = "aioimaplib"` (bridge.imap.engines).

aioimaplib hands an answer over only when it is complete and routes untagged responses by
command name (dropping those no pending command claims), so this channel neither streams a
body (the mailbox reads it in `fetch_chunk` pieces) nor keeps a warm listing. What it returns
is translated into the engine-independent `Reply` and `bridge.imap.wire.Response`, and every
response goes through the same `ServerView` as the trio engine's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio
from aioimaplib import aioimaplib as _aio

from bridge.config import UpstreamSettings
from bridge.imap import syntax
from bridge.imap.aioimaplib_engine.protocol import ClientProtocol, IncrementalFetchCommand
from bridge.imap.channel import Command, Reply, StopSignal, TlsSession
from bridge.imap.errors import (
    PreauthGreeting,
    UpstreamError,
    UpstreamImplausible,
    UpstreamNotListening,
    UpstreamUnavailable,
)
from bridge.imap.interface import RangeReader
from bridge.imap.limits import MAX_OTHER_LITERAL_BYTES
from bridge.imap.untagged import ServerView
from bridge.imap.wire import Response
from bridge.net.keepalive import set_tcp_keepalive
from bridge.net.tls import load_client_context
from bridge.ops import metrics
from bridge.ops.logs import get_logger

_T = TypeVar("_T")
_log = get_logger(component="upstream")


def _log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    _log.warning("upstream_asyncio_error", message=context.get("message"), error=type(exc).__name__ if exc else None)


@asynccontextmanager
async def runtime() -> AsyncIterator[None]:
    """The asyncio loop (inside Trio) this engine runs on. Under trio-asyncio an exception
    escaping an asyncio callback would end `trio.run`: it is logged instead."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_asyncio_error)
        yield


class _StartTlsRefused(Exception):
    """The server offers no STARTTLS or refused it: never carry on in plaintext."""


async def _connect(settings: UpstreamSettings) -> ClientProtocol:
    loop = asyncio.get_running_loop()
    protocol = ClientProtocol(loop)
    context = load_client_context(settings.ca_file, verify=settings.verify) if settings.tls != "none" else None
    if settings.tls == "implicit":
        await loop.create_connection(lambda: protocol, settings.host, settings.port, ssl=context, server_hostname=settings.host)
    else:
        await loop.create_connection(lambda: protocol, settings.host, settings.port)
    assert protocol.transport is not None
    set_tcp_keepalive(protocol.transport.get_extra_info("socket"), settings.tcp_keepalive_seconds)
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


async def _starttls(loop: asyncio.AbstractEventLoop, protocol: ClientProtocol, context: ssl.SSLContext, host: str) -> None:
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
    # RFC 3501 6.2.1: the capabilities from before TLS must be forgotten.
    protocol.capabilities = set()
    await protocol.capability()


async def open_channel(settings: UpstreamSettings) -> AioChannel:
    """A connection to `upstream.host`, TLS set up as configured, greeted, not logged in yet."""
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
        raise UpstreamError(f'starttls: {exc} (upstream.tls = "starttls")') from None
    except _aio.AioImapException as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable(f"connect: {type(exc).__name__}") from None
    except ConnectionRefusedError as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("refused").inc()
        raise UpstreamNotListening(f"connect: {exc.strerror or type(exc).__name__}") from None
    except OSError as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("refused").inc()
        raise UpstreamUnavailable(f"connect: {exc.strerror or type(exc).__name__}") from None
    channel = AioChannel(protocol, settings)
    if protocol.state == _aio.LOGOUT:
        channel.close()
        if protocol.greeting_error == "PREAUTH":
            metrics.UPSTREAM_CONNECT_FAILURES.labels("preauth").inc()
            raise PreauthGreeting()
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable(f"connect: server refused the session ({protocol.greeting_error})")
    metrics.UPSTREAM_CONNECTS.inc()
    return channel


class AioChannel:
    keeps_listing = False
    streams_bodies = False

    def __init__(self, protocol: ClientProtocol, settings: UpstreamSettings) -> None:
        self._protocol = protocol
        self._timeout = settings.timeout_seconds
        self._broken = False
        self.abandoned = False
        self.view = ServerView()
        self.view.capabilities = frozenset(c.upper() for c in protocol.capabilities)

    @property
    def usable(self) -> bool:
        return not self._broken and not self._protocol.lost

    def close(self) -> None:
        self._broken = True
        transport = self._protocol.transport
        if transport is not None:
            transport.close()

    def tls_session(self) -> TlsSession | None:
        transport = self._protocol.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return TlsSession.of(ssl_object) if ssl_object is not None else None

    async def _guarded(self, what: str, call: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        if not self.usable:
            raise UpstreamUnavailable(f"{what}: upstream connection is closed")
        try:
            with trio.fail_after(self._timeout):
                return await trio_asyncio.aio_as_trio(call)(*args, **kwargs)
        except trio.TooSlowError:
            self.close()
            raise UpstreamUnavailable(f"{what}: no answer within {self._timeout:g} s") from None
        except (_aio.AioImapException, OSError, asyncio.CancelledError) as exc:
            self.close()
            if self._protocol.violation is not None:
                raise UpstreamImplausible(f"{what}: {self._protocol.violation}") from None
            raise UpstreamUnavailable(f"{what}: {type(exc).__name__}") from None
        except BaseException as exc:
            # A command cut off half-way (cancelled) leaves the protocol state unknown.
            self.abandoned = isinstance(exc, trio.Cancelled)
            self.close()
            raise

    async def run(
        self, what: str, command: Command, *, literal: bytes | None = None,
        literal_budget: int = MAX_OTHER_LITERAL_BYTES, collect: bool = False, secret: bool = False,
    ) -> Reply:
        protocol = self._protocol
        name = command.name.decode("ascii")
        args = [arg.decode("utf-8", "surrogateescape") for arg in command.args]
        tag = protocol.new_tag()
        loop = protocol.loop
        prefix = "UID" if command.uid else None
        protocol.literal_budget = literal_budget
        if name == "APPEND":
            assert literal is not None
            response = await self._guarded(what, protocol.append, literal, mailbox=args[0])
        elif name == "FETCH":
            fetch = IncrementalFetchCommand(tag, args[0], " ".join(args[1:]), prefix=prefix, loop=loop)
            response = await self._guarded(what, protocol.execute, fetch)
        else:
            scrub = args[-1] if secret else None
            response = await self._guarded(what, protocol.execute, _aio.Command(name, tag, *args, prefix=prefix, loop=loop), scrub=scrub)
        if response.result == "OK":
            # The states aioimaplib checks commands against; our own commands move them.
            if name in ("LOGIN", "AUTHENTICATE"):
                protocol.state = _aio.AUTH
            elif name == "SELECT":
                protocol.state = _aio.SELECTED
        try:
            return self._reply(name, response, collect)
        except UpstreamImplausible as exc:
            self.close()
            raise UpstreamImplausible(f"{what}: {exc}") from None

    def _reply(self, name: str, response: _aio.Response, collect: bool) -> Reply:
        """aioimaplib's answer as the engine-independent Reply; every response goes to the
        view. aioimaplib strips "* " from untagged lines, and for its asynchronous commands
        also the response name (`* SEARCH 1 2` arrives as `1 2`): both are put back."""
        lines = list(response.lines)
        status_text = bytes(lines.pop()) if lines else b""
        status = response.result.encode("ascii") + (b" " + status_text if status_text else b"")
        restore = b"" if name in ("FETCH", "NOOP") or _aio.Commands[name].exec == _aio.Exec.is_sync else name.encode() + b" "
        responses: list[Response] = []
        current: Response | None = None
        continues = False
        for line in lines:
            if isinstance(line, bytearray):
                if current is not None:
                    current.literals.append(bytes(line))
                    continues = True
                continue
            if continues and current is not None:
                current.text += line
                continues = False
                continue
            prefix = restore if restore and not _aio.message_data_re.match(line) else b""
            current = Response(b"* " + prefix + line)
            responses.append(current)
        view = self.view
        for each in responses:
            view.untagged(each.text)
        view.status(status_text)
        return Reply(status, responses if collect else [])

    async def authenticate(self, what: str, command: Command, respond: Callable[[bytes], bytes]) -> Reply:
        # aioimaplib's own xoauth2() never answers an error challenge and hangs until its
        # timeout; the protocol (`.protocol`) answers continuations with `respond` instead.
        self._protocol.sasl_respond = respond
        try:
            return await self.run(what, command, secret=True)
        finally:
            self._protocol.sasl_respond = None

    async def pipeline(self, what: str, commands: Sequence[Command]) -> list[Reply]:
        # aioimaplib runs one command at a time on a connection.
        return [await self.run(what, command) for command in commands]

    async def fetch_bodies(self, what: str, command: Command, literal_budget: int) -> tuple[Reply, dict[int, bytes]]:
        reply = await self.run(what, command, literal_budget=literal_budget, collect=True)
        return reply, dict(syntax.bodies_by_uid(reply.responses))

    def stream_body(self, uid: int, offset: int, length: int) -> AbstractAsyncContextManager[RangeReader]:
        raise NotImplementedError("aioimaplib hands over a literal only when it is whole (streams_bodies is False)")

    async def idle(self, stop: StopSignal, interval: float) -> None:
        raise NotImplementedError("this engine keeps no listing between commands (keeps_listing is False)")

    async def logout(self) -> None:
        try:
            await trio_asyncio.aio_as_trio(self._protocol.logout)()
        except Exception:  # logging out is a courtesy; the connection closes regardless
            pass
