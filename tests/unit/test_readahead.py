"""The read-ahead's batching and its byte budget (bridge.session.readahead).

The store here is an in-memory stand-in that answers `fetch_messages` from a dict and records
each call: these tests are about which messages are asked for when and how many bytes are
held, which no server makes observable. Reading ahead from a real Dovecot, on both engines, is
tested in tests/integration/test_readahead.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from bridge.imap import MessageGone
from bridge.pop3 import Maildrop, MaildropEntry
from bridge.session.readahead import (
    BATCH_MESSAGES,
    FIRST_BATCH_MESSAGES,
    Readahead,
    ReadaheadBudget,
)


class MemoryStore:
    def __init__(self, bodies: dict[int, bytes]) -> None:
        self.bodies = bodies
        self.calls: list[list[int]] = []
        # A test may hold a FETCH until it says so.
        self.gate: trio.Event | None = None

    @asynccontextmanager
    async def using(self) -> AsyncIterator[MemoryStore]:
        yield self

    async def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        self.calls.append(list(uids))
        if self.gate is not None:
            await self.gate.wait()
        return {uid: self.bodies[uid] for uid in uids if uid in self.bodies}


def body(uid: int, size: int = 100) -> bytes:
    return (b"%d:" % uid).ljust(size, b"x")


def maildrop_of(sizes: list[int]) -> tuple[Maildrop, dict[int, bytes]]:
    bodies = {uid: body(uid, size) for uid, size in enumerate(sizes, start=1)}
    entries = [MaildropEntry(size=len(data), unique_id=f"u{uid}", ref=uid) for uid, data in bodies.items()]
    return Maildrop(entries), bodies


async def read_in_order(readahead: Readahead, maildrop: Maildrop, store: MemoryStore) -> list[bytes]:
    """What a client downloading every message in order gets: from the read-ahead, else the
    batch it starts, else the message alone (as the Retriever does)."""
    got = []
    for number in range(1, len(maildrop) + 1):
        entry = maildrop.lookup(number)
        assert isinstance(entry, MaildropEntry)
        data = readahead.take(entry.ref)
        if data is None:
            await readahead.settle()
            data = readahead.take(entry.ref)
        if data is None:
            data = await readahead.fetch_from(entry, number)
        if data is None:
            data = (await store.fetch_messages([entry.ref]))[entry.ref]
        got.append(data)
        await trio.testing.wait_all_tasks_blocked()
    return got


async def test_a_download_in_order_waits_for_one_small_batch_then_reads_ahead() -> None:
    maildrop, bodies = maildrop_of([100] * 600)
    store = MemoryStore(bodies)
    budget = ReadaheadBudget(1 << 30)
    async with trio.open_nursery() as background:
        readahead = Readahead(store, maildrop, 1 << 20, budget, background)
        got = await read_in_order(readahead, maildrop, store)
    assert got == [bodies[uid] for uid in range(1, 601)]
    # The client waited only for the first, small batch; every later batch was fetched
    # while it read the one before, and none of them asked for a message twice.
    assert store.calls[0] == list(range(1, FIRST_BATCH_MESSAGES + 1))
    assert max(len(call) for call in store.calls) == BATCH_MESSAGES
    asked = [uid for call in store.calls for uid in call]
    assert sorted(asked) == list(range(1, 601))
    readahead.close()
    assert budget.held == 0


async def test_marked_and_big_messages_are_not_read_ahead() -> None:
    chunk = 4096
    maildrop, bodies = maildrop_of([100, 100, 100, 2000, 100, 100])
    maildrop.mark_deleted(2)
    store = MemoryStore(bodies)
    async with trio.open_nursery() as background:
        readahead = Readahead(store, maildrop, chunk, ReadaheadBudget(1 << 20), background)
        first = maildrop.lookup(1)
        assert isinstance(first, MaildropEntry)
        assert await readahead.fetch_from(first, 1) == bodies[1]
        await trio.testing.wait_all_tasks_blocked()
    # Message 2 is marked; message 4 is bigger than a quarter of fetch_chunk, so the batch
    # stops before it.
    assert store.calls == [[1, 3]]


async def test_the_budget_bounds_what_all_sessions_hold_together() -> None:
    maildrop, bodies = maildrop_of([1000] * 100)
    budget = ReadaheadBudget(5000)
    async with trio.open_nursery() as background:
        store = MemoryStore(bodies)
        store.gate = trio.Event()
        readers = [Readahead(store, maildrop, 1 << 20, budget, background) for _ in range(3)]
        entry = maildrop.lookup(1)
        assert isinstance(entry, MaildropEntry)
        results: list[bytes | None] = []

        async def first_message(readahead: Readahead) -> None:
            results.append(await readahead.fetch_from(entry, 1))

        for readahead in readers:
            background.start_soon(first_message, readahead)
        await trio.testing.wait_all_tasks_blocked()
        # The first session took all five messages' worth; the others got nothing and were
        # told to fetch on their own.
        assert budget.held == 5000
        assert results == [None, None]
        store.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert results[-1] == bodies[1]
        assert budget.held <= 5000
        for readahead in readers:
            readahead.close()
        await readers[0].settle()
        for readahead in readers:
            readahead.close()
    assert budget.held == 0


async def test_a_message_of_another_size_than_listed_is_not_kept() -> None:
    """A server (or another writer) that sends something else than the listing said: the
    message is fetched again on its own, never passed on from the batch."""
    maildrop, bodies = maildrop_of([100] * 4)
    hostile = dict(bodies)
    hostile[1] = bodies[1] + b"appended"
    hostile[3] = b"short"
    store = MemoryStore(hostile)
    budget = ReadaheadBudget(1 << 20)
    async with trio.open_nursery() as background:
        readahead = Readahead(store, maildrop, 1 << 20, budget, background)
        first = maildrop.lookup(1)
        assert isinstance(first, MaildropEntry)
        assert await readahead.fetch_from(first, 1) is None
        assert readahead.take(2) == bodies[2]
        assert readahead.take(3) is None
        readahead.close()
    assert budget.held == 0


async def test_a_message_gone_from_the_server_is_reported() -> None:
    maildrop, bodies = maildrop_of([100] * 3)
    del bodies[1]
    store = MemoryStore(bodies)
    async with trio.open_nursery() as background:
        readahead = Readahead(store, maildrop, 1 << 20, ReadaheadBudget(1 << 20), background)
        first = maildrop.lookup(1)
        assert isinstance(first, MaildropEntry)
        with pytest.raises(MessageGone):
            await readahead.fetch_from(first, 1)
        assert readahead.take(2) == bodies[2]
        readahead.close()


async def test_a_batch_in_flight_gives_its_budget_back_when_cancelled() -> None:
    maildrop, bodies = maildrop_of([100] * 100)
    store = MemoryStore(bodies)
    budget = ReadaheadBudget(1 << 20)
    async with trio.open_nursery() as background:
        readahead = Readahead(store, maildrop, 1 << 20, budget, background)
        first = maildrop.lookup(1)
        assert isinstance(first, MaildropEntry)
        store.gate = trio.Event()
        fetched: list[bytes | None] = []

        async def fetch_first() -> None:
            fetched.append(await readahead.fetch_from(first, 1))

        background.start_soon(fetch_first)
        await trio.testing.wait_all_tasks_blocked()
        assert budget.held > 0
        background.cancel_scope.cancel()
    readahead.close()
    assert fetched == []
    assert budget.held == 0
