"""The service-wide watchdog that ends sessions' waits for their clients
(bridge.net.client_timeouts), on Trio's autojump clock: what a session would see, a wait that
ends exactly when its time is up (within one tick), and never before."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from bridge.config import BridgeSettings
from bridge.net.client_timeouts import ClientWait, ClientWatchdog, watchdog_tick


async def _wait_forever(wait: ClientWait, seconds: float, ended: list[float]) -> None:
    with wait.scope:
        wait.due = trio.current_time() + seconds
        await trio.sleep_forever()
    ended.append(trio.current_time())


@pytest.fixture
def autojump() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_a_wait_is_cancelled_once_due_and_not_before(autojump: trio.testing.MockClock) -> None:
    async def main() -> None:
        watchdog = ClientWatchdog()
        short, long = ClientWait(), ClientWait()
        watchdog.add(short)
        watchdog.add(long)
        ended_short: list[float] = []
        ended_long: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.run, lambda: 0.5)
            nursery.start_soon(_wait_forever, short, 600.0, ended_short)
            nursery.start_soon(_wait_forever, long, 1800.0, ended_long)
            await trio.sleep(2000)
            nursery.cancel_scope.cancel()
        assert 600.0 <= ended_short[0] <= 600.5
        assert 1800.0 <= ended_long[0] <= 1800.5

    trio.run(main, clock=autojump)


def test_a_session_between_waits_is_never_cancelled(autojump: trio.testing.MockClock) -> None:
    async def main() -> None:
        watchdog = ClientWatchdog()
        wait = ClientWait()
        watchdog.add(wait)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.run, lambda: 0.1)
            with wait.scope:
                # Busy with the upstream (no wait for the client): due stays infinite.
                assert wait.due == math.inf
                await trio.sleep(10_000)
            assert not wait.scope.cancelled_caught
            nursery.cancel_scope.cancel()

    trio.run(main, clock=autojump)


async def test_a_discarded_wait_is_left_alone() -> None:
    watchdog = ClientWatchdog()
    wait = ClientWait()
    watchdog.add(wait)
    wait.due = 5.0
    watchdog.discard(wait)
    assert watchdog.expire(10.0) == 0
    assert not wait.scope.cancel_called


async def test_expire_cancels_exactly_the_waits_due() -> None:
    watchdog = ClientWatchdog()
    due, later, idle = ClientWait(), ClientWait(), ClientWait()
    due.due, later.due = 10.0, 10.5
    for wait in (due, later, idle):
        watchdog.add(wait)
    assert watchdog.expire(10.0) == 1
    assert due.scope.cancel_called
    assert not later.scope.cancel_called and not idle.scope.cancel_called


@pytest.mark.parametrize(
    ("pop3", "tick"),
    [
        ({}, 1.0),  # defaults: autologout 600 s, send timeout 120 s
        ({"send_timeout_seconds": 1}, 0.1),
        ({"send_timeout_seconds": 0.1}, 0.05),
        ({"session_timeout_seconds": 2}, 0.2),
        ({"session_timeout_seconds": 0}, 1.0),  # 0: no session limit
    ],
)
def test_the_tick_is_a_tenth_of_the_shortest_timeout(pop3: dict[str, float], tick: float) -> None:
    assert watchdog_tick(BridgeSettings(pop3=pop3)) == pytest.approx(tick)
