"""Upstream engine on Trio streams: the part of IMAP4rev1 the bridge needs, and nothing else.

Why it exists (README, "Performance"): the benchmark measured aioimaplib under trio-asyncio
as the bottleneck of listing and RETR (an asyncio hop per command, a Python-level line
handler per response line, 1 MiB literals assembled line by line). This engine reads
responses straight off a `trio.SocketStream` into one buffer, so a 5,000-message listing is
one regex pass per line and a message chunk is one copy out of the buffer.

It also keeps a *warm listing* of the maildrop: after the first full listing it follows the
server's untagged EXISTS / EXPUNGE / VANISHED / FETCH responses (RFC 3501, RFC 7162), and a
later `snapshot()` costs one round trip: `UID FETCH 1:* (...) (CHANGEDSINCE m VANISHED)` with
QRESYNC, `CHANGEDSINCE m` + a count check with CONDSTORE, else `NOOP` + `UID FETCH <last+1>:*`
+ a count check. Any doubt (a count that does not add up, an unknown sequence number) falls
back to the full listing, so the snapshot is always the mailbox as it is at that moment.
`keep_alive()` holds a parked connection open with IDLE (RFC 2177) or NOOP (bridge.upstream.pool).

Every command runs under the configured timeout; a command cut off half-way (timeout,
cancellation, connection lost) leaves the connection marked unusable, never half-read.
"""

from __future__ import annotations

import base64
import bisect
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

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
    MailboxSnapshot,
    MessageGone,
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

_RECEIVE_SIZE = 1 << 20
# A response line (literals aside) longer than this is not one we asked for.
_MAX_LINE = 16 << 20
_CLOSE_GRACE_SECONDS = 2.0
_TEMPORARY_AUTH_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "CONTACTADMIN"})

_LITERAL_END = re.compile(rb"\{(\d+)\+?\}$")
_UNTAGGED_NUMBER = re.compile(rb"(\d+) (EXISTS|EXPUNGE|FETCH|RECENT)\b", re.IGNORECASE)
_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)", re.IGNORECASE)
_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)", re.IGNORECASE)
_CODE_NUMBER = re.compile(rb"\[(UIDVALIDITY|HIGHESTMODSEQ|UIDNEXT) (\d+)\]", re.IGNORECASE)
_BODY_LITERAL = re.compile(rb"BODY\[[^\]]*\](?:<\d+>)? \{(\d+)\}", re.IGNORECASE)
_BODY_EMPTY = re.compile(rb'BODY\[[^\]]*\](?:<\d+>)? (""|NIL)', re.IGNORECASE)
_DELETED = re.compile(rb"\\Deleted\b", re.IGNORECASE)
_UID_RANGE = re.compile(rb"(\d+)(?::(\d+))?")
# A range this narrow is looked up UID by UID; a wider one by bisecting the known UIDs.
_NARROW_RANGE = 64
# A FETCH answer to our own UID FETCH (UID BODY.PEEK[...]) as Dovecot and most servers send
# it, literal taken out: one match instead of nine regex searches per message of a batch.
_BODY_FETCH = re.compile(rb"\* (\d+) FETCH \(UID (\d+) BODY\[[^\]]*\] \{\d+\}\)$")
_BODY_FETCH_HEAD = re.compile(rb"\* (\d+) FETCH \(UID (\d+) BODY\[[^\]\r\n]*\] \{(\d+)\}\r\n")
# The listing line as Dovecot and most servers order it (the order we ask for): one regex
# instead of four on the hot path of a 5,000-message listing.
_LISTING_LINE = re.compile(
    rb"\* (\d+) FETCH \(UID (\d+) RFC822\.SIZE (\d+) FLAGS \(([^)]*)\)(?: MODSEQ \((\d+)\))?\)$", re.IGNORECASE
)


@dataclass
class _Response:
    """One server response: its text with `{n}` literal markers in place, and the literals."""

    text: bytes
    literals: list[bytes] = field(default_factory=list)


class _Broken(Exception):
    """Internal: the connection is unusable (closed, or a response we cannot follow)."""


class _Wire:
    """IMAP responses read off a byte stream: lines, with literals taken out whole."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        # Literal bytes the current command may still bring back (interface.MAX_*); set
        # with each command's tag (TrioImapMailbox._next_tag).
        self.literal_budget = MAX_OTHER_LITERAL_BYTES

    def _spend(self, size: int) -> None:
        """A literal of `size` bytes is about to be read into memory."""
        if size > self.literal_budget:
            raise UpstreamImplausible(
                f"a {size}-byte literal, more than the {self.literal_budget} bytes left for this command"
            )
        self.literal_budget -= size

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def fill(self) -> None:
        chunk = await self.stream.receive_some(_RECEIVE_SIZE)
        if not chunk:
            raise _Broken("server closed the connection")
        self._buffer += chunk

    def _take(self, count: int) -> bytes:
        """The first `count` bytes of the buffer (or all of it), removed from it."""
        with memoryview(self._buffer) as view:
            data = bytes(view[:count])
        del self._buffer[:count]
        return data

    def body_fetch(self) -> tuple[int, int, bytes] | bool:
        """The next response, if it is `* n FETCH (UID u BODY[...] {size}` + literal + `)`,
        taken out of the buffer as (n, u, body). True: the buffer ends inside what may be one
        (fill it and ask again); False: the next response is something else."""
        buffer = self._buffer
        head = _BODY_FETCH_HEAD.match(buffer)
        if head is None:
            return len(buffer) <= _MAX_LINE and buffer.find(b"\r\n") < 0 and buffer[:2] in (b"* ", b"*", b"")
        size = int(head.group(3))
        if size > self.literal_budget:
            return False  # the general parser refuses it (_spend) before reading any of it
        start = head.end()
        end = start + size
        if len(buffer) < end + 3:
            return True
        if buffer[end : end + 3] != b")\r\n":
            return False
        # The match reads its groups out of the buffer: they are taken before it changes.
        number, uid = int(head.group(1)), int(head.group(2))
        self.literal_budget -= size
        del buffer[:start]
        body = self._take(end - start)
        del buffer[:3]
        return number, uid, body

    async def piece(self, most: int) -> bytes:
        """At most `most` bytes: what is buffered, else what one receive brings."""
        if self._buffer:
            return self._take(most)
        data = await self.stream.receive_some(min(most, _RECEIVE_SIZE))
        if not data:
            raise _Broken("server closed the connection")
        return data

    async def _line(self) -> bytes:
        searched = 0
        while (end := self._buffer.find(b"\r\n", searched)) < 0:
            searched = max(0, len(self._buffer) - 1)
            if searched > _MAX_LINE:
                raise _Broken("response line too long")
            await self.fill()
        line = self._take(end)
        del self._buffer[:2]
        return line

    async def _exact(self, size: int) -> bytes:
        buffered = len(self._buffer)
        if buffered >= size:
            return self._take(size)
        # A literal bigger than what is buffered (a message chunk, typically 1 MiB): its
        # pieces are joined once, instead of being appended to the buffer and copied out
        # again, one copy fewer per byte of every RETR.
        pieces: list[bytes | memoryview] = [bytes(self._buffer)]
        self._buffer.clear()
        while buffered < size:
            piece = await self.stream.receive_some(_RECEIVE_SIZE)
            if not piece:
                raise _Broken("server closed the connection")
            pieces.append(piece)
            buffered += len(piece)
        if buffered > size:
            last = memoryview(pieces[-1])
            keep = len(last) - (buffered - size)
            self._buffer += last[keep:]
            pieces[-1] = last[:keep]
        return b"".join(pieces)

    async def response(self) -> _Response:
        return await self.response_from(await self._line())

    async def response_from(self, line: bytes) -> _Response:
        """The rest of a response whose first line has been read already."""
        response = _Response(line)
        while line.endswith(b"}") and (literal := _LITERAL_END.search(line)) is not None:
            size = int(literal.group(1))
            self._spend(size)
            response.literals.append(await self._exact(size))
            line = await self._line()
            response.text += line
        return response


class _RangeReader:
    """One `UID FETCH uid (UID BODY.PEEK[]<offset.length>)` whose literal is handed out piece
    by piece as the socket delivers it. Each read waits at most upstream.timeout_seconds:
    the whole transfer may take as long as the POP3 client takes to read it."""

    def __init__(self, mailbox: TrioImapMailbox, uid: int, offset: int, length: int) -> None:
        self._mailbox = mailbox
        self._wire = mailbox._wire
        self._command = b"UID FETCH %d (UID BODY.PEEK[]<%d.%d>)" % (uid, offset, length)
        self._uid = uid
        self._length = length
        self._tag = b""  # set when the command is sent
        self._head = b""  # the FETCH response up to the body literal
        self._whole = b""  # the body, when the server sent it in a way we do not stream
        self._remaining = 0  # bytes of the body literal still to read
        self._status = b""
        # True while nothing of this command is left on the wire (before it is sent, and
        # after its tagged answer).
        self.settled = True

    async def next_piece(self) -> bytes:
        mailbox = self._mailbox
        if not self._tag:
            found = await mailbox._guarded("fetch", self._start)
            if not found:
                if self._status[:2].upper() in (b"OK", b"NO"):
                    raise MessageGone(f"UID {self._uid} no longer exists")
                raise UpstreamError("fetch: server answered BAD")
            data = self._whole if self.settled else await mailbox._guarded("fetch", self._piece)
        elif self.settled:
            return b""
        else:
            data = await mailbox._guarded("fetch", self._piece)
        if self.settled and self._status[:2].upper() != b"OK":
            raise UpstreamError("fetch: server answered NO with the message")
        return data

    async def _start(self) -> bool:
        """Sends the command and reads up to the body literal; False if there is none."""
        # The body may also come whole, in an order we do not stream (`_whole`).
        self._tag = self._mailbox._next_tag(self._length + MAX_OTHER_LITERAL_BYTES)
        self.settled = False
        await self._wire.send(self._tag + b" " + self._command + b"\r\n")
        while True:
            line = await self._wire._line()
            if line.startswith(b"* ") and (size := self._body_literal(line)) is not None:
                if size > self._length:
                    # Streamed, never held; but more than we asked for is no answer to us.
                    raise UpstreamImplausible(f"a {size}-byte literal for a FETCH of {self._length} bytes")
                self._head, self._remaining = line, size
                return True
            if line.startswith(b"* ") or not line.startswith(self._tag + b" "):
                response = await self._wire.response_from(line)
                if line.startswith(b"* "):
                    self._mailbox._untagged(response.text)
                    # Our body after all, in an order we do not stream (or empty): whole.
                    if (body := _body_section([response], self._uid)) is not None:
                        self._whole = body
                        await self._to_tagged()
                        return True
                continue
            self._settle(line)
            return False

    def _body_literal(self, line: bytes) -> int | None:
        """The size of our UID's body literal if `line` ends with it (UID asked for first,
        so it comes before the literal)."""
        literal = _BODY_LITERAL.search(line)
        if literal is None or literal.end() != len(line):
            return None
        uid = _UID.search(line, 0, literal.start())
        if uid is None or int(uid.group(1)) != self._uid:
            return None
        return int(literal.group(1))

    async def _piece(self) -> bytes:
        data = await self._wire.piece(self._remaining) if self._remaining > 0 else b""
        self._remaining -= len(data)
        if self._remaining <= 0:
            # The rest of the FETCH response (its closing parenthesis), then the tagged answer.
            rest = await self._wire.response_from(await self._wire._line())
            self._mailbox._untagged(self._head + rest.text)
            await self._to_tagged()
        return data

    async def _to_tagged(self) -> None:
        self._status = await self._mailbox._answer(self._tag)
        self.settled = True

    def _settle(self, tagged: bytes) -> None:
        self._status = tagged[len(self._tag) + 1 :]
        self._mailbox._response_codes(self._status)
        self.settled = True


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _uid_ranges(uid_set: bytes) -> Iterator[tuple[int, int]]:
    """(low, high) of each item of an IMAP UID set such as b"3:1,7", one at a time."""
    for match in _UID_RANGE.finditer(uid_set):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        yield min(first, last), max(first, last)


def _wire_name(folder: str) -> str:
    return imap_syntax.quote_string(imap_syntax.encode_mailbox_name(folder))


class _Listing:
    """The maildrop as the server numbers it: UIDs by sequence number, size and \\Deleted by
    UID. `None` stands for a message announced by EXISTS whose UID we have not seen yet.

    While nothing changes, `snapshot()` hands out the same snapshot (and `complete()` its
    earlier answer): a warm poll of an unchanged 5,000-message maildrop then reuses what the
    previous session built from it (`MailboxSnapshot.memo`)."""

    def __init__(self) -> None:
        self.by_sequence: list[int | None] = []
        self.info: dict[int, tuple[int, bool]] = {}
        # False once the server's numbering and ours disagreed: only a full listing helps.
        self.consistent = True
        self._snapshot: MailboxSnapshot | None = None
        self._complete: bool | None = None

    def _changed(self) -> None:
        self._snapshot = None
        self._complete = None

    def exists(self, count: int) -> None:
        if count > MAX_MAILDROP_MESSAGES:
            raise UpstreamImplausible(f"EXISTS {count}: more than {MAX_MAILDROP_MESSAGES} messages")
        if count > len(self.by_sequence):
            self.by_sequence.extend([None] * (count - len(self.by_sequence)))
            self._changed()

    def expunge(self, number: int) -> None:
        self._changed()
        if not 1 <= number <= len(self.by_sequence):
            self.consistent = False
            return
        uid = self.by_sequence.pop(number - 1)
        if uid is not None:
            self.info.pop(uid, None)

    def vanish(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Forget the UIDs in `ranges` (low, high), however wide: only UIDs listed here are
        looked at, never every UID a range spans."""
        info = self.info
        gone: set[int] = set()
        known: list[int] | None = None
        for low, high in ranges:
            if high - low < _NARROW_RANGE:
                gone.update(uid for uid in range(low, high + 1) if uid in info)
                continue
            if known is None:
                known = sorted(info)
            gone.update(known[bisect.bisect_left(known, low) : bisect.bisect_right(known, high)])
        if gone:
            self._changed()
            self.by_sequence = [uid for uid in self.by_sequence if uid not in gone]
            for uid in gone:
                info.pop(uid, None)

    def fetched(self, number: int, uid: int | None, size: int | None, deleted: bool | None) -> None:
        if number > MAX_MAILDROP_MESSAGES:
            raise UpstreamImplausible(f"FETCH of sequence number {number}: more than {MAX_MAILDROP_MESSAGES} messages")
        if number > len(self.by_sequence):
            self.exists(number)
        known = self.by_sequence[number - 1]
        if uid is None:
            uid = known
            if uid is None:
                return  # a flag update for a message whose UID we do not know yet
        elif known != uid:
            self._changed()
            if known is not None:
                self.consistent = False
                self.info.pop(known, None)
            self.by_sequence[number - 1] = uid
        if size is None and deleted is None:
            return  # the UID was all there was to learn (a message body we fetched)
        old = self.info.get(uid)
        old_size, old_deleted = old if old is not None else (None, False)
        new_size = size if size is not None else old_size
        if new_size is None:
            return
        new = (new_size, old_deleted if deleted is None else deleted)
        if new != old:
            self.info[uid] = new
            self._changed()

    def complete(self) -> bool:
        if self._complete is None:
            self._complete = all(uid is not None and uid in self.info for uid in self.by_sequence)
        return self._complete

    def first_missing(self) -> int | None:
        """The sequence number of the first message not listed yet (None: all are)."""
        for number, uid in enumerate(self.by_sequence, 1):
            if uid is None or uid not in self.info:
                return number
        return None

    def snapshot(self, uidvalidity: int) -> MailboxSnapshot:
        cached = self._snapshot
        if cached is not None and cached.uidvalidity == uidvalidity:
            return cached
        info = self.info
        uids = sorted(uid for uid, (_size, deleted) in info.items() if not deleted)
        self._snapshot = MailboxSnapshot(uidvalidity, uids, [info[uid][0] for uid in uids])
        return self._snapshot


class TrioImapMailbox:
    """`UpstreamMailbox` on one IMAP connection over a Trio stream."""

    def __init__(self, wire: _Wire, settings: UpstreamSettings) -> None:
        self._wire = wire
        self._settings = settings
        self._lock = trio.Lock()
        self._broken = False
        self._tag = 0
        self._capabilities: frozenset[str] = frozenset()
        self._selected: str | None = None
        self._exists = 0
        self._uidvalidity: int | None = None
        self._highest_modseq: int | None = None
        # The maildrop's UIDVALIDITY when the last snapshot was taken: the session's UIDs mean
        # something only within it.
        self._snapshot_uidvalidity: int | None = None
        # The warm listing, valid only while the maildrop stays selected.
        self._listing: _Listing | None = None
        self._listing_modseq: int | None = None
        self._modseq_seen: int | None = None
        self._qresync = False
        self._condstore = False
        self._bye = False

    # -- state -------------------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[str]:
        return self._capabilities - self._settings.ignore_capabilities_set

    @property
    def usable(self) -> bool:
        return not self._broken

    def _break(self) -> None:
        self._broken = True
        self._listing = None
        stream = self._wire.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            # Closing the socket is synchronous (trio notifies any waiter); no await needed.
            stream.socket.close()

    # -- the protocol --------------------------------------------------------------------------

    def _next_tag(self, literal_budget: int = MAX_OTHER_LITERAL_BYTES) -> bytes:
        """The tag of a new command, which may bring back `literal_budget` literal bytes."""
        self._tag += 1
        self._wire.literal_budget = literal_budget
        return b"B%d" % self._tag

    def _untagged(self, text: bytes) -> None:
        """Keep the connection's view of the selected mailbox up to date."""
        if (body_fetch := _BODY_FETCH.match(text)) is not None:
            if self._listing is not None:
                self._listing.fetched(int(body_fetch.group(1)), int(body_fetch.group(2)), None, None)
            return
        if self._listing is not None and (line := _LISTING_LINE.match(text)) is not None:
            number, uid, size, flags, modseq = line.groups()
            if modseq is not None:
                value = int(modseq)
                self._modseq_seen = value if self._modseq_seen is None else max(self._modseq_seen, value)
            self._listing.fetched(int(number), int(uid), int(size), b"\\deleted" in flags.lower())
            return
        body = text[2:]
        number = _UNTAGGED_NUMBER.match(body)
        if number is not None:
            count, kind = int(number.group(1)), number.group(2).upper()
            if count > MAX_MAILDROP_MESSAGES:
                name = kind.decode()
                what = f"{name} {count}" if kind in (b"EXISTS", b"RECENT") else f"{name} of sequence number {count}"
                raise UpstreamImplausible(f"{what}: more than {MAX_MAILDROP_MESSAGES} messages")
            if kind == b"EXISTS":
                self._exists = count
                if self._listing is not None:
                    self._listing.exists(count)
            elif kind == b"EXPUNGE":
                self._exists -= 1
                if self._listing is not None:
                    self._listing.expunge(count)
            elif kind == b"FETCH":
                self._on_fetch(count, body)
            return
        upper = body[:24].upper()
        if upper.startswith(b"VANISHED"):
            uid_set = body.rsplit(b" ", 1)[-1]
            if not upper.startswith(b"VANISHED (EARLIER)"):
                # Without EARLIER every UID named was in the mailbox (RFC 7162 3.2.10);
                # EARLIER may name UIDs that never existed, so only its width is harmless.
                count = sum(high - low + 1 for low, high in _uid_ranges(uid_set))
                if count > MAX_MAILDROP_MESSAGES:
                    raise UpstreamImplausible(f"VANISHED of {count} messages: more than {MAX_MAILDROP_MESSAGES}")
                self._exists -= count
            if self._listing is not None:
                self._listing.vanish(_uid_ranges(uid_set))
        elif upper.startswith(b"CAPABILITY"):
            self._capabilities = frozenset(body[10:].decode("ascii", "replace").upper().split())
        elif upper.startswith((b"OK", b"NO")):
            self._response_codes(body)
        elif upper.startswith(b"BYE"):
            self._bye = True

    def _response_codes(self, text: bytes) -> None:
        for name, value in _CODE_NUMBER.findall(text):
            key = name.upper()
            if key == b"UIDVALIDITY":
                self._uidvalidity = int(value)
            elif key == b"HIGHESTMODSEQ":
                self._highest_modseq = int(value)
        caps = imap_syntax.find_capabilities([text])
        if caps is not None and b"[CAPABILITY" in text.upper():
            self._capabilities = caps

    def _on_fetch(self, number: int, body: bytes) -> None:
        if self._listing is None:
            return
        uid = _UID.search(body)
        size = _SIZE.search(body)
        flags = _FLAGS.search(body)
        modseq = _MODSEQ.search(body)
        if modseq is not None:
            value = int(modseq.group(1))
            self._modseq_seen = value if self._modseq_seen is None else max(self._modseq_seen, value)
        self._listing.fetched(
            number,
            int(uid.group(1)) if uid else None,
            int(size.group(1)) if size else None,
            bool(_DELETED.search(flags.group(1))) if flags else None,
        )

    async def _guarded(self, what: str, exchange: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """One exchange within the upstream timeout. Never lets an error out with the
        connection half-way through a command: the connection is marked broken first."""
        if self._broken:
            raise UpstreamUnavailable(f"{what}: upstream connection is closed")
        try:
            with trio.fail_after(self._settings.timeout_seconds):
                return await exchange(*args)
        except trio.TooSlowError:
            self._break()
            raise UpstreamUnavailable(f"{what}: no answer within {self._settings.timeout_seconds:g} s") from None
        except (_Broken, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break()
            raise UpstreamUnavailable(f"{what}: {type(exc).__name__}") from None
        except UpstreamImplausible as exc:
            self._break()
            raise UpstreamImplausible(f"{what}: {exc}") from None
        except BaseException:
            self._break()
            raise

    async def _run(
        self, what: str, command: bytes, *, literal: bytes | None = None, collect: bool = False,
        literal_budget: int = MAX_OTHER_LITERAL_BYTES,
    ) -> tuple[bytes, list[_Response]]:
        """Send one command, read up to its tagged answer. Returns (status, untagged responses)."""
        return await self._guarded(what, self._exchange, command, literal, collect, literal_budget)

    async def _exchange(
        self, command: bytes, literal: bytes | None, collect: bool, literal_budget: int
    ) -> tuple[bytes, list[_Response]]:
        tag = self._next_tag(literal_budget)
        wire = self._wire
        if literal is None:
            await wire.send(tag + b" " + command + b"\r\n")
        elif "LITERAL+" in self._capabilities:
            await wire.send(tag + b" " + command + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        else:
            await wire.send(tag + b" " + command + b" {%d}\r\n" % len(literal))
            while True:
                response = await wire.response()
                if response.text.startswith(b"+"):
                    break
                if response.text.startswith(tag + b" "):
                    return response.text[len(tag) + 1 :], []
                self._untagged(response.text)
            await wire.send(literal + b"\r\n")
        collected: list[_Response] = []
        status = await self._answer(tag, collected if collect else None)
        return status, collected

    async def _answer(self, tag: bytes, collected: list[_Response] | None = None) -> bytes:
        """Reads up to the tagged answer of `tag` and returns its status; untagged responses
        on the way update our view (and go into `collected`, if given)."""
        prefix = tag + b" "
        while True:
            response = await self._wire.response()
            text = response.text
            if text.startswith(b"* "):
                self._untagged(text)
                if collected is not None:
                    collected.append(response)
            elif text.startswith(prefix):
                status = text[len(prefix) :]
                self._response_codes(status)
                return status
            # A continuation request we did not ask for: ignore it.

    async def _pipelined(self, what: str, commands: list[bytes]) -> list[tuple[bytes, list[_Response]]]:
        """Send several commands in one write and read all their answers (one round trip).
        Returns (status, untagged responses of all of them) per command."""
        return await self._guarded(what, self._exchange_pipelined, commands)

    async def _exchange_pipelined(self, commands: list[bytes]) -> list[tuple[bytes, list[_Response]]]:
        tags = [self._next_tag() for _ in commands]
        await self._wire.send(b"".join(tag + b" " + command + b"\r\n" for tag, command in zip(tags, commands, strict=True)))
        # Servers may finish pipelined commands in any order (Dovecot answers a STATUS
        # before a long FETCH), so untagged responses are shared by all of them.
        collected: list[_Response] = []
        statuses: dict[bytes, bytes] = {}
        while len(statuses) < len(tags):
            response = await self._wire.response()
            if response.text.startswith(b"* "):
                self._untagged(response.text)
                collected.append(response)
                continue
            tag, _, status = response.text.partition(b" ")
            if tag in tags:
                self._response_codes(status)
                statuses[tag] = status
        return [(statuses[tag], collected) for tag in tags]

    async def _checked(
        self, what: str, command: bytes, *, literal: bytes | None = None, collect: bool = False
    ) -> list[_Response]:
        status, collected = await self._run(what, command, literal=literal, collect=collect)
        if not status[:2].upper() == b"OK":
            raise UpstreamError(f"{what}: server answered {status.split(b' ', 1)[0].decode('ascii', 'replace')}")
        return collected

    async def _greeting(self) -> None:
        with trio.fail_after(self._settings.timeout_seconds):
            response = await self._wire.response()
        text = response.text
        upper = text[:12].upper()
        if upper.startswith(b"* BYE"):
            raise UpstreamUnavailable("connect: server refused the session")
        if upper.startswith(b"* PREAUTH"):
            raise PreauthGreeting()
        if not upper.startswith(b"* OK"):
            raise UpstreamUnavailable("connect: not an IMAP greeting")
        self._response_codes(text)

    async def _starttls(self) -> None:
        if not self._capabilities:
            await self._checked("capability", b"CAPABILITY")
        if "STARTTLS" not in self._capabilities:
            # Never fall back to plaintext when TLS was asked for.
            raise _TlsFailed('starttls: the server does not offer STARTTLS (upstream.tls = "starttls")')
        status, _ = await self._run("starttls", b"STARTTLS")
        if status[:2].upper() != b"OK":
            raise _TlsFailed('starttls: the server refused STARTTLS (upstream.tls = "starttls")')
        if self._wire.pending:
            # Bytes sent before the handshake would be trusted as if they came over TLS.
            raise _TlsFailed("starttls: server sent data before the TLS handshake")
        with trio.fail_after(self._settings.timeout_seconds):
            self._wire.stream = await _start_tls(self._wire.stream, self._settings)
        # RFC 3501: capabilities learnt before TLS must be forgotten.
        self._capabilities = frozenset()
        await self._checked("capability", b"CAPABILITY")

    async def _login(self, username: str, password: str) -> None:
        if not self._capabilities:
            await self._checked("capability", b"CAPABILITY")
        caps = self._capabilities
        if "AUTH=PLAIN" in caps and "SASL-IR" in caps:
            # SASL PLAIN carries any byte sequence (RFC 4616); LOGIN's quoted strings cannot.
            token = base64.b64encode(
                b"\0" + username.encode("utf-8", "surrogateescape") + b"\0" + password.encode("utf-8", "surrogateescape")
            )
            command = b"AUTHENTICATE PLAIN " + token
        else:
            try:
                user_arg = imap_syntax.quote_string(username)
                password_arg = imap_syntax.quote_string(password)
            except ValueError:
                raise AuthenticationFailed("credentials cannot be sent to the server") from None
            command = (
                b"LOGIN " + user_arg.encode("utf-8", "surrogateescape") + b" " + password_arg.encode("utf-8", "surrogateescape")
            )
        status, _ = await self._run("login", command)
        if status[:2].upper() != b"OK":
            result = status.split(b" ", 1)
            code = imap_syntax.response_code(result[1] if len(result) > 1 else b"")
            if result[0].upper() == b"NO" and code not in _TEMPORARY_AUTH_CODES:
                raise AuthenticationFailed("upstream rejected the credentials")
            raise UpstreamError(f"login: server answered {result[0].decode('ascii', 'replace')} [{code}]")
        if b"[CAPABILITY" not in status.upper():
            await self._checked("capability", b"CAPABILITY")

    async def _enable_extensions(self) -> None:
        caps = self.capabilities
        if "ENABLE" not in caps:
            return
        if "QRESYNC" in caps:
            await self._checked("enable", b"ENABLE QRESYNC")
            self._qresync = self._condstore = True
        elif "CONDSTORE" in caps:
            await self._checked("enable", b"ENABLE CONDSTORE")
            self._condstore = True

    # -- selection and the listing ----------------------------------------------------------------

    async def _select(self, folder: str) -> None:
        self._selected = None
        self._listing = None
        self._uidvalidity = self._highest_modseq = None
        self._exists = 0
        await self._checked("select", b"SELECT " + _wire_name(folder).encode("ascii"))
        self._selected = folder

    async def _ensure_selected(self, folder: str) -> None:
        if self._selected != folder:
            await self._select(folder)
            if (
                folder == self._settings.mailbox
                and self._snapshot_uidvalidity is not None
                and self._uidvalidity != self._snapshot_uidvalidity
            ):
                # The folder was recreated since the snapshot: its UIDs now name other
                # messages, which must be neither served nor deleted in the old ones' place.
                raise UpstreamError("maildrop UIDVALIDITY changed since the session's snapshot")

    async def _full_listing(self) -> None:
        await self._select(self._settings.mailbox)
        if self._uidvalidity is None:
            raise UpstreamError("select: server sent no UIDVALIDITY")
        listing = _Listing()
        listing.exists(self._exists)
        self._listing = listing
        self._modseq_seen = None
        self._listing_modseq = self._highest_modseq if self._condstore else None
        if self._exists:
            await self._checked("listing", b"UID FETCH 1:* (UID RFC822.SIZE FLAGS)")
        # Mail delivered while the listing ran is announced by an EXISTS after the FETCH:
        # list those messages too instead of failing the login (a few rounds only, since
        # delivery may go on).
        for _round in range(3):
            missing = listing.first_missing()
            if missing is None or not listing.consistent:
                break
            await self._checked("listing", b"FETCH %d:* (UID RFC822.SIZE FLAGS)" % missing)
        if not listing.complete():
            self._listing = None
            raise UpstreamError("listing: server did not list every message")

    async def _refresh_listing(self) -> bool:
        """Bring the warm listing up to date in one round trip; False if it cannot be trusted.

        The maildrop is selected afresh (a parked connection's view of it may be stale: a
        folder deleted and re-created under it keeps its old view), with commands pipelined:
        - QRESYNC: SELECT (QRESYNC (uidvalidity modseq)) reports what vanished since, and
          UID FETCH 1:* (...) (CHANGEDSINCE modseq) what changed or arrived, with sizes;
        - CONDSTORE: NOOP first (expunges pending for the old view), then the same without
          the QRESYNC parameter;
        - neither: NOOP, SELECT, UID FETCH <last UID + 1>:*.
        A changed UIDVALIDITY, a count that does not match EXISTS, or a listing that no longer
        lines up with the server's numbering means a full listing instead."""
        listing = self._listing
        assert listing is not None
        folder = _wire_name(self._settings.mailbox).encode("ascii")
        uidvalidity, since = self._uidvalidity, self._listing_modseq
        commands: list[bytes] = []
        if self._qresync and since is not None:
            commands.append(b"SELECT %s (QRESYNC (%d %d))" % (folder, uidvalidity or 0, since))
        else:
            commands += [b"NOOP", b"SELECT " + folder + (b" (CONDSTORE)" if self._condstore else b"")]
        if self._condstore and since is not None:
            commands.append(b"UID FETCH 1:* (UID RFC822.SIZE FLAGS) (CHANGEDSINCE %d)" % since)
        else:
            after = max((uid for uid in listing.by_sequence if uid is not None), default=0) + 1
            commands.append(b"UID FETCH %d:* (UID RFC822.SIZE FLAGS)" % after)
        self._selected = None
        self._uidvalidity = self._highest_modseq = None
        answers = await self._pipelined("listing", commands)
        if any(status[:2].upper() != b"OK" for status, _ in answers):
            return False
        self._selected = self._settings.mailbox
        if self._uidvalidity is None or self._uidvalidity != uidvalidity:
            return False
        if self._condstore:
            self._listing_modseq = self._highest_modseq
        # The count check: every message the server says exists is known, and no more.
        return listing.consistent and len(listing.by_sequence) == self._exists and listing.complete()

    async def snapshot(self) -> MailboxSnapshot:
        async with self._lock:
            warm = self._listing is not None and self._selected == self._settings.mailbox
            if not (warm and await self._refresh_listing()):
                await self._full_listing()
            assert self._listing is not None and self._uidvalidity is not None
            self._snapshot_uidvalidity = self._uidvalidity
            return self._listing.snapshot(self._uidvalidity)

    # -- parking (bridge.upstream.pool) ---------------------------------------------------------

    async def keep_alive(self, stop: trio.Event, interval: float) -> None:
        """Hold the connection, maildrop selected and listing warm, until `stop` is set:
        IDLE re-issued every `interval` seconds where the server has it, else NOOP."""
        async with self._lock:
            if self._listing is None or self._selected != self._settings.mailbox:
                await self._full_listing()
            while not stop.is_set():
                if "IDLE" in self.capabilities:
                    await self._idle(stop, interval)
                else:
                    with trio.move_on_after(interval):
                        await stop.wait()
                    if not stop.is_set():
                        await self._checked("noop", b"NOOP")

    async def _idle(self, stop: trio.Event, interval: float) -> None:
        try:
            with trio.fail_after(interval + self._settings.timeout_seconds):
                await self._idle_once(stop, interval)
        except trio.TooSlowError:
            self._break()
            raise UpstreamUnavailable("idle: no answer") from None
        except (_Broken, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break()
            raise UpstreamUnavailable(f"idle: {type(exc).__name__}") from None
        except BaseExceptionGroup as group:
            # _idle_once reads inside a nursery, so a broken connection arrives wrapped in a
            # group; unwrapped here so the pool sees UpstreamError, and a shutdown's
            # cancellation racing it still unwinds as plain cancellation.
            self._break()
            implausible, rest = group.split(UpstreamImplausible)
            if rest is not None:
                _broken, rest = rest.split((_Broken, trio.BrokenResourceError, trio.ClosedResourceError, OSError))
            if rest is not None:
                raise rest from None
            if implausible is not None:
                raise UpstreamImplausible(f"idle: {_first_error(implausible)}") from None
            raise UpstreamUnavailable("idle: connection broken") from None
        except BaseException:
            self._break()
            raise

    async def _idle_once(self, stop: trio.Event, interval: float) -> None:
        tag = self._next_tag()
        wire = self._wire
        await wire.send(tag + b" IDLE\r\n")
        while True:
            response = await wire.response()
            if response.text.startswith(b"+"):
                break
            if response.text.startswith(tag + b" "):
                raise _Broken("IDLE refused")
            self._untagged(response.text)

        async with trio.open_nursery() as nursery:

            async def done_when_told() -> None:
                with trio.move_on_after(interval):
                    await stop.wait()
                await wire.send(b"DONE\r\n")

            nursery.start_soon(done_when_told)
            # Reading goes on until the server ends the IDLE (after DONE, or by itself), so a
            # response is never cut in half.
            while True:
                response = await wire.response()
                if response.text.startswith(tag + b" "):
                    nursery.cancel_scope.cancel()
                    if response.text[len(tag) + 1 : len(tag) + 3].upper() != b"OK":
                        raise _Broken("IDLE ended with an error")
                    return
                if response.text.startswith(b"* "):
                    self._untagged(response.text)
                    if response.text[2:5].upper() == b"BYE":
                        raise _Broken("server said BYE")

    # -- reading messages ------------------------------------------------------------------------

    async def fetch_range(self, uid: int, offset: int, length: int) -> bytes:
        async with self._lock:
            await self._ensure_selected(self._settings.mailbox)
            status, collected = await self._run(
                "fetch", b"UID FETCH %d (UID BODY.PEEK[]<%d.%d>)" % (uid, offset, length), collect=True,
                literal_budget=length + MAX_OTHER_LITERAL_BYTES,
            )
        data = _body_section(collected, uid)
        ok = status[:2].upper() == b"OK"
        if data is None:
            if ok or status[:2].upper() == b"NO":
                raise MessageGone(f"UID {uid} no longer exists")
            raise UpstreamError("fetch: server answered BAD")
        if not ok:
            raise UpstreamError("fetch: server answered NO")
        return data

    @asynccontextmanager
    async def open_range(self, uid: int, offset: int, length: int) -> AsyncIterator[RangeReader]:
        async with self._lock:
            await self._ensure_selected(self._settings.mailbox)
            reader = _RangeReader(self, uid, offset, length)
            try:
                yield reader
            finally:
                if not reader.settled:
                    # Part of the literal or the tagged answer is still on its way: nothing
                    # else can be read on this connection.
                    self._break()

    # -- changing the maildrop ---------------------------------------------------------------

    async def _remove_selected(self, uids: Sequence[int]) -> None:
        pieces = chunked_uid_sets(uids)
        for piece in pieces:
            await self._checked("store", b"UID STORE %s +FLAGS.SILENT (\\Deleted)" % piece.encode())
        if "UIDPLUS" in self.capabilities:
            for piece in pieces:
                await self._checked("expunge", b"UID EXPUNGE " + piece.encode())
        # Without UIDPLUS a plain EXPUNGE would also remove messages other clients flagged;
        # the messages stay flagged \Deleted (README, "Deletion, exactly").

    async def _confirm_maildrop(self) -> None:
        """Select the maildrop afresh and make sure it is still the folder the session's
        snapshot was taken in, before changing anything in it by UID. A server may keep a
        session's view of a folder that another client deleted and recreated (Dovecot 2.3
        does: NOOP, STATUS and UIDVALIDITY stay the old ones) and then apply the old UIDs
        to the new folder's messages; only a new SELECT reads the folder as it is now. The
        price is one SELECT per QUIT that changes something (the warm listing is rebuilt at
        the next snapshot)."""
        await self._select(self._settings.mailbox)
        if self._snapshot_uidvalidity is not None and self._uidvalidity != self._snapshot_uidvalidity:
            raise UpstreamError("maildrop UIDVALIDITY changed since the session's snapshot")

    async def delete(self, uids: Sequence[int]) -> None:
        if uids:
            async with self._lock:
                await self._confirm_maildrop()
                await self._remove_selected(uids)

    async def add_flags(self, uids: Sequence[int], flags: str) -> None:
        if uids:
            async with self._lock:
                await self._confirm_maildrop()
                for piece in chunked_uid_sets(uids):
                    await self._checked("store", f"UID STORE {piece} +FLAGS.SILENT ({flags})".encode())

    async def move(self, uids: Sequence[int], folder: str) -> None:
        if not uids:
            return
        await self.ensure_folder(folder)
        target = _wire_name(folder).encode("ascii")
        async with self._lock:
            await self._confirm_maildrop()
            if "MOVE" in self.capabilities:
                for piece in chunked_uid_sets(uids):
                    await self._checked("move", b"UID MOVE " + piece.encode() + b" " + target)
                _log.debug("messages_moved", count=len(uids), method="MOVE")
                return
            # RFC 6851's fallback for exactly these UIDs: a failed copy flags nothing; a failed
            # expunge leaves the originals (flagged), never lost.
            for piece in chunked_uid_sets(uids):
                await self._checked("copy", b"UID COPY " + piece.encode() + b" " + target)
            await self._remove_selected(uids)
        _log.debug("messages_moved", count=len(uids), method="COPY")

    async def ensure_folder(self, folder: str) -> None:
        name = _wire_name(folder).encode("ascii")
        async with self._lock:
            status, _ = await self._run("create", b"CREATE " + name)
            if status[:2].upper() == b"OK":
                return
            # [ALREADYEXISTS] is RFC 5530; older servers just say NO. STATUS tells for sure.
            await self._checked("status", b"STATUS " + name + b" (UIDNEXT)")

    async def append(self, folder: str, message: bytes) -> None:
        async with self._lock:
            await self._checked("append", b"APPEND " + _wire_name(folder).encode("ascii"), literal=message)

    async def search(self, folder: str, *criteria: str) -> list[int]:
        async with self._lock:
            if self._selected == folder:
                # A selected folder shows what other sessions appended only after a command
                # that syncs it (NOOP does; Dovecot's CREATE and STATUS do not), and SEARCH
                # answers from this session's view: without the NOOP it misses new messages.
                await self._checked("noop", b"NOOP")
            else:
                await self._select(folder)
            collected = await self._checked("search", b"UID SEARCH " + " ".join(criteria).encode("utf-8"), collect=True)
        found: list[int] = []
        for response in collected:
            if response.text[2:9].upper() == b"SEARCH ":
                found.extend(int(token) for token in response.text[9:].split() if token.isdigit())
        return found

    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]:
        return await self._fetch_sections(folder, uids, b"TEXT", b"<0.%d>" % TEXT_FETCH_LIMIT)

    async def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        return await self._fetch_sections(self._settings.mailbox, uids, b"")

    async def _fetch_sections(
        self, folder: str, uids: Sequence[int], section: bytes, partial: bytes = b""
    ) -> dict[int, bytes]:
        if not uids:
            return {}
        found: dict[int, bytes] = {}
        async with self._lock:
            await self._ensure_selected(folder)
            for piece in chunked_uid_sets(uids):
                command = b"UID FETCH %s (UID BODY.PEEK[%s]%s)" % (piece.encode(), section, partial)
                status = await self._guarded("fetch", self._exchange_bodies, command, found)
                if status[:2].upper() != b"OK":
                    raise UpstreamError(f"fetch: server answered {status.split(b' ', 1)[0].decode('ascii', 'replace')}")
        return found

    async def _exchange_bodies(self, command: bytes, found: dict[int, bytes]) -> bytes:
        """One UID FETCH of message bodies: each body into `found` by UID. Returns the status.
        Answers in the usual shape are taken straight out of the buffer (`_Wire.body_fetch`:
        one regex match and one copy per message, no await), anything else the general way."""
        tag = self._next_tag(MAX_BODY_FETCH_BYTES)
        wire = self._wire
        await wire.send(tag + b" " + command + b"\r\n")
        prefix = tag + b" "
        while True:
            taken = wire.body_fetch()
            if taken is True:
                await wire.fill()
                continue
            if taken:
                number, uid, body = taken
                found[uid] = body
                if self._listing is not None:
                    self._listing.fetched(number, uid, None, None)
                continue
            response = await wire.response()
            text = response.text
            if text.startswith(b"* "):
                self._untagged(text)
                uid_match = _UID.search(text)
                if uid_match is not None and response.literals and _BODY_LITERAL.search(text):
                    found[int(uid_match.group(1))] = response.literals[_literal_index(text)]
            elif text.startswith(prefix):
                status = text[len(prefix) :]
                self._response_codes(status)
                return status

    async def delete_in(self, folder: str, uids: Sequence[int]) -> None:
        if uids:
            async with self._lock:
                await self._ensure_selected(folder)
                await self._remove_selected(uids)

    async def aclose(self) -> None:
        if self._broken:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE_SECONDS):
            try:
                async with self._lock:
                    await self._wire.send(self._next_tag() + b" LOGOUT\r\n")
                    # Wait for the server to close its side, so it logs a clean logout.
                    while True:
                        await self._wire.response()
            except (_Broken, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        self._break()


_STATUS_ITEM = re.compile(rb"\b(MESSAGES|UIDVALIDITY) (\d+)", re.IGNORECASE)


def _status_numbers(collected: list[_Response]) -> dict[bytes, int]:
    for response in collected:
        if response.text[2:9].upper() == b"STATUS ":
            # The item list follows the (possibly quoted) folder name: take the last "(...)".
            items = response.text[response.text.rfind(b"(") :]
            return {name.upper(): int(value) for name, value in _STATUS_ITEM.findall(items)}
    return {}


def _literal_index(text: bytes) -> int:
    """Which literal of a response the BODY[...] section is: the count of `{n}` markers
    before it (a FETCH may carry other literals first)."""
    match = _BODY_LITERAL.search(text)
    assert match is not None
    return len(re.findall(rb"\{\d+\}", text[: match.start()]))


def _body_section(collected: list[_Response], uid: int) -> bytes | None:
    """The BODY[]<offset> data for `uid`, skipping unsolicited FETCH responses (flag updates
    of other messages) mixed in."""
    for response in collected:
        text = response.text
        if _UNTAGGED_NUMBER.match(text, 2) is None:
            continue
        found_uid = _UID.search(text)
        if found_uid is not None and int(found_uid.group(1)) != uid:
            continue
        if response.literals and _BODY_LITERAL.search(text):
            return response.literals[_literal_index(text)]
        empty = _BODY_EMPTY.search(text)
        if empty is not None:
            return b"" if empty.group(1) == b'""' else None
    return None


def _connection_refused(exc: BaseException) -> bool:
    """trio.open_tcp_stream reports "all attempts failed" with the per-address errors as
    its cause (an exception group when there were several addresses)."""
    seen: list[BaseException] = [exc]
    while seen:
        error = seen.pop()
        if isinstance(error, ConnectionRefusedError):
            return True
        if isinstance(error, BaseExceptionGroup):
            seen.extend(error.exceptions)
        if error.__cause__ is not None:
            seen.append(error.__cause__)
    return False


_contexts: dict[tuple[str, bool], ssl.SSLContext] = {}


def _client_context(settings: UpstreamSettings) -> ssl.SSLContext:
    # Loading the system CA store costs milliseconds; one context per configuration.
    key = (settings.ca_file, settings.verify)
    if key not in _contexts:
        _contexts[key] = load_client_context(settings.ca_file, verify=settings.verify)
    return _contexts[key]


class _TlsFailed(Exception):
    """TLS could not be set up; retrying cannot help until the certificate or configuration
    changes, so this is an UpstreamError, not UpstreamUnavailable."""


async def _start_tls(stream: trio.abc.Stream, settings: UpstreamSettings) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, _client_context(settings), server_hostname=settings.host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise _TlsFailed(f"tls: certificate verification failed: {cause.verify_message}") from None
        if isinstance(cause, ssl.SSLError):
            raise _TlsFailed(f"tls: handshake failed: {cause.reason or type(cause).__name__}") from None
        raise
    return tls


async def open_mailbox(settings: UpstreamSettings, username: str, password: str) -> TrioImapMailbox:
    """Connect and authenticate as the POP3 user. Raises AuthenticationFailed or
    UpstreamUnavailable (UpstreamError for other server refusals)."""
    try:
        with trio.fail_after(settings.timeout_seconds):
            stream: trio.abc.Stream = await trio.open_tcp_stream(settings.host, settings.port)
            if settings.tls == "implicit":
                stream = await _start_tls(stream, settings)
    except trio.TooSlowError:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("timeout").inc()
        raise UpstreamUnavailable(f"connect: no connection within {settings.timeout_seconds:g} s") from None
    except _TlsFailed as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
        raise UpstreamError(str(exc)) from None
    except (OSError, trio.BrokenResourceError) as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("refused").inc()
        if _connection_refused(exc):
            raise UpstreamNotListening("connect: connection refused") from None
        reason = exc.strerror if isinstance(exc, OSError) else None
        raise UpstreamUnavailable(f"connect: {reason or type(exc).__name__}") from None
    mailbox = TrioImapMailbox(_Wire(stream), settings)
    try:
        try:
            await mailbox._greeting()
        except (trio.TooSlowError, _Broken, trio.BrokenResourceError, OSError):
            metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
            raise UpstreamUnavailable("connect: no IMAP greeting") from None
        except UpstreamUnavailable:
            metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
            raise
        except PreauthGreeting:
            metrics.UPSTREAM_CONNECT_FAILURES.labels("preauth").inc()
            raise
        if settings.tls == "starttls":
            try:
                await mailbox._starttls()
            except _TlsFailed as exc:
                metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
                raise UpstreamError(str(exc)) from None
            except trio.TooSlowError:
                raise UpstreamUnavailable("starttls: no answer") from None
            except (trio.BrokenResourceError, OSError):
                raise UpstreamUnavailable("starttls: connection lost") from None
        metrics.UPSTREAM_CONNECTS.inc()
        await mailbox._login(username, password)
        await mailbox._enable_extensions()
    except BaseException:
        mailbox._break()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        raise
    return mailbox
