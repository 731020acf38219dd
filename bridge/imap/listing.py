"""The maildrop as the server numbers it, kept up to date from untagged responses (pure).

A connection that lists the maildrop once can answer the next session's snapshot from what
the server told it since (RFC 3501 EXISTS/EXPUNGE/FETCH, RFC 7162 VANISHED) instead of
listing every message again. `MaildropListing` is that knowledge: UID, size and \\Deleted by
sequence number, as three packed columns (a 200,000-message maildrop in a few MB, no object
per message). It never guesses: a sequence number it cannot place makes it
`consistent = False`, and the caller lists the maildrop afresh.

While nothing changes, `snapshot()` hands out the same snapshot (and `complete()` its earlier
answer): a warm poll of an unchanged 5,000-message maildrop then reuses what the previous
session built from it (`MailboxSnapshot.derived`).
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections.abc import Iterable

from bridge.imap.errors import UpstreamImplausible
from bridge.imap.limits import MAX_MAILDROP_MESSAGES, MAX_MESSAGE_SIZE, MAX_UID
from bridge.imap.snapshot import MailboxSnapshot

# Column values for what is not known yet: UID 0 (a message announced by EXISTS), size -1.
_UNKNOWN_UID = 0
_UNKNOWN_SIZE = -1
# bytes.translate table that turns the \Deleted column into a "keep" mask.
_KEEP = bytes([1, 0]) + bytes(254)


class MaildropListing:
    """`uids`, `sizes` and `deleted` by sequence number (index 0 is message 1)."""

    def __init__(self) -> None:
        self.uids = array("I")
        self.sizes = array("q")
        self.deleted = bytearray()
        # False once the server's numbering and ours disagreed: only a full listing helps.
        self.consistent = True
        self._snapshot: MailboxSnapshot | None = None
        self._complete: bool | None = None

    def __len__(self) -> int:
        """Messages the server numbers (what EXISTS said, less what was expunged since)."""
        return len(self.uids)

    def _changed(self) -> None:
        self._snapshot = None
        self._complete = None

    def exists(self, count: int) -> None:
        if count > MAX_MAILDROP_MESSAGES:
            raise UpstreamImplausible(f"EXISTS {count}: more than {MAX_MAILDROP_MESSAGES} messages")
        more = count - len(self.uids)
        if more > 0:
            self.uids.extend(array("I", bytes(self.uids.itemsize * more)))
            self.sizes.extend(array("q", [_UNKNOWN_SIZE]) * more)
            self.deleted.extend(bytes(more))
            self._changed()

    def expunge(self, number: int) -> None:
        self._changed()
        if not 1 <= number <= len(self.uids):
            self.consistent = False
            return
        index = number - 1
        del self.uids[index], self.sizes[index], self.deleted[index]

    def vanish(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Forget the UIDs in `ranges` (low, high), however wide: only UIDs listed here are
        looked at, never every UID a range spans."""
        uids = self.uids
        spans = sorted(ranges)
        if not spans:
            return
        if _UNKNOWN_UID in uids:
            # Not every UID is known yet, so the column may not be in order: one pass over it.
            lows, highs = _merged(spans)
            gone = [
                index for index, uid in enumerate(uids)
                if (at := bisect.bisect_right(lows, uid) - 1) >= 0 and uid <= highs[at]
            ]
        else:
            # A server numbers UIDs in ascending order: each range is found by bisection.
            gone = []
            for low, high in spans:
                gone.extend(range(bisect.bisect_left(uids, low), bisect.bisect_right(uids, high)))
        if gone:
            self._changed()
            self._keep_all_but(set(gone))

    def _keep_all_but(self, gone: set[int]) -> None:
        keep = bytes(index not in gone for index in range(len(self.uids)))
        self.uids = array("I", itertools.compress(self.uids, keep))
        self.sizes = array("q", itertools.compress(self.sizes, keep))
        self.deleted = bytearray(itertools.compress(self.deleted, keep))

    def fetched(self, number: int, uid: int | None, size: int | None, deleted: bool | None) -> None:
        """A FETCH response for sequence number `number`: what it says (None: not said)."""
        if number > MAX_MAILDROP_MESSAGES:
            raise UpstreamImplausible(f"FETCH of sequence number {number}: more than {MAX_MAILDROP_MESSAGES} messages")
        if uid is not None and not 0 < uid <= MAX_UID:
            raise UpstreamImplausible(f"FETCH of UID {uid}: not a UID")
        if size is not None and not 0 <= size <= MAX_MESSAGE_SIZE:
            raise UpstreamImplausible(f"RFC822.SIZE {size}: not a message size")
        uids = self.uids
        if number > len(uids):
            self.exists(number)
        index = number - 1
        known = uids[index]
        changed = False
        if uid is None:
            if known == _UNKNOWN_UID:
                return  # a flag update for a message whose UID we do not know yet
        elif known != uid:
            changed = True
            if known != _UNKNOWN_UID:
                self.consistent = False
            uids[index] = uid
            self.sizes[index] = _UNKNOWN_SIZE
            self.deleted[index] = 0
        if size is not None and size != self.sizes[index]:
            self.sizes[index] = size
            changed = True
        if deleted is not None and deleted != self.deleted[index]:
            self.deleted[index] = deleted
            changed = True
        if changed:
            self._snapshot = self._complete = None

    def complete(self) -> bool:
        """Every message the server numbers is known with its size."""
        if self._complete is None:
            self._complete = _UNKNOWN_UID not in self.uids and _UNKNOWN_SIZE not in self.sizes
        return self._complete

    def first_missing(self) -> int | None:
        """The sequence number of the first message not listed yet (None: all are)."""
        first = min(_find(self.uids, _UNKNOWN_UID), _find(self.sizes, _UNKNOWN_SIZE))
        return None if first == len(self.uids) else first + 1

    def highest_uid(self) -> int:
        return max(self.uids, default=0)

    def snapshot(self, uidvalidity: int) -> MailboxSnapshot:
        """The messages not flagged \\Deleted, in UID order. Raises UpstreamImplausible if
        the server listed a UID twice."""
        cached = self._snapshot
        if cached is not None and cached.uidvalidity == uidvalidity:
            return cached
        keep = bytes(self.deleted).translate(_KEEP)
        uids = array("I", itertools.compress(self.uids, keep))
        sizes = array("q", itertools.compress(self.sizes, keep))
        try:
            self._snapshot = MailboxSnapshot(uidvalidity, uids, sizes)
        except ValueError:
            # Servers number UIDs in ascending order; one that does not is put in order, one
            # that gives two messages the same UID is refused.
            order = sorted(range(len(uids)), key=uids.__getitem__)
            uids = array("I", (uids[index] for index in order))
            sizes = array("q", (sizes[index] for index in order))
            try:
                self._snapshot = MailboxSnapshot(uidvalidity, uids, sizes)
            except ValueError:
                raise UpstreamImplausible("listing: the same UID for two messages") from None
        return self._snapshot


def _merged(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted (low, high) spans merged into disjoint ones, as lows and highs."""
    lows: list[int] = []
    highs: list[int] = []
    for low, high in spans:
        if highs and low <= highs[-1] + 1:
            highs[-1] = max(highs[-1], high)
        else:
            lows.append(low)
            highs.append(high)
    return lows, highs


def _find(column: array[int], value: int) -> int:
    """The index of the first `value` in `column`, or its length."""
    try:
        return column.index(value)
    except ValueError:
        return len(column)
