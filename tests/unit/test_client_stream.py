"""The client side of a session (bridge.net.client_stream) on real connected sockets, with the
watchdog (bridge.net.client_timeouts) on Trio's autojump clock: what the peer receives, and which
timeout ends a wait for a client that does not read or does not write."""

from __future__ import annotations

import socket
import threading

import pytest
import trio
import trio.testing

from bridge.net.client_stream import ClientStream
from bridge.net.client_timeouts import ClientWait, ClientWatchdog


async def socket_pair() -> tuple[trio.SocketStream, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


def drain(peer: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


async def run_until_cut(wait: ClientWait, job: object) -> tuple[str, float]:
    """Runs `job` (an async callable) inside `wait.scope` with a watchdog ticking every
    second; returns the reason the wait was cut and when (virtual seconds)."""
    watchdog = ClientWatchdog()
    watchdog.add(wait)
    started = trio.current_time()
    # Virtual time: a wait the watchdog never cuts fails the test instead of hanging it.
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.run, lambda: 1.0)
            with wait.scope:
                await job()  # type: ignore[operator]
            nursery.cancel_scope.cancel()
    assert wait.scope.cancelled_caught
    return wait.reason, trio.current_time() - started


async def test_a_reply_reaches_the_peer_whole() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait())
    payload = b"+OK\r\n" + b"x" * 5000 + b"\r\n.\r\n"
    await client.send(payload, 120)
    assert drain(peer) == payload
    assert client.wait.due == float("inf")  # nothing to wait for: no timeout was set
    peer.close()


async def test_receive_returns_what_the_peer_sent_then_eof() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait())
    peer.send(b"RETR 1\r\n")
    assert await client.receive(1024, 600) == b"RETR 1\r\n"
    peer.close()
    assert await client.receive(1024, 600) == b""


@pytest.mark.parametrize(("deadline", "reason", "after"), [(None, "autologout", 600), (300, "session_timeout", 300)])
async def test_a_silent_client_is_cut_off_at_autologout_or_the_session_limit(
    autojump_clock: trio.testing.MockClock, deadline: float | None, reason: str, after: float
) -> None:
    stream, peer = await socket_pair()
    wait = ClientWait()
    client = ClientStream(stream, wait)
    if deadline is not None:
        client.deadline = trio.current_time() + deadline

    async def job() -> None:
        await client.receive(1024, 600)

    cut, elapsed = await run_until_cut(wait, job)
    assert cut == reason
    assert after <= elapsed <= after + 1
    peer.close()


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, peer = await socket_pair()
    wait = ClientWait()
    client = ClientStream(stream, wait)
    message = b"y" * (32 << 20)  # far more than the socket buffers hold

    async def job() -> None:
        await client.send(message, 120)

    cut, elapsed = await run_until_cut(wait, job)
    assert cut == "send_timeout"
    assert 120 <= elapsed <= 121
    received = drain(peer)
    assert 0 < len(received) < len(message)
    peer.close()


async def test_a_peer_that_went_away_is_a_broken_stream() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait())
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may still land in the kernel's buffer
            await client.send(b"x" * 65536, 120)


async def _answer_and_see_whether_it_slept(client: ClientStream, peer: socket.socket, line: bytes) -> tuple[bytes, bool]:
    """The peer sends `line` a moment after the session starts waiting for it; returns what
    the session received and whether it slept meanwhile (another task got to run)."""
    ran: list[bool] = []

    async def other() -> None:
        ran.append(True)

    answer = threading.Timer(0.02, peer.send, (line,))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # runs as soon as this task yields, not before
        answer.start()
        try:
            data = await client.receive(1024, 600)
        finally:
            answer.join()
        slept = bool(ran)
    return data, slept


async def test_a_client_that_answers_within_the_window_is_polled_for() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait(), poll_seconds=1.0)
    # The first answer is measured, not expected: the session waits for it as usual.
    await client.send(b"+OK ready\r\n", 120)
    assert await _answer_and_see_whether_it_slept(client, peer, b"USER a\r\n") == (b"USER a\r\n", True)
    assert client.turnaround < 1.0
    # It answered within the window: its next command is read without sleeping.
    await client.send(b"+OK\r\n", 120)
    assert await _answer_and_see_whether_it_slept(client, peer, b"PASS b\r\n") == (b"PASS b\r\n", False)
    assert drain(peer) == b"+OK ready\r\n+OK\r\n"
    peer.close()


async def test_without_a_window_the_session_always_waits() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait())  # pop3.poll_microseconds = 0
    for line in (b"USER a\r\n", b"PASS b\r\n"):
        await client.send(b"+OK\r\n", 120)
        assert await _answer_and_see_whether_it_slept(client, peer, line) == (line, True)
    peer.close()


async def test_a_client_slower_than_the_window_is_not_polled_for() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait(), poll_seconds=0.001)
    await client.send(b"+OK\r\n", 120)
    await trio.sleep(0.05)  # the client takes its time
    peer.send(b"USER a\r\n")
    await client.receive(1024, 600)
    assert client.turnaround >= client.poll_seconds
    await client.send(b"+OK\r\n", 120)
    assert await _answer_and_see_whether_it_slept(client, peer, b"PASS b\r\n") == (b"PASS b\r\n", True)
    peer.close()


async def test_a_poll_that_finds_nothing_gives_up_and_waits() -> None:
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait(), poll_seconds=0.01)
    await client.send(b"+OK\r\n", 120)
    peer.send(b"USER a\r\n")
    await client.receive(1024, 600)
    quick = client.turnaround
    assert quick < 0.01

    async def answer_late(line: bytes) -> None:
        await trio.sleep(0.05)
        peer.send(line)

    for number in range(1, 7):
        await client.send(b"+OK\r\n", 120)
        line = b"NOOP %d\r\n" % number
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_late, line)
            # Polled for at first, in vain: the answer comes after the window, and still arrives.
            assert await client.receive(1024, 600) == line
        if number == 1:
            # One late answer moves the smoothed figure by a bounded step only.
            assert quick < client.turnaround < 0.01
    # A client that keeps answering late is no longer polled for.
    assert client.turnaround >= 0.01
    peer.close()


async def test_a_client_polled_for_command_after_command_still_lets_other_tasks_run() -> None:
    # A local client downloading its mail answers every reply within the window, so no
    # receive sleeps after the first; other sessions (and this one's read-ahead in the
    # background) must still get turns, as they do beside a client that pipelines.
    stream, peer = await socket_pair()
    peer.setblocking(True)
    client = ClientStream(stream, ClientWait(), poll_seconds=1.0)
    commands = 160
    exchange = 0
    others_ran_during: set[int] = set()

    async def other() -> None:
        while True:
            others_ran_during.add(exchange)
            await trio.lowlevel.checkpoint()

    def answer_each_reply() -> None:
        for number in range(commands):
            got = b""
            while not got.endswith(b"\r\n"):
                got += peer.recv(100)
            peer.sendall(b"NOOP %d\r\n" % number)

    answering = threading.Thread(target=answer_each_reply)
    answering.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            for exchange in range(commands):
                await client.send(b"+OK\r\n", 120)
                assert await client.receive(1024, 600) == b"NOOP %d\r\n" % exchange
            polled = client.turnaround < client.poll_seconds
            nursery.cancel_scope.cancel()
    finally:
        answering.join()
        peer.close()
    assert polled
    # The first command was waited for (nothing measured yet); every command after it was
    # polled for. The session yields every 16 replies: ten times here. After a yield Trio
    # may run this session first, so the other task can see two yields as one exchange.
    assert len(others_ran_during - {0}) >= 5


async def test_a_closed_connection_never_touches_a_connection_that_got_its_number() -> None:
    # A descriptor number is reused as soon as it is free: whatever is still sent or read on
    # a client connection after it was closed must fail, not reach another client's socket.
    stream, peer = await socket_pair()
    client = ClientStream(stream, ClientWait())
    await client.send(b"+OK\r\n", 120)
    number = stream.socket.fileno()
    stream.socket.close()
    other, other_peer = socket.socketpair()
    try:
        other.setblocking(False)
        other_peer.setblocking(False)
        assert number in (other.fileno(), other_peer.fileno())
        with pytest.raises(trio.ClosedResourceError):
            await client.send(b"-ERR for someone else\r\n", 120)
        with trio.fail_after(5), pytest.raises(trio.ClosedResourceError):
            await client.receive(1024, 600)
        assert drain(other) == drain(other_peer) == b""
    finally:
        other.close()
        other_peer.close()
        peer.close()
