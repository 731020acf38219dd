"""Receive buffer that cuts the client's byte stream into command lines.

Memory bound: an *incomplete* line is never held beyond ``max_line_length``
bytes.  Once the partial line reaches that size it cannot become a valid line
any more, so the rest of it is dropped as it arrives and the line is reported
once, as `LINE_TOO_LONG`, when its LF finally shows up.  Complete lines that
are waiting to be consumed are bounded by what the caller hands to `feed`; the
session layer only reads from the socket when the core asks for data, so it
cannot pile up more than one receive's worth.

Cost: every byte handed in is searched for LF exactly once.  ``_tail_start``
records where the last known LF ended, so asking for a line when none is
complete costs nothing, and consumed bytes are dropped in amortised linear time.
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError

__all__ = ["LINE_TOO_LONG", "LineBuffer", "LineTooLong"]


class LineTooLong(enum.Enum):
    """Marker type for a line that exceeded the cap (a one-member enum)."""

    LINE_TOO_LONG = "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong.LINE_TOO_LONG


class LineBuffer:
    """Accepts byte chunks of any size; hands out complete lines one by one.

    ``max_line_length`` counts the whole line as received, terminator included
    (RFC 2449 section 4: at most 255 octets including CRLF).
    """

    def __init__(self, max_line_length: int = 255) -> None:
        if max_line_length < 2:
            raise ValueError("max_line_length must leave room for a line terminator")
        self._max = max_line_length
        self._buf = bytearray()
        # Unconsumed data is _buf[_pos:]; _buf[_tail_start:] holds no LF.
        self._pos = 0
        self._tail_start = 0

    def __len__(self) -> int:
        """Number of bytes held that have not been handed out yet."""
        return len(self._buf) - self._pos

    @property
    def max_line_length(self) -> int:
        return self._max

    @max_line_length.setter
    def max_line_length(self, value: int) -> None:
        # The cap may change between lines (a SASL response may be longer than a
        # command).  Bytes of a partial line already dropped under the old cap
        # stay dropped, so such a line still ends as LINE_TOO_LONG.
        if value < 2:
            raise ValueError("max_line_length must leave room for a line terminator")
        self._max = value

    def clear(self) -> None:
        """Forget everything held, complete lines and partial line alike.

        After STLS nothing received in the clear may be acted on (RFC 2595
        section 4 / the STARTTLS command-injection attack), so the core throws
        away whatever the client pipelined behind the command.
        """
        self._buf = bytearray()
        self._pos = 0
        self._tail_start = 0

    @property
    def empty(self) -> bool:
        """Nothing held: no complete line waiting and no partial one."""
        return self._pos >= len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes.  ``b""`` is a no-op (EOF is the owner's business)."""
        if not data:
            return
        self._compact()
        start = 0
        tail_len = len(self._buf) - self._tail_start
        if tail_len >= self._max:
            # The partial line is already known to be too long: its remaining
            # bytes are thrown away, only its LF is kept so it still ends.
            lf = data.find(b"\n")
            if lf == -1:
                return
            start = lf
        last_lf = data.rfind(b"\n", start)
        if last_lf == -1:
            # Keeping `_max` bytes (one more than any valid partial line can
            # have) is what lets `next_line` recognise the line as too long by
            # its length alone once the LF arrives.
            room = self._max - tail_len
            self._buf += data[start : start + room]
            return
        self._buf += data[start : last_lf + 1]
        self._tail_start = len(self._buf)
        self._buf += data[last_lf + 1 : last_lf + 1 + self._max]

    def next_line(self) -> bytes | LineTooLong | None:
        """Next complete line without its CRLF/LF, `LINE_TOO_LONG`, or None."""
        if self._pos >= self._tail_start:
            return None
        lf = self._buf.find(b"\n", self._pos, self._tail_start)
        if lf == -1:  # pragma: no cover - _tail_start guarantees an LF
            raise LocalProtocolError("line buffer lost track of its line ends")
        start = self._pos
        self._pos = lf + 1
        if lf + 1 - start > self._max:
            return LINE_TOO_LONG
        end = lf - 1 if lf > start and self._buf[lf - 1] == 0x0D else lf
        return bytes(self._buf[start:end])

    def _compact(self) -> None:
        # Only move the unconsumed bytes when at least as many have been
        # consumed, so the copying stays linear overall even if the caller
        # feeds without draining.
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._tail_start -= self._pos
            self._pos = 0
