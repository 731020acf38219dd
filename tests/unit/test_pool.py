"""The connection pool's bookkeeping on Trio's MockClock: which session gets which parked
connection, and when a parked connection must not serve another session.

The integration tests (tests/integration/test_pool.py) run the pool against Dovecot. Here the
connections are a small stand-in (`Connection`), because the orders of events these tests
need (a connection breaking exactly while it is being claimed, hours passing) cannot be
produced with a real server on demand.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

from bridge.config import BridgeSettings, UpstreamSettings, load_settings
from bridge.imap.channel import StopSignal
from bridge.imap.errors import AuthenticationFailed, UpstreamUnavailable
from bridge.imap.lease import Lease
from bridge.imap.pool import UpstreamPool

ACCOUNT = "alice@example.com"
OLD, NEW = "old password", "new password"
_numbers = itertools.count(1)


class Connection:
    """A logged-in upstream connection as the pool sees it. `break_when_claimed`: its keeper
    takes a while to hand it over, then finds it broken (a server that went away meanwhile)."""

    def __init__(self, password: str, *, break_when_claimed: bool = False) -> None:
        self.number = next(_numbers)
        self.password = password
        self.break_when_claimed = break_when_claimed
        self.usable = True
        self.closed = False
        self.capabilities: frozenset[str] = frozenset()

    async def keep_alive(self, stop: StopSignal, interval: float) -> None:
        await stop.wait()
        if self.break_when_claimed:
            await trio.sleep(1)
            self.usable = False
            raise UpstreamUnavailable("idle: connection lost")

    async def aclose(self) -> None:
        self.usable = False
        self.closed = True

    def __repr__(self) -> str:
        return f"Connection({self.number}, {self.password!r})"


class Upstream:
    """The opener: a fresh connection per login, refused for a wrong password."""

    def __init__(self, password: str = OLD) -> None:
        self.password = password
        self.opened: list[Connection] = []
        self.break_next_when_claimed = False

    async def open(self, settings: UpstreamSettings, account: str, password: str) -> Any:
        if password != self.password:
            raise AuthenticationFailed("no")
        connection = Connection(password, break_when_claimed=self.break_next_when_claimed)
        self.break_next_when_claimed = False
        self.opened.append(connection)
        return connection


def settings(**sections: dict[str, Any]) -> BridgeSettings:
    return load_settings(None, {"pool": {"max_age_seconds": 300, "park_seconds": 1200}, **sections})


class Rig:
    def __init__(self, upstream: Upstream, current: list[BridgeSettings]) -> None:
        self.upstream = upstream
        self.current = current
        self.pool = UpstreamPool(lambda: current[0], upstream.open)

    async def poll(self, password: str) -> Connection:
        """One session: check a connection out, hand it back."""
        lease = await self.pool.checkout(ACCOUNT, password)
        connection = lease.mailbox
        await lease.release()
        await trio.testing.wait_all_tasks_blocked()
        return connection  # type: ignore[return-value]


async def with_pool(test: Any, **sections: dict[str, Any]) -> None:
    upstream = Upstream()
    current = [settings(**sections)]
    rig = Rig(upstream, current)
    async with rig.pool.running():
        await test(rig)


async def test_a_parked_connection_is_handed_over_within_its_age(autojump_clock: trio.testing.MockClock) -> None:
    async def test(rig: Rig) -> None:
        first = await rig.poll(OLD)
        await trio.sleep(120)
        assert await rig.poll(OLD) is first
        await trio.sleep(120)
        assert await rig.poll(OLD) is first

    await with_pool(test)


async def test_no_connection_serves_past_its_maximum_age(autojump_clock: trio.testing.MockClock) -> None:
    """Polls more often than park_seconds kept one connection, and its password, forever;
    the age counts from the upstream login, not from the last use."""

    async def test(rig: Rig) -> None:
        first = await rig.poll(OLD)
        for _ in range(4):
            await trio.sleep(60)
            assert await rig.poll(OLD) is first  # 240 s after its login
        await trio.sleep(61)  # 301 s
        second = await rig.poll(OLD)
        assert second is not first and first.closed
        assert len(rig.upstream.opened) == 2

    await with_pool(test)


async def test_a_connection_reaching_its_age_while_parked_is_logged_out(autojump_clock: trio.testing.MockClock) -> None:
    async def test(rig: Rig) -> None:
        first = await rig.poll(OLD)
        await trio.sleep(299)
        assert not first.closed and rig.pool.parked == 1
        await trio.sleep(2)
        assert first.closed and rig.pool.parked == 0

    await with_pool(test)


async def test_a_connection_past_its_age_is_not_parked_again(autojump_clock: trio.testing.MockClock) -> None:
    async def test(rig: Rig) -> None:
        lease = await rig.pool.checkout(ACCOUNT, OLD)
        await trio.sleep(400)  # a long session
        await lease.release()
        assert lease.mailbox.closed and rig.pool.parked == 0  # type: ignore[attr-defined]

    await with_pool(test)


async def test_a_login_with_a_new_password_retires_the_old_passwords_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def test(rig: Rig) -> None:
        first = await rig.poll(OLD)
        in_use = await rig.pool.checkout(ACCOUNT, OLD)  # a session takes the parked one...
        assert in_use.mailbox is first
        other = await rig.pool.checkout(ACCOUNT, OLD)  # ...another opens a second connection
        await other.release()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.pool.parked == 1
        rig.upstream.password = NEW  # changed upstream
        newest = await rig.poll(NEW)
        # The parked connection of the old password is logged out at once...
        assert other.mailbox.closed  # type: ignore[attr-defined]
        # ...the one in use serves its session to the end, then is logged out, not parked.
        assert not first.closed
        await in_use.release()
        await trio.testing.wait_all_tasks_blocked()
        assert first.closed
        assert rig.pool.parked == 1 and await rig.poll(NEW) is newest
        # The old password now goes to the server, which refuses it.
        with pytest.raises(AuthenticationFailed):
            await rig.pool.checkout(ACCOUNT, OLD)

    await with_pool(test, pool={"max_per_account": 4})


async def test_two_sessions_never_get_the_same_connection(autojump_clock: trio.testing.MockClock) -> None:
    """Two connections parked; the newer one turns out broken while a session claims it, and
    meanwhile a second session takes the older one. The first session must not take the
    older one as well: it opens a fresh one."""

    async def test(rig: Rig) -> None:
        older = await rig.pool.checkout(ACCOUNT, OLD)
        rig.upstream.break_next_when_claimed = True
        newer = await rig.pool.checkout(ACCOUNT, OLD)
        await older.release()
        await newer.release()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.pool.parked == 2
        got: dict[str, Lease] = {}

        async def session(name: str) -> None:
            got[name] = await rig.pool.checkout(ACCOUNT, OLD)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(session, "first")
            await trio.testing.wait_all_tasks_blocked()  # first is waiting on the newer one
            nursery.start_soon(session, "second")
        assert got["first"].mailbox is not got["second"].mailbox
        assert got["second"].mailbox is older.mailbox
        assert got["first"].mailbox is rig.upstream.opened[-1]  # a fresh one
        for lease in got.values():
            await lease.release()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.pool.parked == 2

    await with_pool(test)


async def test_a_reload_changing_upstream_retires_every_connection(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream()
    current = [settings()]
    rig = Rig(upstream, current)
    async with rig.pool.running():
        parked = await rig.poll(OLD)
        in_use = await rig.pool.checkout(ACCOUNT, OLD)
        assert in_use.mailbox is parked
        second = await rig.poll(OLD)
        # A reload that changes nothing upstream keeps what is parked.
        current[0] = settings(logging={"level": "debug"})
        assert rig.pool.retire_stale() == 0 and not second.closed
        current[0] = settings(upstream={"host": "imap.example.net"})
        assert rig.pool.retire_stale() == 1
        await trio.testing.wait_all_tasks_blocked()
        assert second.closed
        # The session in progress keeps its connection; it is not parked afterwards.
        assert not parked.closed
        await in_use.release()
        assert parked.closed and rig.pool.parked == 0
        # New connections are parked as before.
        fresh = await rig.poll(OLD)
        assert await rig.poll(OLD) is fresh
