"""IMAP server responses out of a byte stream, without any I/O (RFC 3501 sections 4.3, 7).

A server response is a line ending in CRLF, unless the line ends by announcing a literal,
`{n}`: then n bytes of data follow, and the response goes on with another line (which may
announce another literal). Feed what the socket delivers to `ResponseReader.receive_data`,
then take what is complete:

- `next_event()`: the stream as `Line` and `LiteralPiece` events, for a reader that streams a
  literal (a message body handed to the POP3 client as it arrives, never held whole). A
  piece is the data as it was received when it can be: a body costs no copy here.
- `next_response()`: whole `Response`s (text with the `{n}` markers in place, and the
  literals), for everything else.
- `take_body_fetch()`: a shortcut for the FETCH answers a batch of message bodies is made of.

Each returns `NEED_DATA` until it has something whole. Bounds (a hostile or broken server
must not turn its numbers into our memory): a line of more than `max_line` bytes, or a literal
of more than `max_literal` bytes that `next_response` would have to hold whole, raise
`ResponseTooLarge`; the reader is unusable afterwards, and so is the connection.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "NEED_DATA",
    "BodyFetch",
    "Line",
    "LiteralPiece",
    "NeedData",
    "Response",
    "ResponseReader",
    "ResponseTooLarge",
]

# No response line we ask for comes near this (a SEARCH answer of 200,000 UIDs is ~1.4 MB).
DEFAULT_MAX_LINE: Final = 16 << 20
# Literals held whole: state records, read-ahead batches and TOP chunks, all at most
# upstream.fetch_chunk (64 MiB) each.
DEFAULT_MAX_LITERAL: Final = 64 << 20

_LITERAL_MARKER = re.compile(rb"\{(\d{1,20})\}$")
# `* n FETCH (UID u BODY[section]<origin> {size}`, the head of the FETCH answer to our own
# `UID FETCH set (UID BODY.PEEK[...])` as Dovecot and most servers order it.
_BODY_FETCH_HEAD = re.compile(rb"\* (\d{1,10}) FETCH \(UID (\d{1,10}) BODY\[[^\]\r\n]*\](?:<\d{1,20}>)? \{(\d{1,20})\}\r\n")


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class ResponseTooLarge(Exception):
    """The server sent a line or a literal beyond the reader's bounds."""


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a response, without its CRLF. `literal`: the size of the literal announced
    at its end (its data follows as LiteralPiece events), else None."""

    text: bytes
    literal: int | None = None


@dataclass(frozen=True, slots=True)
class LiteralPiece:
    """The next piece of the current literal; `remaining` bytes of it are still to come."""

    data: bytes
    remaining: int


@dataclass(slots=True)
class Response:
    """A whole response: its lines joined (literal markers in place), and its literals."""

    text: bytes
    literals: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BodyFetch:
    """`* number FETCH (UID uid BODY[...] {n}` + n bytes + `)`, taken whole."""

    number: int
    uid: int
    body: bytes


@dataclass(slots=True)
class _Assembly:
    response: Response
    pieces: list[bytes] = field(default_factory=list)
    # "literal": reading the literal the last line announced; "line": a continuation line
    # follows; "done": the last line announced nothing.
    state: str = "line"


class ResponseReader:
    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, max_literal: int = DEFAULT_MAX_LITERAL) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self._buffer = bytearray()
        # How far the buffer was searched for CRLF already: a line that arrives in many small
        # pieces is searched once, not once per piece (linear, not quadratic).
        self._searched = 0
        # Received while a literal was being read and nothing was buffered: handed out as
        # pieces without being copied into the buffer.
        self._direct: deque[bytes] = deque()
        self._literal_remaining = 0
        self._assembly: _Assembly | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out."""
        return len(self._buffer) + sum(len(chunk) for chunk in self._direct)

    @property
    def in_literal(self) -> bool:
        return self._literal_remaining > 0

    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        if self._direct or (self._literal_remaining and not self._buffer):
            self._direct.append(data)
        else:
            self._buffer += data

    # -- the stream as lines and literal pieces ---------------------------------------------

    def next_event(self, most: int | None = None) -> Line | LiteralPiece | NeedData:
        """The next line, or piece of the literal being read (at most `most` bytes of it)."""
        if self._literal_remaining:
            return self._next_piece(self._literal_remaining if most is None else min(most, self._literal_remaining))
        buffer = self._buffer
        end = buffer.find(b"\r\n", self._searched)
        if end < 0:
            if len(buffer) > self.max_line:
                raise ResponseTooLarge(f"a response line of more than {self.max_line} bytes")
            self._searched = max(0, len(buffer) - 1)
            return NEED_DATA
        if end > self.max_line:
            raise ResponseTooLarge(f"a response line of more than {self.max_line} bytes")
        text = bytes(memoryview(buffer)[:end])
        del buffer[: end + 2]
        self._searched = 0
        literal = None
        if text.endswith(b"}") and (marker := _LITERAL_MARKER.search(text)) is not None:
            literal = int(marker.group(1))
            self._literal_remaining = literal
        return Line(text, literal)

    def _next_piece(self, most: int) -> LiteralPiece | NeedData:
        buffer = self._buffer
        if buffer:
            count = min(most, len(buffer))
            data = bytes(memoryview(buffer)[:count])
            del buffer[:count]
        elif self._direct:
            data = self._direct.popleft()
            if len(data) > most:
                # The literal ends inside this chunk: what follows it is lines again.
                rest = data[most:]
                data = data[:most]
                self._buffer += rest
                while self._direct:
                    self._buffer += self._direct.popleft()
        else:
            return NEED_DATA
        self._literal_remaining -= len(data)
        if not self._literal_remaining:
            while self._direct:
                self._buffer += self._direct.popleft()
        return LiteralPiece(data, self._literal_remaining)

    # -- whole responses ------------------------------------------------------------------------

    def next_response(self, first: Line | None = None) -> Response | NeedData:
        """The next whole response; with `first`, the rest of the response that line (just
        taken with `next_event`) begins."""
        if first is not None:
            if self._assembly is not None:
                raise RuntimeError("a response is already being assembled")
            self._assembly = _Assembly(Response(b""))
            self._add_line(self._assembly, first)
        while True:
            assembly = self._assembly
            if assembly is None:
                if not self._literal_remaining:
                    # The common case, a response of one line, without the events between.
                    buffer = self._buffer
                    end = buffer.find(b"\r\n", self._searched)
                    if 0 <= end <= self.max_line and buffer[end - 1 : end] != b"}":
                        text = bytes(memoryview(buffer)[:end])
                        del buffer[: end + 2]
                        self._searched = 0
                        return Response(text)
                event = self.next_event()
                if isinstance(event, NeedData):
                    return NEED_DATA
                assert isinstance(event, Line)
                assembly = self._assembly = _Assembly(Response(b""))
                self._add_line(assembly, event)
            elif assembly.state == "literal":
                piece = self._next_piece(self._literal_remaining)
                if isinstance(piece, NeedData):
                    return NEED_DATA
                assembly.pieces.append(piece.data)
                if not piece.remaining:
                    pieces = assembly.pieces
                    assembly.response.literals.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                    assembly.pieces = []
                    assembly.state = "line"
            else:
                event = self.next_event()
                if isinstance(event, NeedData):
                    return NEED_DATA
                assert isinstance(event, Line)
                self._add_line(assembly, event)
            if assembly.state == "done":
                self._assembly = None
                return assembly.response

    def _add_line(self, assembly: _Assembly, line: Line) -> None:
        assembly.response.text += line.text
        if line.literal is None:
            assembly.state = "done"
        elif line.literal > self.max_literal:
            raise ResponseTooLarge(f"a literal of {line.literal} bytes (at most {self.max_literal} are read whole)")
        elif line.literal == 0:
            assembly.response.literals.append(b"")
            assembly.state = "line"
        else:
            assembly.state = "literal"

    # -- the listing shortcut -----------------------------------------------------------------------

    def take_matching_lines(self, pattern: re.Pattern[bytes]) -> list[tuple[bytes | None, ...]]:
        """The groups of the complete lines at the front of the buffer that `pattern` matches
        whole, CRLF included, taken out at once; stops at the first line that does not match
        or is not complete (read that one with next_response). `pattern` must bound every
        part it repeats: a line taken here is not held to max_line."""
        if self._literal_remaining or self._assembly is not None:
            return []
        buffer = self._buffer
        match = pattern.match
        found = []
        position = 0
        while (line := match(buffer, position)) is not None:
            found.append(line.groups())
            position = line.end()
        if position:
            del buffer[:position]
            self._searched = 0
        return found

    # -- the batch FETCH shortcut -------------------------------------------------------------------

    def take_body_fetch(self) -> BodyFetch | NeedData | None:
        """The next response, if it is a whole `* n FETCH (UID u BODY[...] {size}` + literal +
        `)`, taken out in one match and one copy. NEED_DATA: what is buffered may be the start
        of one; None: the next response is something else (read it with next_response)."""
        if self._literal_remaining or self._assembly is not None:
            return None
        buffer = self._buffer
        head = _BODY_FETCH_HEAD.match(buffer)
        if head is None:
            # Only a first line not yet complete can still turn out to be one.
            if len(buffer) <= self.max_line and buffer.find(b"\r\n") < 0 and buffer[:2] in (b"* ", b"*", b""):
                return NEED_DATA
            return None
        size = int(head.group(3))
        if size > self.max_literal:
            raise ResponseTooLarge(f"a literal of {size} bytes (at most {self.max_literal} are read whole)")
        start = head.end()
        end = start + size
        if len(buffer) < end + 3:
            return NEED_DATA
        if buffer[end : end + 3] != b")\r\n":
            return None
        # The match reads its groups out of the buffer: they are taken before it changes.
        number, uid = int(head.group(1)), int(head.group(2))
        body = bytes(memoryview(buffer)[start:end])
        del buffer[: end + 3]
        self._searched = 0
        return BodyFetch(number, uid, body)

