"""ConnectionSlots (bridge.imap.capacity): at most `limit` connections open, room made by the
pool's `reclaim`, then a bounded wait. Time is Trio's mock clock; nothing here is timed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.imap.capacity import ConnectionSlots
from bridge.imap.errors import UpstreamUnavailable


async def test_slots_up_to_the_limit_then_room_is_made() -> None:
    limit = 2
    slots = ConnectionSlots(lambda: limit)
    reclaimed: list[int] = []

    def nothing() -> bool:
        return False

    await slots.acquire(nothing, trio.current_time() + 1)
    await slots.acquire(nothing, trio.current_time() + 1)
    assert slots.open == 2

    def close_one() -> bool:
        reclaimed.append(slots.open)
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, close_one, trio.current_time() + 10)
        await trio.testing.wait_all_tasks_blocked()
        # One connection is being closed to make room; the third waits for it, and asks for
        # no second one meanwhile.
        assert reclaimed == [2] and slots.open == 2 and slots.reclaiming == 1
        slots.release(reclaimed=True)
    assert slots.open == 2 and slots.reclaiming == 0


async def test_with_nothing_to_close_the_wait_ends_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = ConnectionSlots(lambda: 1)
    await slots.acquire(lambda: False, trio.current_time() + 1)
    started = trio.current_time()
    with pytest.raises(UpstreamUnavailable, match="pool.max_connections"):
        await slots.acquire(lambda: False, started + 30)
    assert trio.current_time() - started == pytest.approx(30)
    assert slots.open == 1


async def test_a_closed_connection_lets_a_waiter_in() -> None:
    slots = ConnectionSlots(lambda: 1)
    await slots.acquire(lambda: False, trio.current_time() + 1)
    got: list[bool] = []

    async def waiter() -> None:
        await slots.acquire(lambda: False, trio.current_time() + 60)
        got.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        slots.release()
    assert got == [True] and slots.open == 1


async def test_a_lower_limit_after_a_reload_is_reached_by_closing() -> None:
    limit = 3
    slots = ConnectionSlots(lambda: limit)
    for _ in range(3):
        await slots.acquire(lambda: False, trio.current_time() + 1)
    limit = 1
    asked: list[int] = []

    def close_one() -> bool:
        asked.append(1)
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, close_one, trio.current_time() + 10)
        await trio.testing.wait_all_tasks_blocked()
        # Three open against a limit of one: closing goes on until there is room.
        for _ in range(3):
            slots.release(reclaimed=True)
            await trio.testing.wait_all_tasks_blocked()
    assert slots.open == 1 and slots.reclaiming == 0 and len(asked) == 3


async def test_a_connection_that_becomes_reclaimable_lets_a_waiter_in() -> None:
    """Every connection busy, then one's session goes idle without closing it: the waiter
    must ask for room again (it waited out its timeout before)."""
    slots = ConnectionSlots(lambda: 1)
    await slots.acquire(lambda: False, trio.current_time() + 1)
    idle: list[bool] = []

    def reclaim() -> bool:
        return bool(idle)

    got: list[bool] = []

    async def waiter() -> None:
        await slots.acquire(reclaim, trio.current_time() + 60)
        got.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        idle.append(True)
        slots.wake()
        await trio.testing.wait_all_tasks_blocked()
        assert slots.reclaiming == 1 and got == []
        slots.release(reclaimed=True)
    assert got == [True]


async def test_waiters_short_of_a_slot_each_get_a_close_started_at_once() -> None:
    """Five logins find all five connections idle but open: five closes start together (one
    after the other made logins beyond the cap wait out their timeout under load)."""
    slots = ConnectionSlots(lambda: 5)
    for _ in range(5):
        await slots.acquire(lambda: False, trio.current_time() + 1)
    closes: list[int] = []

    def close_one() -> bool:
        closes.append(1)
        return True

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(slots.acquire, close_one, trio.current_time() + 10)
        await trio.testing.wait_all_tasks_blocked()
        assert len(closes) == 5 and slots.reclaiming == 5
        for _ in range(5):
            slots.release(reclaimed=True)
    assert slots.open == 5 and slots.reclaiming == 0 and len(closes) == 5


async def test_a_freed_slot_goes_to_the_longest_waiting() -> None:
    slots = ConnectionSlots(lambda: 1)
    await slots.acquire(lambda: False, trio.current_time() + 1)
    order: list[int] = []

    async def waiter(number: int) -> None:
        await slots.acquire(lambda: False, trio.current_time() + 60)
        order.append(number)

    async with trio.open_nursery() as nursery:
        for number in range(4):
            nursery.start_soon(waiter, number)
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(4):
            slots.release()
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3]


async def test_a_waiter_that_gives_up_lets_the_next_one_take_its_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slots = ConnectionSlots(lambda: 1)
    await slots.acquire(lambda: False, trio.current_time() + 1)
    got: list[str] = []

    async def impatient() -> None:
        with pytest.raises(UpstreamUnavailable):
            await slots.acquire(lambda: False, trio.current_time() + 5)
        got.append("gave up")

    async def patient() -> None:
        await slots.acquire(lambda: False, trio.current_time() + 60)
        got.append("in")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(patient)
        await trio.sleep(10)
        assert got == ["gave up"]
        slots.release()
    assert got == ["gave up", "in"] and slots.open == 1
