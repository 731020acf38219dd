"""The slow clients' reading in the benchmark (bench.slow_clients.PacedReaders and
bench.asyncclient.BodyEnd): every client must get exactly its message's body, however the
bytes arrive, or the slow row's "whole message received" means nothing. Real sockets."""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st

from bench.asyncclient import AsyncPop3, BodyEnd, unstuff
from bench.slow_clients import PacedReaders, paced_readers

_BODY = b"line one\r\n..a stuffed dot\r\n\r\nlast line\r\n"


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@given(st.lists(st.integers(min_value=0), max_size=12), st.binary(max_size=8))
def test_the_body_ends_at_its_terminator_however_it_is_split(cuts: list[int], after: bytes) -> None:
    stream = _BODY + b".\r\n" + after
    pieces = _pieces(stream, cuts)
    end = BodyEnd()
    seen = 0
    for k, piece in enumerate(pieces):
        found = end.feed(piece)
        if found is not None:
            in_piece, past = found
            assert seen + in_piece == len(_BODY)
            assert piece[past:] + b"".join(pieces[k + 1:]) == after
            break
        seen += len(piece)
    else:
        raise AssertionError("the terminator was not found")
    assert end.total == len(_BODY)


def test_an_empty_body_ends_right_after_the_status_line() -> None:
    end = BodyEnd()
    assert end.feed(b".\r\n+OK") == (0, 3)
    assert end.total == 0


def test_a_dot_line_inside_the_body_is_not_its_end() -> None:
    end = BodyEnd()
    assert end.feed(b"a\r\n.. b\r\n") is None
    assert end.feed(b".\r") is None
    assert end.feed(b"\n") == (-2, 1)
    assert end.total == len(b"a\r\n.. b\r\n")
    assert unstuff(b"a\r\n.. b\r\n") == b"a\r\n. b\r\n"


async def test_each_client_gets_its_body_and_the_next_response_stays_readable() -> None:
    bodies = [_BODY * n for n in (0, 1, 5, 40)]
    servers = []
    clients = []
    for _ in bodies:
        ours, theirs = trio.socket.socketpair()
        servers.append(trio.SocketStream(theirs))
        clients.append(AsyncPop3(trio.SocketStream(ours), chunk=7))
    got: dict[int, tuple[int, bytes]] = {}

    async def client(readers: PacedReaders, i: int) -> None:
        await clients[i].start_multiline(b"RETR 1")
        count = await readers.read_body(clients[i])
        got[i] = (count, await clients[i].command(b"QUIT"))

    async def server(i: int) -> None:
        stream = servers[i]
        assert await stream.receive_some(100) == b"RETR 1\r\n"
        # The answer to QUIT goes out early, so the read that ends the body takes some of
        # it: the reader must give that back to the client.
        reply = b"+OK here\r\n" + bodies[i] + b".\r\n+OK bye " + str(i).encode() + b"\r\n"
        for piece in _pieces(reply, list(range(3, len(reply), 11))):
            await stream.send_all(piece)
            await trio.lowlevel.checkpoint()
        assert await stream.receive_some(100) == b"QUIT\r\n"

    with trio.fail_after(10):
        async with paced_readers(rate=1 << 30, chunk=7) as readers, trio.open_nursery() as nursery:
            for i in range(len(bodies)):
                nursery.start_soon(client, readers, i)
                nursery.start_soon(server, i)
    assert got == {i: (len(body), b"+OK bye " + str(i).encode()) for i, body in enumerate(bodies)}
    for stream in servers + [c._stream for c in clients]:
        await stream.aclose()


async def test_a_server_that_closes_mid_body_is_an_error_for_that_client_only() -> None:
    pairs = [trio.socket.socketpair() for _ in range(2)]
    clients = [AsyncPop3(trio.SocketStream(ours)) for ours, _ in pairs]
    servers = [trio.SocketStream(theirs) for _, theirs in pairs]
    outcome: dict[int, object] = {}

    async def client(readers: PacedReaders, i: int) -> None:
        await clients[i].start_multiline(b"RETR 1")
        try:
            outcome[i] = await readers.read_body(clients[i])
        except Exception as exc:  # noqa: BLE001 - the test records which error
            outcome[i] = type(exc).__name__

    async def server(i: int) -> None:
        await servers[i].receive_some(100)
        await servers[i].send_all(b"+OK\r\n" + _BODY)
        if i == 0:
            await servers[i].aclose()
        else:
            await trio.sleep(0.05)
            await servers[i].send_all(b".\r\n")

    with trio.fail_after(10):
        async with paced_readers(rate=1 << 30, chunk=4096) as readers, trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(client, readers, i)
                nursery.start_soon(server, i)
    assert outcome == {0: "Pop3Error", 1: len(_BODY)}
    await servers[1].aclose()
    for c in clients:
        await c.aclose()
