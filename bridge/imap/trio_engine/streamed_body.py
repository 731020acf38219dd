"""One partial FETCH whose body literal goes from the socket to the POP3 client piece by piece
(the trio engine's `stream_body`): nothing of a big message is held whole, and a client that
reads slowly holds back the server through TCP rather than through the bridge's memory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from bridge.imap import syntax
from bridge.imap.channel import Command
from bridge.imap.errors import MessageGone, UpstreamError, UpstreamImplausible
from bridge.imap.limits import MAX_OTHER_LITERAL_BYTES
from bridge.imap.untagged import ServerView
from bridge.imap.wire import Line, LiteralPiece, Response, ResponseReader

_T = TypeVar("_T")


class FetchChannel(Protocol):
    """What a streamed FETCH uses of its channel (`TrioChannel`, which imports this module)."""

    stream: trio.abc.Stream
    view: ServerView
    reader: ResponseReader

    async def guarded(
        self, what: str, exchange: Callable[..., Awaitable[_T]], *args: Any, limit_seconds: float | None = None
    ) -> _T: ...

    def next_tag(self, literal_budget: int = MAX_OTHER_LITERAL_BYTES) -> bytes: ...

    async def event(self, most: int | None = None) -> Line | LiteralPiece: ...

    async def response(self, first: Line | None = None) -> Response: ...

    async def to_tagged(self, tag: bytes, collected: list[Response] | None = None) -> bytes: ...


class StreamedBody:
    """One `UID FETCH uid (UID BODY.PEEK[]<offset.length>)` whose literal is handed out piece
    by piece as the socket delivers it. Each read waits at most upstream.timeout_seconds:
    the whole transfer may take as long as the POP3 client takes to read it."""

    def __init__(self, channel: FetchChannel, uid: int, offset: int, length: int) -> None:
        self._channel = channel
        self._command = Command(b"FETCH", (b"%d" % uid, b"(UID BODY.PEEK[]<%d.%d>)" % (offset, length)), uid=True)
        self._uid = uid
        self._length = length
        self._tag = b""  # set when the command is sent
        self._head = b""  # the FETCH response up to the body literal
        self._whole: bytes | None = None  # the body, when the server sent it in a way we do not stream
        self._status = b""
        # True while nothing of this command is left on the wire (before it is sent, and
        # after its tagged answer).
        self.settled = True

    async def next_piece(self, most: int | None = None) -> bytes:
        guarded = self._channel.guarded
        if not self._tag:
            if not await guarded("fetch", self._start):
                if self._status[:2].upper() in (b"OK", b"NO"):
                    raise MessageGone(f"UID {self._uid} no longer exists")
                raise UpstreamError("fetch: server answered BAD")
            data = self._whole if self._whole is not None else await guarded("fetch", self._piece)
        elif self.settled:
            return b""
        else:
            data = await guarded("fetch", self._piece, most)
        if self.settled and self._status[:2].upper() != b"OK":
            raise UpstreamError("fetch: server answered NO with the message")
        return data

    async def _start(self) -> bool:
        """Sends the command and reads up to the body literal; False if there is none."""
        channel = self._channel
        # The body may also come whole, in an order we do not stream (`_whole`).
        self._tag = channel.next_tag(self._length + MAX_OTHER_LITERAL_BYTES)
        self.settled = False
        await channel.stream.send_all(self._tag + b" " + self._command.line() + b"\r\n")
        while True:
            event = await channel.event()
            assert isinstance(event, Line)
            line = event.text
            if line.startswith(b"* ") and event.literal is not None and self._ours(line):
                if event.literal > self._length:
                    # Streamed, never held; but more than we asked for is no answer to us.
                    raise UpstreamImplausible(f"a {event.literal}-byte literal for a FETCH of {self._length} bytes")
                self._head = line
                return True
            if line.startswith(self._tag + b" "):
                self._settle(line)
                return False
            response = await channel.response(event)
            if line.startswith(b"* "):
                channel.view.untagged(response.text)
                # Our body after all, in an order we do not stream (or empty): whole.
                if (body := syntax.body_section([response], self._uid)) is not None:
                    self._whole = body
                    await self._to_tagged()
                    return True

    def _ours(self, line: bytes) -> bool:
        """`line` ends with our UID's body literal (UID asked for first, so it comes before)."""
        literal = syntax.BODY_LITERAL.search(line)
        if literal is None or literal.end() != len(line):
            return False
        uid = syntax.FETCH_UID.search(line, 0, literal.start())
        return uid is not None and int(uid.group(1)) == self._uid

    async def _piece(self, most: int | None = None) -> bytes:
        channel = self._channel
        if not channel.reader.in_literal:
            return await self._finish()
        event = await channel.event(most)
        assert isinstance(event, LiteralPiece)
        if not event.remaining:
            await self._finish()
        return event.data

    async def _finish(self) -> bytes:
        """The rest of the FETCH response (its closing parenthesis), then the tagged answer."""
        channel = self._channel
        rest = await channel.response()
        channel.view.untagged(self._head + rest.text)
        await self._to_tagged()
        return b""

    async def _to_tagged(self) -> None:
        self._status = await self._channel.to_tagged(self._tag)
        self.settled = True

    def _settle(self, tagged: bytes) -> None:
        self._status = tagged[len(self._tag) + 1 :]
        self._channel.view.status(self._status)
        self.settled = True
