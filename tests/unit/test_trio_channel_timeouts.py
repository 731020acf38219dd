"""The upstream timeout of every exchange on the trio engine's channel, as a session sees it.

A server that stops answering must cost a command at most upstream.timeout_seconds and
then close the connection (a late answer would otherwise be read as the next command's);
a session that gives a command up itself is not the server's fault. The server's side is
scripted over an in-memory stream with Trio's mock clock: a stall of minutes cannot be
produced on time by Dovecot or Cyrus (the integration tests stall a real server through a
fault proxy, `tests/integration/test_faults_upstream.py`).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import trio
import trio.testing

from bridge.config import UpstreamSettings
from bridge.imap.channel import Command
from bridge.imap.errors import UpstreamUnavailable
from bridge.imap.trio_engine.channel import TrioChannel


def channel_and_server() -> tuple[TrioChannel, trio.abc.Stream]:
    ours, theirs = trio.testing.memory_stream_pair()
    return TrioChannel(ours, UpstreamSettings(timeout_seconds=5)), theirs


async def read_line(stream: trio.abc.Stream) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        data += await stream.receive_some(4096)
    return data


async def test_a_server_that_stops_answering_costs_the_command_the_timeout_then_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel, server = channel_and_server()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def stall() -> None:
            assert await read_line(server) == b"B1 NOOP\r\n"  # read, never answered

        nursery.start_soon(stall)
        with pytest.raises(UpstreamUnavailable, match=r"^noop: no answer within 5 s$"):
            await channel.run("noop", Command(b"NOOP"))
    assert trio.current_time() - started == pytest.approx(5)
    assert not channel.usable
    assert not channel.abandoned  # the server's fault, not the session's
    with pytest.raises(UpstreamUnavailable, match="closed"):
        await channel.run("noop", Command(b"NOOP"))


async def test_an_answer_within_the_timeout_leaves_no_deadline_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel, server = channel_and_server()

    async def answer_late() -> None:
        assert await read_line(server) == b"B1 NOOP\r\n"
        await trio.sleep(4)
        await server.send_all(b"B1 OK NOOP done\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_late)
        assert (await channel.run("noop", Command(b"NOOP"))).ok
    # Long after the first command's deadline, the session's own waits are not cancelled.
    await trio.sleep(60)
    assert channel.usable

    async def answer() -> None:
        assert await read_line(server) == b"B2 NOOP\r\n"
        await server.send_all(b"B2 OK NOOP done\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        assert (await channel.run("noop", Command(b"NOOP"))).ok


async def test_a_command_the_session_gives_up_closes_the_connection_as_abandoned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel, server = channel_and_server()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_line, server)
        with trio.move_on_after(1) as gave_up:
            await channel.run("noop", Command(b"NOOP"))
    assert gave_up.cancelled_caught  # the session's own scope, not an UpstreamError
    assert not channel.usable
    assert channel.abandoned


class Flood:
    """A server on a real socket (a read that finds data at once is the path that does not
    wait) sending untagged lines faster than they can be parsed, never answering: until the
    channel hangs up, the test sets `over`, or `seconds` pass (then `ran_out` is set)."""

    def __init__(self, seconds: float) -> None:
        ours, self._theirs = socket.socketpair()
        ours.setblocking(False)
        self.socket = trio.socket.from_stdlib_socket(ours)
        self._seconds = seconds
        self.over = threading.Event()
        self.ran_out = threading.Event()
        self._thread = threading.Thread(target=self._flood, daemon=True)

    def _flood(self) -> None:
        lines = b"* OK still here\r\n" * 4096
        deadline = time.monotonic() + self._seconds
        try:
            while not self.over.is_set():
                if time.monotonic() > deadline:
                    self.ran_out.set()
                    break
                self._theirs.sendall(lines)
        except OSError:
            pass  # the bridge closed its side
        finally:
            self.over.set()

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.over.set()
        self._thread.join()
        self._theirs.close()
        self.socket.close()


async def test_a_server_that_keeps_the_socket_full_does_not_escape_the_timeout() -> None:
    with Flood(seconds=20) as flood:
        channel = TrioChannel(trio.SocketStream(flood.socket), UpstreamSettings(timeout_seconds=0.5))
        with pytest.raises(UpstreamUnavailable, match="no answer within 0.5 s"):
            await channel.run("noop", Command(b"NOOP"))
        # The timeout came while the server was still flooding, not when it gave up.
        assert not flood.ran_out.is_set()
    assert not channel.usable


async def test_a_server_that_keeps_the_socket_full_does_not_hold_up_other_sessions() -> None:
    turns_during_flood = 0
    with Flood(seconds=20) as flood:
        channel = TrioChannel(trio.SocketStream(flood.socket), UpstreamSettings(timeout_seconds=60))
        async with trio.open_nursery() as nursery:

            async def other_session() -> None:
                nonlocal turns_during_flood
                while turns_during_flood < 3:
                    await trio.sleep(0.01)
                    if not flood.over.is_set():
                        turns_during_flood += 1
                flood.over.set()  # seen enough: the server stops, the exchange is given up
                nursery.cancel_scope.cancel()

            nursery.start_soon(other_session)
            await channel.run("noop", Command(b"NOOP"))
        assert not flood.ran_out.is_set()
    assert turns_during_flood == 3
