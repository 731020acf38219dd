"""A parked connection's IDLE on the trio engine's channel, as the server sees it.

A parked connection is handed to a session with its IDLE still running; the session's first
command ends it. These tests script the server's side over an in-memory stream (the order of
writes is what they check: DONE sent in the same write as a pipeline, or alone and answered
before any other command), because Dovecot and Cyrus cannot be asked to show which bytes came
in one write. The integration tests run the same hand-over against both.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.config import UpstreamSettings
from bridge.imap.channel import Command, StopSignal
from bridge.imap.errors import UpstreamUnavailable
from bridge.imap.trio_engine.channel import TrioChannel


class Recorded(trio.abc.Stream):
    """The channel's side of the connection, keeping each write as one item."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:  # pragma: no cover - not used by the channel
        pass

    async def aclose(self) -> None:
        await self.inner.aclose()


class Server:
    """The server's side: reads lines, sends what the test says."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            assert data, "the bridge closed the connection"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


async def idling(nursery: trio.Nursery) -> tuple[TrioChannel, Recorded, Server, StopSignal]:
    """A channel in IDLE (the server has answered `+ idling`), with its keeper's stop event."""
    ours, theirs = trio.testing.memory_stream_pair()
    recorded = Recorded(ours)
    channel = TrioChannel(recorded, UpstreamSettings(timeout_seconds=5))
    server = Server(theirs)
    stop = StopSignal()
    nursery.start_soon(channel.idle, stop, 3600.0)
    assert await server.line() == b"B1 IDLE"
    await server.send(b"+ idling\r\n")
    return channel, recorded, server, stop


async def stopped(stop: StopSignal) -> None:
    stop.set()
    await trio.testing.wait_all_tasks_blocked()


class TaskSteps(trio.abc.Instrument):
    """The name of each task step (one task's run within a turn of the event loop)."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps.append(task.name)


async def test_an_idle_told_to_stop_returns_in_the_keepers_next_step() -> None:
    """A login on a parked connection waits until its keeper lets go. Setting the stop
    cancels the keeper's read itself, so the IDLE returns in the keeper's next step with no
    other task woken first: under load each turn of the event loop is a batch of every busy
    session, and the login waits for each turn."""
    ours, theirs = trio.testing.memory_stream_pair()
    channel = TrioChannel(ours, UpstreamSettings(timeout_seconds=5))
    server = Server(theirs)
    stop = StopSignal()
    returned = trio.Event()

    async def keeper() -> None:
        await channel.idle(stop, 3600.0)
        returned.set()

    steps = TaskSteps()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper, name="keeper")
        assert await server.line() == b"B1 IDLE"
        await server.send(b"+ idling\r\n")
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        try:
            stop.set()
            await returned.wait()
        finally:
            trio.lowlevel.remove_instrument(steps)
    me = trio.lowlevel.current_task().name
    assert [name for name in steps.steps if name != me] == ["keeper"]
    assert channel.usable


async def test_a_stop_cancels_the_scopes_read_under_it_and_any_entered_after() -> None:
    stop = StopSignal()
    with stop.cancelling() as before:
        stop.set()
        await trio.lowlevel.checkpoint()
    assert before.cancelled_caught
    with stop.cancelling() as after:
        await trio.lowlevel.checkpoint()
    assert after.cancelled_caught
    await stop.wait()  # set: returns at once


async def test_a_pipeline_after_a_handed_over_idle_sends_done_in_the_same_write() -> None:
    async with trio.open_nursery() as nursery:
        channel, recorded, server, stop = await idling(nursery)
        await server.send(b"* 3 EXISTS\r\n")
        await trio.testing.wait_all_tasks_blocked()
        await stopped(stop)
        assert recorded.writes == [b"B1 IDLE\r\n"]  # nothing sent when told to stop

        async def answer() -> None:
            assert await server.line() == b"DONE"
            assert await server.line() == b"B2 NOOP"
            # An untagged response sent just before the DONE arrived still counts.
            await server.send(b"* 4 EXISTS\r\nB1 OK Idle completed\r\nB2 OK NOOP done\r\n")

        nursery.start_soon(answer)
        replies = await channel.pipeline("listing", [Command(b"NOOP")])
    assert [reply.ok for reply in replies] == [True]
    assert recorded.writes[1] == b"DONE\r\nB2 NOOP\r\n"
    assert channel.view.exists == 4
    assert channel.usable


async def test_any_other_command_after_a_handed_over_idle_waits_for_the_idle_to_end() -> None:
    async with trio.open_nursery() as nursery:
        channel, recorded, server, stop = await idling(nursery)
        await stopped(stop)

        async def answer() -> None:
            assert await server.line() == b"DONE"
            await trio.testing.wait_all_tasks_blocked()
            # The command is not sent before the IDLE's tagged answer.
            assert recorded.writes == [b"B1 IDLE\r\n", b"DONE\r\n"]
            await server.send(b"B1 OK Idle completed\r\n")
            assert await server.line() == b"B2 NOOP"
            await server.send(b"B2 OK NOOP done\r\n")

        nursery.start_soon(answer)
        reply = await channel.run("noop", Command(b"NOOP"))
    assert reply.ok
    assert channel.usable


async def test_an_idle_the_server_ends_with_an_error_breaks_the_connection() -> None:
    async with trio.open_nursery() as nursery:
        channel, _recorded, server, stop = await idling(nursery)
        await stopped(stop)

        async def answer() -> None:
            assert await server.line() == b"DONE"
            assert await server.line() == b"B2 NOOP"
            await server.send(b"B1 NO idle failed\r\nB2 OK NOOP done\r\n")

        nursery.start_soon(answer)
        with pytest.raises(UpstreamUnavailable):
            await channel.pipeline("listing", [Command(b"NOOP")])
    assert not channel.usable


async def test_an_idle_the_server_ended_by_itself_needs_no_done() -> None:
    async with trio.open_nursery() as nursery:
        channel, recorded, server, stop = await idling(nursery)
        await server.send(b"B1 OK Idle timed out\r\n")
        await trio.testing.wait_all_tasks_blocked()
        await stopped(stop)

        async def answer() -> None:
            assert await server.line() == b"B2 NOOP"
            await server.send(b"B2 OK NOOP done\r\n")

        nursery.start_soon(answer)
        await channel.pipeline("listing", [Command(b"NOOP")])
    assert recorded.writes == [b"B1 IDLE\r\n", b"B2 NOOP\r\n"]


async def test_logging_out_of_a_handed_over_idle_ends_it_first() -> None:
    async with trio.open_nursery() as nursery:
        channel, recorded, server, stop = await idling(nursery)
        await stopped(stop)

        async def answer() -> None:
            assert await server.line() == b"DONE"
            assert await server.line() == b"B2 LOGOUT"
            await server.send(b"B1 OK Idle completed\r\n* BYE bye\r\nB2 OK Logout completed\r\n")
            await server.stream.aclose()

        nursery.start_soon(answer)
        await channel.logout()
    assert recorded.writes[-1] == b"DONE\r\nB2 LOGOUT\r\n"


async def test_an_idle_whose_interval_passes_is_ended_and_answered_before_it_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    recorded = Recorded(ours)
    channel = TrioChannel(recorded, UpstreamSettings(timeout_seconds=5))
    server = Server(theirs)

    async def answer() -> None:
        assert await server.line() == b"B1 IDLE"
        await server.send(b"+ idling\r\n")
        assert await server.line() == b"DONE"
        await server.send(b"B1 OK Idle completed\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        await channel.idle(StopSignal(), 60.0)
    assert recorded.writes == [b"B1 IDLE\r\n", b"DONE\r\n"]

    async def noop() -> None:
        assert await server.line() == b"B2 NOOP"
        await server.send(b"B2 OK NOOP done\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(noop)
        await channel.run("noop", Command(b"NOOP"))
    assert recorded.writes[-1] == b"B2 NOOP\r\n"


async def test_a_connection_the_server_closed_is_not_usable() -> None:
    """A parked connection is handed over with no I/O: a server that closed it meanwhile
    must show at once, so the pool drops it instead of handing it to a session."""
    ours, theirs = trio.socket.socketpair()
    channel = TrioChannel(trio.SocketStream(ours), UpstreamSettings(timeout_seconds=5))
    await theirs.send(b"* 1 EXISTS\r\n")  # unread data alone is no sign of trouble
    assert channel.usable
    theirs.close()
    assert not channel.usable
    channel.close()
