"""Limits against hostile or broken clients, on the real bridge: connection caps, a client that
floods pipelined commands without reading, one that stops reading mid-RETR, and the total
session timeout."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

from sandbox import DovecotSandbox, Mailbox
from tests.harness import Pop3Client, ThreadedBridge, wait_for_event, wait_until
from tests.security_support import RawClient


def test_per_address_cap(bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox) -> None:
    bridge = bridge_factory(pop3={"max_connections_per_address": 2})
    first, second = RawClient(bridge.port), RawClient(bridge.port)
    try:
        with RawClient(bridge.port, read_greeting=False) as third:
            assert third.status() == b"-ERR [SYS/TEMP] too many connections from your address, try again later\r\n"
            wait_until(third.closed_by_server, "the refused connection to be closed")
        assert wait_for_event(bridge, "connection_refused")["reason"] == "max_connections_per_address"
        # Another address is not affected.
        with RawClient(bridge.port, source="127.0.0.2") as elsewhere:
            elsewhere.login(mailbox.user, mailbox.password)
        # A freed slot can be used again.
        first.command(b"QUIT")
        wait_until(first.closed_by_server, "the first session to end")
        wait_until(
            lambda: RawClient(bridge.port).greeting.startswith(b"+OK"),  # noqa: SIM115 - closed by GC
            "a slot to be free again",
        )
    finally:
        first.close()
        second.close()


def test_global_cap(bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = bridge_factory(pop3={"max_connections": 2})
    with RawClient(bridge.port), RawClient(bridge.port, source="127.0.0.2"):
        with RawClient(bridge.port, source="127.0.0.3", read_greeting=False) as third:
            assert third.status() == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
    assert wait_for_event(bridge, "connection_refused")["reason"] == "max_connections"


def test_pipelining_flood_is_held_back_by_flow_control(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    """A client that sends commands and never reads the answers: the bridge stops reading once
    its replies cannot go out, so what it accepts is bounded by socket buffers, not by how
    much the client sends; the service keeps serving others meanwhile, and every command the
    bridge did read is answered in order once the client reads."""
    bridge = bridge_factory()
    flood = socket.socket()
    try:
        # Small client buffers keep the test short (the bridge answers every command it read
        # before the client closes); the bound asserted below does not depend on them.
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        flood.settimeout(60)
        flood.connect(("127.0.0.1", bridge.port))
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += flood.recv(100)
        # CAPA: a short command with a long answer, so the answers back up quickly.
        flood.sendall(b"CAPA\r\n")
        answer = b""
        while not answer.endswith(b"\r\n.\r\n"):
            answer += flood.recv(4096)
        command = b"CAPA\r\n"
        chunk = command * (1 << 14)
        offered_limit = 256 << 20
        accepted = 0
        # A bridge that kept reading would take the next chunk within moments; one that stopped
        # never will. Ten seconds tells the two apart even on a loaded machine.
        flood.settimeout(10.0)
        while accepted < offered_limit:
            try:
                accepted += flood.send(chunk)
            except TimeoutError:
                break
        assert accepted < 32 << 20, f"the bridge kept reading: {accepted} bytes accepted"
        # Others are served while the flooder is stuck.
        with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
            assert pop.stat() == (0, 0)
        # The flooder reads: one answer per complete command it sent, in order.
        flood.settimeout(60)
        commands = accepted // len(command)
        expected = commands * len(answer)
        received = bytearray()
        while len(received) < expected:
            data = flood.recv(1 << 20)
            assert data, "connection closed before every command was answered"
            received += data
        assert bytes(received[:expected]) == answer * commands
    finally:
        flood.close()


def test_client_that_stops_reading_mid_retr(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, dovecot: DovecotSandbox
) -> None:
    # Far more than every socket buffer on the way (client, bridge, Dovecot; autotuned, a few
    # MiB each) can hold together: what the bridge fetched is bounded by them, not by luck.
    size = 96 << 20
    body = b"".join(b"%07d " % n + b"x" * 60 + b"\r\n" for n in range(size // 70))
    mailbox.append([b"Subject: big\r\n\r\n" + body])
    bridge = bridge_factory(
        pop3={"send_timeout_seconds": 1},
        upstream={"fetch_chunk": 65536},
        pool={"park_seconds": 0},  # so the IMAP connection logs out and Dovecot reports its bytes
    )
    client = socket.create_connection(("127.0.0.1", bridge.port), timeout=60)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.recv(100)
        client.sendall(f"USER {mailbox.user}\r\nPASS {mailbox.password}\r\n".encode())
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += client.recv(100)
        assert replies.endswith(b"+OK logged in.\r\n"), replies
        client.sendall(b"RETR 1\r\n")
        # ...and never reads again.
        end = wait_for_event(bridge, "session_end", user=mailbox.user)
        assert end["outcome"] == "send_timeout"
        assert wait_for_event(bridge, "client_not_reading")["seconds"] == 1
    finally:
        client.close()
    # The bridge fetched only what the socket buffers could take, not the whole message.
    logout = wait_until(lambda: _logout_line(dovecot, mailbox.user), "Dovecot's logout line for the bridge's session")
    fetched = int(re.search(r"\bout=(\d+)", logout).group(1))  # type: ignore[union-attr]
    assert fetched < size // 2, f"{fetched} of {size} bytes fetched for a client that read nothing"
    # The bridge closed that connection itself, the rest of the literal still on its way:
    # logged as routine, not as a connection the server broke.
    dropped = [(e["level"], e["reason"]) for e in bridge.events() if e["event"] == "pool_connection_dropped"]
    assert dropped == [("debug", "abandoned")]


def _logout_line(dovecot: DovecotSandbox, user: str) -> str | None:
    lines = [
        line
        for line in dovecot.log_path.read_text(errors="replace").splitlines()
        if f"imap({user})" in line and "Disconnected" in line and "out=" in line
    ]
    # The first one is the seeding's APPEND session; the bridge's comes after it.
    return lines[1] if len(lines) > 1 else None


def test_total_session_timeout(bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox) -> None:
    bridge = bridge_factory(pop3={"session_timeout_seconds": 1})
    with RawClient(bridge.port) as client:
        client.login(mailbox.user, mailbox.password)
        # Busy, not idle: autologout (600 s) would never fire.
        while not client.closed_by_server():
            try:
                client.send(b"NOOP\r\n")
                assert client.status() == b"+OK\r\n"
            except (ConnectionError, OSError):
                break
    end = wait_for_event(bridge, "session_end", user=mailbox.user)
    assert end["outcome"] == "session_timeout"


def test_a_client_that_does_not_log_in_in_time_is_closed(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    """Without it, a connection that never logs in held its slot until the 10-minute
    autologout, busy or not: one IPv6 /56 (256 /64s of 100 connections each) could hold every
    slot of the service. A client that keeps talking without logging in is closed too."""
    bridge = bridge_factory(pop3={"login_timeout_seconds": 1})
    with RawClient(bridge.port) as early, RawClient(bridge.port) as idler:
        early.login(mailbox.user, mailbox.password)
        while not idler.closed_by_server():
            try:
                _status, body = idler.command_multiline(b"CAPA")  # busy, never logging in
                assert b"USER\r\n" in body
            except (ConnectionError, OSError):
                break
        end = wait_for_event(bridge, "session_end", outcome="login_timeout")
        assert wait_for_event(bridge, "login_timeout", session=end["session"])["seconds"] == 1
        # A session that logged in in time is not affected, however long it lasts.
        assert early.command(b"STAT") == b"+OK 0 0\r\n"
