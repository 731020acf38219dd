"""The trio engine's channel: IMAP commands over a Trio stream, answers read with the sans-IO
`bridge.imap.wire.ResponseReader`.

Why the bridge has its own engine (docs/design.md, "The IMAP engines"): it reads responses
straight off the socket into one buffer, so a 5,000-message listing is one regex pass per
line, a body literal goes from the socket to the POP3 client without being copied, a batch of
small messages is taken out of the buffer in one match each, and untagged responses between
commands keep the warm listing up to date (`keeps_listing`).
"""

from __future__ import annotations

import os
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from bridge.config import UpstreamSettings
from bridge.imap import syntax
from bridge.imap.channel import Command, Reply, StopSignal, TlsSession
from bridge.imap.errors import UpstreamImplausible, UpstreamUnavailable
from bridge.imap.interface import RangeReader
from bridge.imap.limits import MAX_OTHER_LITERAL_BYTES
from bridge.imap.trio_engine.streamed_body import StreamedBody
from bridge.imap.untagged import LISTING_LINES, ServerView
from bridge.imap.wire import (
    NEED_DATA,
    BodyFetch,
    Line,
    LiteralPiece,
    Response,
    ResponseReader,
    ResponseTooLarge,
)
from bridge.net.descriptors import descriptor_of

_T = TypeVar("_T")

_RECEIVE_SIZE = 1 << 20
# A batched FETCH of small messages lets other tasks run after this many of them.
_BODIES_BETWEEN_YIELDS = 8
# A read the kernel answers at once does not yield to the scheduler; once this much has been
# read (and parsed) since the task last yielded, one does, so a server that keeps the socket
# full can neither hold up other sessions nor keep an exchange's timeout from being delivered
# (Trio cancels only where a task yields).
_BYTES_BETWEEN_YIELDS = 256 * 1024
# The stream is closed, or sent something that cannot be followed.
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ConnectionBroken(Exception):
    """Internal: the connection is unusable (closed by the server, or a response we cannot follow)."""


class TrioChannel:
    keeps_listing = True
    streams_bodies = True

    def __init__(self, stream: trio.abc.Stream, settings: UpstreamSettings) -> None:
        self.stream = stream
        self.view = ServerView()
        self.reader = ResponseReader()
        self._timeout = settings.timeout_seconds
        self._tag = 0
        self._broken = False
        self.abandoned = False
        self._read_since_yield = 0  # bytes read since this channel's task last yielded
        # The tag of an IDLE the server is still in: a parked connection handed over is not
        # taken out of IDLE first; its new user's first command ends it (`_end_open_idle`,
        # or DONE in the same write as a pipeline, which saves the handover a round trip).
        self._open_idle: bytes | None = None

    @property
    def usable(self) -> bool:
        """False once the channel is broken, or once the server has closed or reset the
        connection, which a parked connection handed over with no I/O would otherwise show
        only at its first command."""
        if self._broken:
            return False
        socket_stream = self._socket_stream()
        return socket_stream is None or not _peer_closed(socket_stream.socket.fileno())

    def _socket_stream(self) -> trio.SocketStream | None:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        return stream if isinstance(stream, trio.SocketStream) else None

    def close(self) -> None:
        self._broken = True
        self.view.listing = None
        socket_stream = self._socket_stream()
        if socket_stream is not None:
            # Closing the socket is synchronous (trio notifies any waiter); no await needed.
            socket_stream.socket.close()

    def tls_session(self) -> TlsSession | None:
        return TlsSession.of(self.stream) if isinstance(self.stream, trio.SSLStream) else None

    # -- the guard every exchange runs under ------------------------------------------------------

    async def guarded(
        self, what: str, exchange: Callable[..., Awaitable[_T]], *args: Any, limit_seconds: float | None = None
    ) -> _T:
        """One exchange within the upstream timeout. Never lets an error out with the
        connection half-way through a command: the connection is closed first, and what
        went wrong is raised as an UpstreamError naming `what`."""
        if self._broken:
            raise UpstreamUnavailable(f"{what}: upstream connection is closed")
        limit = self._timeout if limit_seconds is None else limit_seconds
        try:
            # trio.fail_after without its two generator-based context managers: this runs
            # once per piece of every streamed message, where they showed up in profiles.
            with trio.CancelScope(deadline=trio.current_time() + limit):
                if self._open_idle is not None and exchange != self._exchange_pipelined:
                    await self._end_open_idle()
                return await exchange(*args)
            # Only the scope's own deadline ends the block without a return or an error.
            raise trio.TooSlowError
        except BaseException as error:
            # Cancelled: the exchange's session gave it up; the server did nothing wrong.
            self.abandoned = isinstance(error, trio.Cancelled)
            self.close()
            raise _upstream_error(what, error, limit) from None

    # -- reading -------------------------------------------------------------------------------------

    async def fill(self, most: int = _RECEIVE_SIZE) -> None:
        stream = self.stream
        if type(stream) is trio.SocketStream:
            data = await self._read(stream.socket, min(most, _RECEIVE_SIZE))
        else:
            data = await stream.receive_some(min(most, _RECEIVE_SIZE))
        if not data:
            raise ConnectionBroken("server closed the connection")
        self.reader.receive_data(data)

    async def _read(self, sock: trio.socket.SocketType, size: int) -> bytes:
        """One read of a plain socket: `read` first, `wait_readable` only if nothing is there.
        `SocketStream.receive_some` yields to the scheduler after every read, even one that
        found data; a message streamed to a POP3 client is one read per piece."""
        if self._read_since_yield >= _BYTES_BETWEEN_YIELDS:
            self._read_since_yield = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(descriptor_of(sock, "upstream connection"), size)
            except BlockingIOError:
                self._read_since_yield = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            self._read_since_yield += len(data)
            return data

    async def response(self, first: Line | None = None) -> Response:
        """The next whole response (or the rest of the one `first` began)."""
        response = self.reader.next_response(first)
        while response is NEED_DATA:
            await self.fill()
            response = self.reader.next_response()
        assert isinstance(response, Response)
        self._spent(response)
        return response

    async def event(self, most: int | None = None) -> Line | LiteralPiece:
        """The next line or literal piece; a piece of at most `most` bytes, read from the
        socket in pieces that size (a slow POP3 client's RETR holds no more than that)."""
        event = self.reader.next_event(most)
        while event is NEED_DATA:
            await self.fill(most or _RECEIVE_SIZE)
            event = self.reader.next_event(most)
        assert isinstance(event, (Line, LiteralPiece))
        return event

    def _spent(self, response: Response) -> None:
        # The literals a command may bring back are budgeted (bridge.imap.limits); the reader
        # refuses the next literal beyond what is left, before any of it is held.
        for literal in response.literals:
            self.reader.max_literal -= len(literal)

    async def to_tagged(self, tag: bytes, collected: list[Response] | None = None) -> bytes:
        """Reads up to the tagged answer of `tag` and returns its status; untagged responses
        on the way go to the view (and into `collected`, if given)."""
        prefix = tag + b" "
        view, reader = self.view, self.reader
        while True:
            if view.listing is not None and collected is None:
                # A listing's lines are taken in bulk, not as a response object each.
                rows = reader.take_matching_lines(LISTING_LINES)
                if rows:
                    view.listing_rows(rows)
            response = await self.response()
            text = response.text
            if text.startswith(b"* "):
                self.view.untagged(text)
                if collected is not None:
                    collected.append(response)
            elif text.startswith(prefix):
                status = text[len(prefix) :]
                self.view.status(status)
                return status
            # A continuation request we did not ask for: ignore it.

    def next_tag(self, literal_budget: int = MAX_OTHER_LITERAL_BYTES) -> bytes:
        """The tag of a new command, which may bring back `literal_budget` literal bytes."""
        self._tag += 1
        self.reader.max_literal = literal_budget
        return b"B%d" % self._tag

    # -- commands ------------------------------------------------------------------------------------

    async def run(
        self, what: str, command: Command, *, literal: bytes | None = None,
        literal_budget: int = MAX_OTHER_LITERAL_BYTES, collect: bool = False, secret: bool = False,
    ) -> Reply:
        return await self.guarded(what, self._exchange, command, literal, literal_budget, collect)

    async def _exchange(self, command: Command, literal: bytes | None, literal_budget: int, collect: bool) -> Reply:
        tag = self.next_tag(literal_budget)
        line = tag + b" " + command.line()
        if literal is None:
            await self.stream.send_all(line + b"\r\n")
        elif "LITERAL+" in self.view.capabilities:
            await self.stream.send_all(line + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        else:
            await self.stream.send_all(line + b" {%d}\r\n" % len(literal))
            while True:
                response = await self.response()
                if response.text.startswith(b"+"):
                    break
                if response.text.startswith(tag + b" "):
                    return Reply(response.text[len(tag) + 1 :])
                self.view.untagged(response.text)
            await self.stream.send_all(literal + b"\r\n")
        collected: list[Response] = []
        status = await self.to_tagged(tag, collected if collect else None)
        return Reply(status, collected)

    async def authenticate(self, what: str, command: Command, respond: Callable[[bytes], bytes]) -> Reply:
        return await self.guarded(what, self._exchange_continued, command, respond)

    async def _exchange_continued(self, command: Command, respond: Callable[[bytes], bytes]) -> Reply:
        tag = self.next_tag()
        await self.stream.send_all(tag + b" " + command.line() + b"\r\n")
        prefix = tag + b" "
        while True:
            text = (await self.response()).text
            if text.startswith(b"+"):
                await self.stream.send_all(respond(text[1:].strip()) + b"\r\n")
            elif text.startswith(prefix):
                status = text[len(prefix) :]
                self.view.status(status)
                return Reply(status)
            elif text.startswith(b"* "):
                self.view.untagged(text)

    async def pipeline(self, what: str, commands: Sequence[Command]) -> list[Reply]:
        return await self.guarded(what, self._exchange_pipelined, commands)

    async def _exchange_pipelined(self, commands: Sequence[Command]) -> list[Reply]:
        tags = [self.next_tag() for _ in commands]
        # One budget for all of them: next_tag set it per command, the last one wins.
        self.reader.max_literal = MAX_OTHER_LITERAL_BYTES * len(commands)
        lines = b"".join(tag + b" " + command.line() + b"\r\n" for tag, command in zip(tags, commands, strict=True))
        idle, self._open_idle = self._open_idle, None
        awaited = set(tags)
        if idle is not None:
            # The IDLE ends in the same write (RFC 2177: DONE, then the next command); its
            # untagged responses come first, in order, as they would have before a DONE alone.
            lines = b"DONE\r\n" + lines
            awaited.add(idle)
        await self.stream.send_all(lines)
        # Servers may finish pipelined commands in any order (Dovecot answers a STATUS
        # before a long FETCH).
        statuses: dict[bytes, bytes] = {}
        while len(statuses) < len(awaited):
            response = await self.response()
            if response.text.startswith(b"* "):
                self.view.untagged(response.text)
                continue
            tag, _, status = response.text.partition(b" ")
            if tag in awaited:
                self.view.status(status)
                statuses[tag] = status
        if idle is not None and not Reply(statuses[idle]).ok:
            raise ConnectionBroken("IDLE ended with an error")
        return [Reply(statuses[tag]) for tag in tags]

    async def fetch_bodies(self, what: str, command: Command, literal_budget: int) -> tuple[Reply, dict[int, bytes]]:
        found: dict[int, bytes] = {}
        reply = await self.guarded(what, self._exchange_bodies, command, literal_budget, found)
        return reply, found

    async def _exchange_bodies(self, command: Command, literal_budget: int, found: dict[int, bytes]) -> Reply:
        """Answers in the usual shape are taken straight out of the buffer
        (`ResponseReader.take_body_fetch`: one match and one copy per message, no await),
        anything else the general way."""
        tag = self.next_tag(literal_budget)
        await self.stream.send_all(tag + b" " + command.line() + b"\r\n")
        prefix = tag + b" "
        reader, view = self.reader, self.view
        while True:
            taken = reader.take_body_fetch()
            if taken is NEED_DATA:
                await self.fill()
                continue
            if isinstance(taken, BodyFetch):
                reader.max_literal -= len(taken.body)
                found[taken.uid] = taken.body
                view.body_fetched(taken.number, taken.uid)
                if not len(found) % _BODIES_BETWEEN_YIELDS:
                    # A megabyte read at once holds hundreds of small messages: other
                    # sessions, and this one's client waiting for its next reply, get their
                    # turn between them rather than after all of them.
                    await trio.lowlevel.checkpoint()
                continue
            response = await self.response()
            text = response.text
            if text.startswith(b"* "):
                view.untagged(text)
                found.update(syntax.bodies_by_uid((response,)))
            elif text.startswith(prefix):
                status = text[len(prefix) :]
                view.status(status)
                return Reply(status)

    @asynccontextmanager
    async def stream_body(self, uid: int, offset: int, length: int) -> AsyncIterator[RangeReader]:
        reader = StreamedBody(self, uid, offset, length)
        try:
            yield reader
        finally:
            if not reader.settled:
                # Part of the literal or the tagged answer is still on its way: nothing else
                # can be read on this connection. (Not broken yet: its reader stopped early.)
                self.abandoned = not self._broken
                self.close()

    async def idle(self, stop: StopSignal, interval: float) -> None:
        await self.guarded("idle", self._idle_once, stop, interval, limit_seconds=interval + self._timeout)

    async def _idle_once(self, stop: StopSignal, interval: float) -> None:
        tag = self.next_tag()
        await self.stream.send_all(tag + b" IDLE\r\n")
        while True:
            response = await self.response()
            if response.text.startswith(b"+"):
                break
            if response.text.startswith(tag + b" "):
                raise ConnectionBroken("IDLE refused")
            self.view.untagged(response.text)

        # Reading goes on until the server ends the IDLE by itself, the interval passes, or
        # the keeper is told to stop. Told to stop, reading stops between two socket reads
        # (the reader keeps any partial response, so nothing is cut in half) and the IDLE
        # stays open for whoever takes the connection next.
        ended: bytes | None = None
        with stop.cancelling(deadline=trio.current_time() + interval):
            ended = await self._idle_responses(tag)
        if ended is None:
            if stop.is_set():
                self._open_idle = tag
                return
            await self.stream.send_all(b"DONE\r\n")
            ended = await self._idle_responses(tag)
        if not Reply(ended).ok:
            raise ConnectionBroken("IDLE ended with an error")

    async def _idle_responses(self, tag: bytes) -> bytes:
        """What the server sends during IDLE, up to its tagged answer's status."""
        while True:
            response = await self.response()
            if response.text.startswith(tag + b" "):
                return response.text[len(tag) + 1 :]
            if response.text.startswith(b"* "):
                self.view.untagged(response.text)
                if response.text[2:5].upper() == b"BYE":
                    raise ConnectionBroken("server said BYE")

    async def _end_open_idle(self) -> None:
        tag, self._open_idle = self._open_idle, None
        assert tag is not None
        await self.stream.send_all(b"DONE\r\n")
        if not Reply(await self.to_tagged(tag)).ok:
            raise ConnectionBroken("IDLE ended with an error")

    async def logout(self) -> None:
        done = b"DONE\r\n" if self._open_idle is not None else b""
        self._open_idle = None
        try:
            await self.stream.send_all(done + self.next_tag() + b" LOGOUT\r\n")
            # Wait for the server to close its side, so it logs a clean logout.
            while True:
                await self.response()
        except (ConnectionBroken, ResponseTooLarge, UpstreamImplausible, *_BROKEN):
            pass


def _peer_closed(fd: int) -> bool:
    """Has the peer shut the connection down (FIN or reset)? One poll(2) with no wait."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))


def _upstream_error(what: str, error: BaseException, timeout: float) -> BaseException:
    """What a failed exchange is reported as (the connection is closed already). A broken
    connection inside a nursery (IDLE) arrives as an exception group."""
    if isinstance(error, BaseExceptionGroup):
        implausible, rest = error.split((UpstreamImplausible, ResponseTooLarge))
        if rest is not None:
            _broken, rest = rest.split((ConnectionBroken, *_BROKEN))
        if rest is not None:
            return rest  # e.g. a shutdown's cancellation: unwinds as it is
        if implausible is not None:
            error = implausible
            while isinstance(error, BaseExceptionGroup):
                error = error.exceptions[0]
        else:
            return UpstreamUnavailable(f"{what}: connection broken")
    if isinstance(error, trio.TooSlowError):
        return UpstreamUnavailable(f"{what}: no answer within {timeout:g} s")
    if isinstance(error, (ConnectionBroken, *_BROKEN)):
        return UpstreamUnavailable(f"{what}: {type(error).__name__}")
    if isinstance(error, (UpstreamImplausible, ResponseTooLarge)):
        return UpstreamImplausible(f"{what}: {error}")
    return error
