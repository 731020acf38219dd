"""The maildrop as the server numbers it, kept up to date from untagged responses (pure).

A connection that lists the maildrop once can answer the next session's snapshot from what
the server told it since (RFC 3501 EXISTS/EXPUNGE/FETCH, RFC 7162 VANISHED) instead of
listing every message again. `MaildropListing` is that knowledge: UIDs by sequence number,
and size and \\Deleted by UID. It never guesses: a sequence number it cannot place makes it
`consistent = False`, and the caller lists the maildrop afresh.

While nothing changes, `snapshot()` hands out the same snapshot (and `complete()` its earlier
answer): a warm poll of an unchanged 5,000-message maildrop then reuses what the previous
session built from it (`MailboxSnapshot.derived`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from bridge.imap.errors import UpstreamImplausible
from bridge.imap.limits import MAX_MAILDROP_MESSAGES
from bridge.imap.snapshot import MailboxSnapshot

# A VANISHED range this narrow is looked up UID by UID; a wider one by bisecting the known UIDs.
_NARROW_RANGE = 64


class MaildropListing:
    """`None` in `by_sequence` stands for a message announced by EXISTS whose UID is not
    known yet."""

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
        """A FETCH response for sequence number `number`: what it says (None: not said)."""
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
        """Every message the server numbers is known with its size."""
        if self._complete is None:
            self._complete = all(uid is not None and uid in self.info for uid in self.by_sequence)
        return self._complete

    def first_missing(self) -> int | None:
        """The sequence number of the first message not listed yet (None: all are)."""
        for number, uid in enumerate(self.by_sequence, 1):
            if uid is None or uid not in self.info:
                return number
        return None

    def highest_uid(self) -> int:
        return max((uid for uid in self.by_sequence if uid is not None), default=0)

    def snapshot(self, uidvalidity: int) -> MailboxSnapshot:
        """The messages not flagged \\Deleted, in UID order."""
        cached = self._snapshot
        if cached is not None and cached.uidvalidity == uidvalidity:
            return cached
        info = self.info
        uids = sorted(uid for uid, (_size, deleted) in info.items() if not deleted)
        self._snapshot = MailboxSnapshot(uidvalidity, uids, [info[uid][0] for uid in uids])
        return self._snapshot
