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
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Maildrop", "MaildropEntry", "Unavailable"]

# RFC 1939 section 7 (UIDL): 1 to 70 characters in the range 0x21 to 0x7E. A regex, because
# every message of every login is checked (a 5,000-message maildrop on each poll).
_UNIQUE_ID = re.compile(r"[\x21-\x7e]{1,70}")


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


class Maildrop:
    def __init__(self, entries: Iterable[MaildropEntry]) -> None:
        self._entries: tuple[MaildropEntry, ...] = tuple(entries)
        if len({entry.unique_id for entry in self._entries}) != len(self._entries):
            raise ValueError("unique ids must differ between the messages of a maildrop")
        self._marked: set[int] = set()  # list positions, not message numbers
        # STAT, LIST and UIDL of one poll all walk the not-marked messages; DELE and RSET
        # are the only things that change which they are.
        self._live_cache: list[tuple[int, MaildropEntry]] | None = None

    def __len__(self) -> int:
        """All messages, marked ones included (the highest valid number)."""
        return len(self._entries)

    def _index(self, number: int) -> int | None:
        if 1 <= number <= len(self._entries):
            return number - 1
        return None

    @staticmethod
    def _number(index: int) -> int:
        return index + 1

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
        return index if isinstance(index, Unavailable) else self._entries[index]

    def _live(self) -> list[tuple[int, MaildropEntry]]:
        if self._live_cache is None:
            marked = self._marked
            self._live_cache = [
                (self._number(index), entry)
                for index, entry in enumerate(self._entries)
                if index not in marked
            ]
        return self._live_cache

    def stat(self) -> tuple[int, int]:
        """(count, octets) of the messages not marked as deleted."""
        live = self._live()
        return len(live), sum(entry.size for _, entry in live)

    def scan_listing(self) -> list[tuple[int, int]]:
        """(number, size) for each message not marked as deleted."""
        return [(number, entry.size) for number, entry in self._live()]

    def unique_id_listing(self) -> list[tuple[int, str]]:
        """(number, unique id) for each message not marked as deleted."""
        return [(number, entry.unique_id) for number, entry in self._live()]

    def mark_deleted(self, number: int) -> MaildropEntry | Unavailable:
        """Mark a message; returns its entry, or why it could not be marked."""
        index = self._locate(number)
        if isinstance(index, Unavailable):
            return index
        self._marked.add(index)
        self._live_cache = None
        return self._entries[index]

    def reset(self) -> None:
        """Unmark every message (RSET)."""
        self._marked.clear()
        self._live_cache = None

    def marked(self) -> tuple[MaildropEntry, ...]:
        """The marked entries, in maildrop order."""
        return tuple(entry for index, entry in enumerate(self._entries) if index in self._marked)
