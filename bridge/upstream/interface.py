"""The Trio-facing interface every upstream IMAP engine implements, and its errors.

The session layer sees only this: an authenticated, selected mailbox that can be snapshotted,
read in byte ranges, and changed by UID. Which IMAP client library sits behind it is the
engine's business (see `bridge.upstream.aioimap`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")

# fetch_texts reads at most this many bytes of each message's text (one partial FETCH):
# state records are small, and anything read back from a mailbox may be hostile.
TEXT_FETCH_LIMIT = 65536
# What an upstream's numbers may make the bridge hold. Without bounds a hostile or spoofed
# server (any upstream reached without TLS) turns one short line into gigabytes: `* 4294967295
# EXISTS` into a list of that many entries, a VANISHED range into a set, a `{4294967295}`
# literal into a buffer. Past a bound the session's upstream connection is dropped
# (UpstreamImplausible: the POP3 client hears -ERR [SYS/TEMP], nothing else is affected).
#
# Messages in a maildrop (EXISTS, sequence numbers, VANISHED counts): POP3 lists the whole
# maildrop at every login, which stops being of use long before a few million messages.
MAX_MAILDROP_MESSAGES = 2_000_000
# Literal bytes one command may bring back when it asked for no message body (a folder
# name, a flag list, what a state record's TEXT is cut to): small.
MAX_OTHER_LITERAL_BYTES = 1 << 20
# Literal bytes one FETCH of whole messages of unknown size may bring back (the bodies that
# are read into memory: read-ahead of small messages, state records). A partial FETCH is
# bounded by the length it asked for instead, plus MAX_OTHER_LITERAL_BYTES.
MAX_BODY_FETCH_BYTES = 1 << 30


class UpstreamError(Exception):
    """The upstream failed or answered something we cannot use; POP3 says [SYS/TEMP]."""


class UpstreamImplausible(UpstreamError):
    """The upstream sent a number or size beyond the bounds above: no sane server does. The
    connection is dropped (never parked); the message names what was sent."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, or did not answer within the configured timeout."""


class UpstreamNotListening(UpstreamUnavailable):
    """Nothing accepts connections at the upstream address (e.g. a server restarting): worth
    retrying within the timeout (bridge.upstream.pool), unlike a server that answers "no"."""


class PreauthGreeting(UpstreamError):
    """The server greeted with PREAUTH: the connection is authenticated before any LOGIN.

    Refused by both engines. The bridge authenticates every POP3 user by logging in upstream
    with that user's password; on a pre-authenticated connection any password would do, and
    an on-path attacker answering `* PREAUTH` before STARTTLS would get no TLS and no LOGIN
    and could serve its own mail. A server fault, not the user's: POP3 says [SYS/TEMP]."""

    def __init__(self) -> None:
        super().__init__("connect: the server greeted with PREAUTH (already logged in); refused: "
                         "the bridge must log in as each POP3 user")


class AuthenticationFailed(Exception):
    """The upstream rejected the credentials; POP3 says [AUTH]."""


class MessageGone(Exception):
    """The message no longer exists upstream (another client expunged it)."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    size: int


class MailboxSnapshot:
    """The maildrop as it was when the session logged in, in UID order: UIDs and sizes as
    two columns, so a 5,000-message poll builds no object per message. Immutable; an engine
    may hand the same snapshot to every session while the mailbox stays unchanged, and what
    sessions derive from it can be kept with it (`memo`)."""

    __slots__ = ("_memo", "sizes", "uids", "uidvalidity")

    def __init__(self, uidvalidity: int, uids: Sequence[int], sizes: Sequence[int]) -> None:
        if len(uids) != len(sizes):
            raise ValueError("a snapshot needs one size per UID")
        self.uidvalidity = uidvalidity
        self.uids: tuple[int, ...] = tuple(uids)
        self.sizes: tuple[int, ...] = tuple(sizes)
        self._memo: dict[str, Any] = {}

    @classmethod
    def of(cls, uidvalidity: int, messages: Iterable[MessageInfo]) -> MailboxSnapshot:
        listed = list(messages)
        return cls(uidvalidity, [info.uid for info in listed], [info.size for info in listed])

    @property
    def messages(self) -> tuple[MessageInfo, ...]:
        return tuple(MessageInfo(uid, size) for uid, size in zip(self.uids, self.sizes, strict=True))

    def memo(self, key: str, compute: Callable[[], _T]) -> _T:
        """`compute()`, worked out once per snapshot whichever session asks."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MailboxSnapshot):
            return NotImplemented
        return (self.uidvalidity, self.uids, self.sizes) == (other.uidvalidity, other.uids, other.sizes)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MailboxSnapshot(uidvalidity={self.uidvalidity}, messages={len(self.uids)})"


class RangeReader(Protocol):
    async def next_piece(self) -> bytes:
        """The next piece of the range, b"" once it is all read. The first call raises
        MessageGone if the UID no longer exists, before any byte is returned."""
        ...


class UpstreamMailbox(Protocol):
    """One authenticated IMAP connection with the POP3 maildrop folder selected."""

    @property
    def capabilities(self) -> frozenset[str]: ...

    async def snapshot(self) -> MailboxSnapshot:
        """UIDs and sizes of the messages not flagged \\Deleted, in UID order."""
        ...

    async def fetch_range(self, uid: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the message as the server stores it, without
        setting \\Seen. Raises MessageGone if the UID no longer exists."""
        ...

    def open_range(self, uid: int, offset: int, length: int) -> AbstractAsyncContextManager[RangeReader]:
        """Bytes [offset, offset+length) of the message, read piece by piece as they arrive
        (one partial FETCH whose literal is never held whole: memory stays flat however big
        the message). The connection is this reader's until the context ends; leaving it
        before the last piece leaves the connection unusable (it is dropped, not parked)."""
        ...

    async def delete(self, uids: Sequence[int]) -> None:
        """Flag exactly these UIDs \\Deleted and expunge exactly these UIDs."""
        ...

    async def move(self, uids: Sequence[int], folder: str) -> None:
        """Move exactly these UIDs to `folder` (created if missing): MOVE, else COPY and
        delete as above."""
        ...

    async def add_flags(self, uids: Sequence[int], flags: str) -> None:
        """Add flags (e.g. "\\Seen") to exactly these UIDs of the maildrop."""
        ...

    async def ensure_folder(self, folder: str) -> None: ...

    async def append(self, folder: str, message: bytes) -> None: ...

    async def search(self, folder: str, *criteria: str) -> list[int]:
        """UID SEARCH in `folder`; criteria are IMAP search keys, strings already quoted."""
        ...

    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]:
        """The first TEXT_FETCH_LIMIT bytes of BODY[TEXT] of messages in `folder` (state
        records), by UID, without setting \\Seen; b"" for an empty text. UIDs that no longer
        exist are absent from the result."""
        ...

    async def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        """Whole small maildrop messages (BODY.PEEK[]) by UID, in one round trip; UIDs that
        no longer exist are absent from the result."""
        ...

    async def delete_in(self, folder: str, uids: Sequence[int]) -> None:
        """`delete` for another folder than the maildrop."""
        ...

    async def aclose(self) -> None:
        """Log out (best effort, bounded in time) and close the connection."""
        ...


class ChunkedRangeReader:
    """A `RangeReader` made of `fetch_range` calls, one partial FETCH of at most `chunk`
    bytes per piece: for an engine that cannot hand out a literal as it arrives."""

    def __init__(self, mailbox: UpstreamMailbox, uid: int, offset: int, length: int, chunk: int) -> None:
        self._mailbox = mailbox
        self._uid = uid
        self._offset = offset
        self._remaining = length
        self._chunk = chunk

    async def next_piece(self) -> bytes:
        if self._remaining <= 0:
            return b""
        data = await self._mailbox.fetch_range(self._uid, self._offset, min(self._chunk, self._remaining))
        # Fewer bytes than asked for: the message ends here.
        self._remaining = self._remaining - len(data) if len(data) == min(self._chunk, self._remaining) else 0
        self._offset += len(data)
        return data


def format_uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into an IMAP sequence set of ranges: 1:3,7,9:10."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("an IMAP UID set cannot be empty")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)


def chunked_uid_sets(uids: Iterable[int], max_length: int = 2000) -> list[str]:
    """Split a UID set so no command line grows past what servers accept (Dovecot: 64 KiB,
    others far less); each piece stays a valid, exact set."""
    text = format_uid_set(uids)
    pieces: list[str] = []
    while len(text) > max_length:
        cut = text.rfind(",", 0, max_length)
        pieces.append(text[:cut])
        text = text[cut + 1 :]
    pieces.append(text)
    return pieces
