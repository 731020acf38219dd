"""The maildrop as one POP3 session sees it (RFC 1939 section 5 and 6).

The list of messages is fixed when the session enters TRANSACTION; DELE only
marks, RSET unmarks, and the marks are applied by the I/O layer at QUIT.

Message numbers on the wire are 1-based.  `_index` and `_number` are the only
places that translate between them and list positions; every other piece of
the core passes the client's number around unchanged.
"""

from __future__ import annotations

import enum
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Maildrop", "MaildropEntry", "MessageList", "Unavailable"]

# RFC 1939 section 7 (UIDL): 1 to 70 characters in the range 0x21 to 0x7E. A regex, because
# every message of every login is checked (a 5,000-message maildrop on each poll).
_UNIQUE_ID = re.compile(r"[\x21-\x7e]{1,70}")
_UNIQUE_IDS = re.compile(r"[\x21-\x7e]{1,70}(?:\n[\x21-\x7e]{1,70})*")
# Lines per piece of a listing made for one session (about 100 KiB of UIDL lines).
_CHUNK_LINES = 4096


@dataclass(frozen=True, slots=True)
class MaildropEntry:
    """One message: its size in octets, its UIDL string, and ``ref``, an
    opaque handle for the I/O layer (an IMAP UID, say) that the core never
    interprets."""

    size: int
    unique_id: str
    ref: int

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("message size must not be negative")
        # The unique id goes on the wire verbatim, so an invalid one would
        # break (or inject into) the UIDL response instead of just looking odd.
        if _UNIQUE_ID.fullmatch(self.unique_id) is None:
            raise ValueError("unique id must be 1 to 70 characters from 0x21 to 0x7E")


class Unavailable(enum.Enum):
    """Why a message number cannot be used."""

    NO_SUCH_MESSAGE = "no such message"
    DELETED = "already deleted"


class MessageList:
    """A maildrop's messages, fixed: sizes, UIDL strings and I/O refs as three columns,
    checked once. Immutable, so sessions that see the same mailbox state can share one, with
    the STAT figures and the LIST and UIDL lines built from it (a device polling an
    unchanged 5,000-message maildrop every few minutes gets them without a rebuild).

    Sizes and refs are kept packed (`array`); `unique_ids` may be any sequence, e.g. one that
    formats each id when asked instead of holding 200,000 strings. `checked=True` says the
    caller made the ids itself in a form RFC 1939 allows and that they differ (formatted
    from distinct UIDs, say), so they are not checked again here; otherwise they are."""

    __slots__ = ("_lines", "octets", "refs", "sizes", "unique_ids")

    def __init__(
        self, sizes: Sequence[int], unique_ids: Sequence[str], refs: Sequence[int], *, checked: bool = False
    ) -> None:
        if not len(sizes) == len(unique_ids) == len(refs):
            raise ValueError("every message needs a size, a unique id and a ref")
        self.sizes = _packed(sizes)
        if self.sizes and min(self.sizes) < 0:
            raise ValueError("message size must not be negative")
        if not checked:
            unique_ids = tuple(unique_ids)
            # One pass over all of them, not a regex match per message (the count: no id
            # may hide a line break of its own).
            joined = "\n".join(unique_ids)
            if unique_ids and (joined.count("\n") != len(unique_ids) - 1 or _UNIQUE_IDS.fullmatch(joined) is None):
                raise ValueError("unique id must be 1 to 70 characters from 0x21 to 0x7E")
            if len(set(unique_ids)) != len(unique_ids):
                raise ValueError("unique ids must differ between the messages of a maildrop")
        self.unique_ids: Sequence[str] = unique_ids
        self.refs = _packed(refs)
        self.octets = sum(self.sizes)
        self._lines: dict[bool, bytes] = {}

    @classmethod
    def of(cls, entries: Iterable[MaildropEntry]) -> MessageList:
        listed = list(entries)
        return cls([e.size for e in listed], [e.unique_id for e in listed], [e.ref for e in listed])

    def __len__(self) -> int:
        return len(self.sizes)

    def all_lines(self, unique_ids: bool) -> bytes:
        """``n size`` (LIST) or ``n unique-id`` (UIDL) for every message, CRLF-terminated."""
        if unique_ids not in self._lines:
            self._lines[unique_ids] = _listing_lines(
                range(1, len(self.sizes) + 1), self.unique_ids if unique_ids else self.sizes
            )
        return self._lines[unique_ids]


def _packed(values: Sequence[int]) -> array[int]:
    """64-bit integers as one packed column (arrays of that type are taken as they are)."""
    if isinstance(values, array) and values.typecode == "q":
        return values
    return array("q", values)


def _checked_entry(size: int, unique_id: str, ref: int) -> MaildropEntry:
    """A MaildropEntry from a MessageList's columns, which were checked when the list was
    made: not checked again (each RETR of a download makes one, and the check took more than
    half of making it)."""
    entry = object.__new__(MaildropEntry)
    object.__setattr__(entry, "size", size)
    object.__setattr__(entry, "unique_id", unique_id)
    object.__setattr__(entry, "ref", ref)
    return entry


def _listing_lines(numbers: Iterable[int], values: Iterable[object]) -> bytes:
    # Numbers and checked unique ids: printable ASCII, and no line starts with a dot, so
    # nothing needs stuffing.
    return "".join([f"{number} {value}\r\n" for number, value in zip(numbers, values, strict=True)]).encode("ascii")


class Maildrop:
    def __init__(self, messages: MessageList | Iterable[MaildropEntry]) -> None:
        # Entries are made when a command names their message (RETR, DELE, ...), not for all:
        # by list position.
        self._entries: dict[int, MaildropEntry]
        if isinstance(messages, MessageList):
            self._messages = messages
            self._entries = {}
        else:
            listed = list(messages)
            self._messages = MessageList.of(listed)
            self._entries = dict(enumerate(listed))
        self._count = len(self._messages)
        self._marked: set[int] = set()  # list positions, not message numbers

    def __len__(self) -> int:
        """All messages, marked ones included (the highest valid number)."""
        return self._count

    def _index(self, number: int) -> int | None:
        if 1 <= number <= self._count:
            return number - 1
        return None

    @staticmethod
    def _number(index: int) -> int:
        return index + 1

    def _entry(self, index: int) -> MaildropEntry:
        entry = self._entries.get(index)
        if entry is None:
            messages = self._messages
            entry = _checked_entry(messages.sizes[index], messages.unique_ids[index], messages.refs[index])
            self._entries[index] = entry
        return entry

    def _locate(self, number: int) -> int | Unavailable:
        index = self._index(number)
        if index is None:
            return Unavailable.NO_SUCH_MESSAGE
        if index in self._marked:
            return Unavailable.DELETED
        return index

    def lookup(self, number: int) -> MaildropEntry | Unavailable:
        """The entry for a client-supplied message number, if it may be used."""
        index = self._locate(number)
        return index if isinstance(index, Unavailable) else self._entry(index)

    def size_and_ref(self, number: int) -> tuple[int, int] | None:
        """Size and ref of message `number` if `lookup` would give its entry, without making
        the entry: the read-ahead walks hundreds of messages at once, in the middle of a
        download, and their entries are made one at a time later, as the client asks."""
        index = self._locate(number)
        if isinstance(index, Unavailable):
            return None
        messages = self._messages
        return messages.sizes[index], messages.refs[index]

    def _live(self) -> list[int]:
        marked = self._marked
        return [index for index in range(self._count) if index not in marked]

    def stat(self) -> tuple[int, int]:
        """(count, octets) of the messages not marked as deleted."""
        sizes = self._messages.sizes
        if not self._marked:
            return len(sizes), self._messages.octets
        live = self._live()
        return len(live), sum(sizes[index] for index in live)

    def listing_lines(self, unique_ids: bool) -> bytes:
        """The body of LIST (``n size``) or UIDL (``n unique-id``) without arguments: one
        CRLF-terminated line per message not marked as deleted."""
        return b"".join(self.listing_pieces(unique_ids))

    def listing_pieces(self, unique_ids: bool) -> Iterator[bytes]:
        """The same body in pieces: without DELE marks the lines every session of this
        maildrop shares, as they are; with marks, made `_CHUNK_LINES` lines at a time as the
        pieces are taken (a huge maildrop's listing is never built whole per session)."""
        messages = self._messages
        if not self._marked:
            yield messages.all_lines(unique_ids)
            return
        live = self._live()
        column = messages.unique_ids if unique_ids else messages.sizes
        for start in range(0, len(live), _CHUNK_LINES):
            chunk = live[start : start + _CHUNK_LINES]
            yield _listing_lines((self._number(index) for index in chunk), (column[index] for index in chunk))

    def mark_deleted(self, number: int) -> MaildropEntry | Unavailable:
        """Mark a message; returns its entry, or why it could not be marked."""
        index = self._locate(number)
        if isinstance(index, Unavailable):
            return index
        self._marked.add(index)
        return self._entry(index)

    def reset(self) -> None:
        """Unmark every message (RSET)."""
        self._marked.clear()

    def marked(self) -> tuple[MaildropEntry, ...]:
        """The marked entries, in maildrop order."""
        return tuple(self._entry(index) for index in sorted(self._marked))
