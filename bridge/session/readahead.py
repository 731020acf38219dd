"""Read-ahead for a client downloading small messages in order (1, 2, 3, ...).

Waiting for the upstream once per message is what makes a download of a thousand small
messages slow. A client reading in order gets the next small messages fetched in one batched
FETCH (at most `BATCH_MESSAGES` of them and `upstream.fetch_chunk` bytes); while it reads those,
the batch after them is fetched in the background, so the client seldom waits for the
upstream at all.

The bytes held are bounded twice: per session (two batches: the one being read and the next)
and per process (`upstream.readahead_max_bytes`, shared by every session through
`ReadaheadBudget`), so ten thousand sessions downloading at once hold no more than that. A
session that gets no budget simply reads without read-ahead.
"""

from __future__ import annotations

import trio

from bridge.imap import MessageGone, UpstreamError
from bridge.ops.logs import get_logger
from bridge.pop3 import Maildrop, MaildropEntry
from bridge.session.upstream import StoreAccess

_log = get_logger()
# At most this many messages are fetched in one read-ahead round trip; the first batch, which
# the client waits for, is kept small, and the next one is fetched while it reads that.
BATCH_MESSAGES = 256
FIRST_BATCH_MESSAGES = 16


class ReadaheadBudget:
    """The bytes of read-ahead all sessions of a process may hold at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, wanted: int) -> int:
        """Up to `wanted` bytes (maybe 0); the caller gives back what it took."""
        granted = max(0, min(wanted, self.limit - self.held))
        self.held += granted
        return granted

    def give_back(self, amount: int) -> None:
        self.held -= amount


class Readahead:
    """One session's read-ahead: whole small messages by UID, taken from the budget."""

    def __init__(
        self, upstream: StoreAccess, maildrop: Maildrop, chunk: int, budget: ReadaheadBudget,
        background: trio.Nursery,
    ) -> None:
        self._upstream = upstream
        self._maildrop = maildrop
        self._chunk = chunk
        self._budget = budget
        self._background = background
        self._messages: dict[int, bytes] = {}
        # Budget bytes this session holds: messages in hand plus a batch in flight.
        self._held = 0
        # The message number after the last one fetched or being fetched.
        self._next = 0
        self._in_flight: trio.Event | None = None

    def take(self, uid: int) -> bytes | None:
        """The message, if it is in hand; taking one may start the next batch's FETCH."""
        data = self._messages.pop(uid, None)
        if data is not None:
            self._release(len(data))
            if self._in_flight is None and len(self._messages) <= BATCH_MESSAGES // 4:
                self._start_next()
        return data

    def take_number(self, number: int) -> bytes | None:
        """Message `number`, if it is in hand (as `take`)."""
        found = self._maildrop.lookup(number)
        return self.take(found.ref) if isinstance(found, MaildropEntry) else None

    def hold(self, size: int) -> bool:
        """`size` more bytes of the budget for this session (a reply made in advance), all
        or none; the session gives them back with `let_go`."""
        granted = self._budget.take(size)
        if granted < size:
            self._budget.give_back(granted)
            return False
        self._held += size
        return True

    def let_go(self, size: int) -> None:
        self._release(size)

    async def settle(self) -> None:
        """Wait for a batch in flight (its own FETCH is bounded by the upstream timeout)."""
        if self._in_flight is not None:
            await self._in_flight.wait()

    async def fetch_from(self, entry: MaildropEntry, number: int) -> bytes | None:
        """`entry` (message `number`) and the small messages after it in one FETCH, the rest
        kept; then the batch after them is fetched in the background. None: `entry` is not
        small, no budget is left, or the server sent it in another size than listed (the
        caller fetches it alone). Raises MessageGone."""
        self.drop()
        batch, granted = self._batch(number, FIRST_BATCH_MESSAGES)
        if len(batch) < 2 or batch[0] != (entry.ref, entry.size):
            self._release(granted)
            return None
        arrived = await self._fetch(batch, granted)
        data = self.take(entry.ref)
        if data is None and entry.ref not in arrived:
            raise MessageGone(f"UID {entry.ref} no longer exists")
        return data

    def drop(self) -> None:
        """Forget the messages in hand (the client left the order): their budget goes back.
        A batch in flight keeps its own until it lands."""
        for data in self._messages.values():
            self._release(len(data))
        self._messages.clear()

    def close(self) -> None:
        """The session is over: everything it holds goes back to the budget."""
        self.drop()

    # -- inside -----------------------------------------------------------------------------------

    def _batch(self, number: int, most: int) -> tuple[list[tuple[int, int]], int]:
        """(ref, size) of the messages from `number` on that are small and not marked, at
        most `most` of them and `upstream.fetch_chunk` bytes, within what the process's
        budget grants; the budget taken is returned with them (and held by this session from
        now on)."""
        maildrop = self._maildrop
        small = self._chunk // 4
        batch: list[tuple[int, int, int]] = []
        total = 0
        while len(batch) < most and number <= len(maildrop):
            found = maildrop.size_and_ref(number)
            if found is not None:
                size, ref = found
                if size > small or total + size > self._chunk:
                    break
                batch.append((number, ref, size))
                total += size
            number += 1
        granted = self._budget.take(total)
        while batch and total > granted:
            number, _ref, size = batch.pop()
            total -= size
        self._budget.give_back(granted - total)
        self._held += total
        self._next = number
        return [(ref, size) for _number, ref, size in batch], total

    async def _fetch(self, batch: list[tuple[int, int]], granted: int) -> set[int]:
        """One FETCH of `batch` ((ref, size) pairs, `granted` bytes of budget held for it);
        keeps what arrived whole, gives back the rest, and returns the UIDs that arrived at
        all."""
        try:
            async with self._upstream.using() as store:
                found = await store.fetch_messages([ref for ref, _size in batch])
        except BaseException:
            self._release(granted)
            raise
        kept = 0
        for ref, size in batch:
            data = found.get(ref)
            # What the server sends is checked against the listing: a message of another size
            # than listed is left out (the client's RETR fetches it on its own).
            if data is not None and len(data) == size:
                self._messages[ref] = data
                kept += len(data)
        self._release(granted - kept)
        return set(found)

    def _start_next(self) -> None:
        if self._next == 0 or self._next > len(self._maildrop):
            return
        batch, granted = self._batch(self._next, BATCH_MESSAGES)
        if not batch:
            self._release(granted)
            return
        done = self._in_flight = trio.Event()
        self._background.start_soon(self._fetch_in_background, batch, granted, done)

    async def _fetch_in_background(self, batch: list[tuple[int, int]], granted: int, done: trio.Event) -> None:
        try:
            await self._fetch(batch, granted)
        except UpstreamError as exc:
            # The connection is closed already; the client's next RETR reports it.
            _log.info("readahead_failed", error=str(exc))
        finally:
            self._in_flight = None
            done.set()

    def _release(self, amount: int) -> None:
        self._held -= amount
        self._budget.give_back(amount)
