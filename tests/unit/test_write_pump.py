"""The write pump (bridge.net.write_pump): what a client could not take at once is written by
one task per event loop, a slice at a time, on real connected sockets. What the peers
receive, which writer an error or a cancellation reaches, and that the session's send
timeout still measures a client that stops reading, not one that reads slowly."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile

import pytest
import trio
import trio.testing
import trustme

import bridge.net.write_pump as write_pump_module
from bridge.net.client_stream import ClientStream
from bridge.net.client_timeouts import ClientWait, ClientWatchdog
from bridge.net.write_pump import WritePump, write_pump
from tests.unit.test_client_stream import drain


def small_socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return ours, theirs


def fill(sock: socket.socket) -> None:
    """Writes to `sock` until its buffers are full."""
    while True:
        try:
            sock.send(b"f" * 65536)
        except BlockingIOError:
            return


async def read_slowly(peer: socket.socket, length: int, pause: float = 0.0) -> bytes:
    """What the peer gets, `length` bytes of it, 2 KiB at a time with `pause` between reads."""
    data = bytearray()
    while len(data) < length:
        await trio.lowlevel.wait_readable(peer)
        data += peer.recv(2048)
        await trio.sleep(pause)
    return bytes(data)


@pytest.fixture(params=["pump", "session waits itself"])
async def pumped(request: pytest.FixtureRequest) -> bool:
    """Runs the test with the pump, and as on a platform without epoll, where the sessions
    wait for their sockets themselves (set in the test's own Trio run)."""
    if request.param == "pump":
        return True
    write_pump_module._PUMP.set(None)
    return False


async def test_many_slow_readers_each_get_their_whole_message_in_order(pumped: bool) -> None:
    pairs = [small_socket_pair() for _ in range(20)]
    messages = [bytes([65 + number]) * 1000 + os.urandom(200_000) for number in range(len(pairs))]
    received: dict[int, bytes] = {}
    waited: dict[int, bool] = {}

    async def session(number: int) -> None:
        ours, _theirs = pairs[number]
        client = ClientStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), ClientWait())
        waited[number] = await client.send(messages[number], 120)

    async def reader(number: int) -> None:
        received[number] = await read_slowly(pairs[number][1], len(messages[number]))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for number in range(len(pairs)):
                nursery.start_soon(session, number)
                nursery.start_soon(reader, number)
    for number, (ours, theirs) in enumerate(pairs):
        assert received[number] == messages[number]
        assert waited[number]  # the client was slower than the data
        assert drain(theirs) == b""
        ours.close()
        theirs.close()
    assert (write_pump() is not None) == pumped


async def test_a_slice_bounds_what_the_pump_writes_in_one_turn() -> None:
    pairs = [small_socket_pair() for _ in range(10)]
    for slice_seconds, expected in ((0.0, 1), (10.0, len(pairs))):
        pump = WritePump(slice_seconds)
        async with trio.open_nursery() as nursery:
            for ours, _theirs in pairs:
                nursery.start_soon(pump.write, ours.fileno(), memoryview(b"hello"), lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            pump.write_a_slice()
            got = [drain(theirs) for _ours, theirs in pairs]
            assert sum(1 for data in got if data == b"hello") == expected
            assert all(data in (b"", b"hello") for data in got)
            nursery.cancel_scope.cancel()
        pump.close()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


async def test_a_slice_serves_a_bounded_number_of_ready_sockets_and_the_next_slices_the_rest() -> None:
    # However many sockets have room at once (1,000 slow downloads starting together), one
    # turn of the pump looks at no more than it can serve; none is left behind.
    pairs = [small_socket_pair() for _ in range(write_pump_module.READY_PER_SLICE * 2 + 5)]
    pump = WritePump(10.0)
    served_per_slice = []
    async with trio.open_nursery() as nursery:
        for ours, _theirs in pairs:
            nursery.start_soon(pump.write, ours.fileno(), memoryview(b"hello"), lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        delivered = 0
        while delivered < len(pairs):
            pump.write_a_slice()
            got = [drain(theirs) for _ours, theirs in pairs]
            served_per_slice.append(sum(1 for data in got if data == b"hello"))
            delivered += served_per_slice[-1]
            assert len(served_per_slice) <= len(pairs), "a ready socket is never served"
    pump.close()
    ready = write_pump_module.READY_PER_SLICE
    assert served_per_slice == [ready, ready, 5]
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


async def test_the_pump_lets_other_tasks_run_between_its_slices() -> None:
    # Every socket always has room (a thread-free peer drained by the test between turns),
    # so a pump that did not stop after its slice would never give the other task a turn.
    pairs = [small_socket_pair() for _ in range(8)]
    pump = WritePump(0.0)
    turns_between: list[int] = []
    writes = [0]
    done = trio.Event()

    async def other() -> None:
        while not done.is_set():
            got = sum(len(drain(theirs)) for _ours, theirs in pairs)
            turns_between.append(got)
            await trio.lowlevel.checkpoint()

    async def writer(ours: socket.socket) -> None:
        await pump.write(ours.fileno(), memoryview(b"x" * 300_000), lambda: None)
        writes[0] += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            nursery.start_soon(other)
            async with trio.open_nursery() as writers:
                for ours, _theirs in pairs:
                    writers.start_soon(writer, ours)
            done.set()
            nursery.cancel_scope.cancel()
    assert writes[0] == len(pairs)
    # One write per slice: between two turns of the other task at most one socket's worth.
    assert max(turns_between) <= max(ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for ours, _ in pairs) * 2
    assert len(turns_between) > 8
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


async def test_a_cancelled_write_leaves_nothing_behind_for_the_next_socket_with_its_number() -> None:
    pump = WritePump()
    ours, theirs = small_socket_pair()
    fill(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run)
        with trio.move_on_after(0.05) as scope:
            await pump.write(ours.fileno(), memoryview(b"never read " * 1000), lambda: None)
        assert scope.cancelled_caught
        number = ours.fileno()
        ours.close()
        theirs.close()
        other, other_peer = socket.socketpair()
        try:
            other.setblocking(False)
            other_peer.setblocking(False)
            if other_peer.fileno() == number:
                other, other_peer = other_peer, other
            assert other.fileno() == number
            # Another session's write on the socket that has the number now: only its own
            # bytes arrive, and it ends.
            with trio.fail_after(10):
                await pump.write(other.fileno(), memoryview(b"for the new client"), lambda: None)
            assert drain(other_peer) == b"for the new client"
        finally:
            other.close()
            other_peer.close()
        nursery.cancel_scope.cancel()


async def test_a_failed_write_reaches_its_own_session_only() -> None:
    gone_ours, gone_peer = small_socket_pair()
    fill(gone_ours)
    ours, theirs = small_socket_pair()
    fill(ours)
    gone = ClientStream(trio.SocketStream(trio.socket.from_stdlib_socket(gone_ours)), ClientWait())
    fine = ClientStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), ClientWait())
    message = os.urandom(100_000)
    outcome: dict[str, object] = {}

    async def send(name: str, client: ClientStream) -> None:
        try:
            outcome[name] = await client.send(message, 120)
        except trio.BrokenResourceError as exc:
            outcome[name] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "gone", gone)
            nursery.start_soon(send, "fine", fine)
            await trio.testing.wait_all_tasks_blocked()
            gone_peer.close()
            filler = drain(theirs)
            got = await read_slowly(theirs, len(message))
    assert isinstance(outcome["gone"], trio.BrokenResourceError)
    assert outcome["fine"] is True
    assert len(filler) > 0 and got == message
    for sock in (gone_ours, ours, theirs):
        sock.close()


@pytest.mark.parametrize("start", [0, 70_000])
async def test_a_slow_reader_of_a_file_gets_all_of_the_range(pumped: bool, start: int) -> None:
    # start: a spool's client has the first part of the file already.
    ours, theirs = small_socket_pair()
    content = os.urandom(300_000)
    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        client = ClientStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), ClientWait())
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: client.send_file(file.fileno(), len(content), 120, start=start))
                got = await read_slowly(theirs, len(content) - start)
    assert got == content[start:]
    ours.close()
    theirs.close()


async def test_over_tls_a_slow_reader_of_a_file_gets_the_range_in_pieces() -> None:
    # Over TLS the file is read into pieces and sent through the stream (no sendfile):
    # small pieces, a start offset, and a reader that takes a little at a time.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("bridge.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    ours_raw, theirs_raw = trio.testing.memory_stream_pair()
    ours = trio.SSLStream(ours_raw, server_context, server_side=True)
    theirs = trio.SSLStream(theirs_raw, client_context, server_hostname="bridge.test")
    content = os.urandom(300_000)
    got = bytearray()

    async def read_slowly_over_tls() -> None:
        while len(got) < len(content) - 70_000:
            got.extend(await theirs.receive_some(2048))

    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        client = ClientStream(ours, ClientWait())
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(theirs.do_handshake)
                await ours.do_handshake()
                nursery.start_soon(read_slowly_over_tls)
                await client.send_file(file.fileno(), len(content), 120, start=70_000, piece_size=16_384)
    assert bytes(got) == content[70_000:]


async def test_a_client_that_reads_slowly_but_steadily_is_not_cut_off(
    pumped: bool, autojump_clock: trio.testing.MockClock,
) -> None:
    # The send timeout measures a client that takes nothing: one that takes 2 KiB every 20
    # seconds (the writer's socket has room again every 80) keeps its session through a send
    # that lasts far longer than the timeout.
    ours, theirs = small_socket_pair()
    wait = ClientWait()
    client = ClientStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), wait)
    message = os.urandom(200_000)
    watchdog = ClientWatchdog()
    watchdog.add(wait)
    started = trio.current_time()
    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run, lambda: 1.0)
        with wait.scope:
            async with trio.open_nursery() as session:
                session.start_soon(client.send, message, 120)
                got = await read_slowly(theirs, len(message), pause=20)
        nursery.cancel_scope.cancel()
    assert not wait.scope.cancelled_caught
    assert got == message
    assert trio.current_time() - started > 1000  # many times the send timeout
    ours.close()
    theirs.close()
