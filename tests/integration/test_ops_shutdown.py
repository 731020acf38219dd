"""Graceful shutdown of the real `python -m bridge serve` process (SIGTERM/SIGINT).

What an operator relies on: readiness turns false at once, no new connections are taken,
sessions in progress may finish within `pop3.shutdown_grace_seconds` (including their QUIT),
sessions still open after it are closed without applying their DELE marks, and the process
exits 0.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from sandbox import Mailbox, big_message, numbered_messages
from tests.harness import RawPop3, SubprocessBridge, free_port, pop3_unstuff
from tests.integration.ops_support import (
    events_named,
    http_get,
    wait_for,
    wait_for_event,
    wait_for_exit,
)


def _bridge(tmp_path: Path, mailbox: Mailbox, grace_seconds: float) -> tuple[SubprocessBridge, int]:
    admin_port = free_port()
    bridge = SubprocessBridge(
        tmp_path,
        mailbox.imap_port,
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nreadiness_cache_seconds = 0\n',
        # The sandbox Dovecot speaks plain IMAP on loopback.
        env={"BRIDGE_POP3__SHUTDOWN_GRACE_SECONDS": str(grace_seconds), "BRIDGE_UPSTREAM__TLS": "none"},
    )
    return bridge, admin_port


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_lets_a_retrieval_in_progress_finish_and_quit(mailbox: Mailbox, tmp_path: Path) -> None:
    message = big_message(8 * 1024 * 1024, tag="shutdown")
    mailbox.append([message])
    bridge, admin_port = _bridge(tmp_path, mailbox, grace_seconds=300)
    with bridge, RawPop3("127.0.0.1", bridge.port) as client:
        assert bridge.process is not None
        # A small receive buffer: the bridge can only send as fast as this client reads.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        client.login(mailbox.user, mailbox.password)
        client.send(b"RETR 1\r\n")
        assert client.status().startswith(b"+OK")
        received = bytearray(client.take_buffered() or client.sock.recv(16 * 1024))
        assert received and not received.endswith(b"\r\n.\r\n")

        bridge.process.send_signal(signal.SIGTERM)
        wait_for_event(bridge, "shutdown", signal="SIGTERM")
        wait_for(lambda: _refuses_connections(bridge.port), "the POP3 listener to close")
        status, body, _ = http_get(admin_port, "/readyz")
        assert (status, body) == (503, "shutting down\n")
        assert http_get(admin_port, "/healthz")[0] == 200

        # The client keeps reading, slowly but steadily, and gets the whole message.
        while not received.endswith(b"\r\n.\r\n"):
            chunk = client.sock.recv(16 * 1024)
            assert chunk, "the bridge closed the connection in the middle of RETR"
            received += chunk
            time.sleep(0.001)
        assert pop3_unstuff(bytes(received)) == message
        assert client.command(b"DELE 1").startswith(b"+OK")
        assert client.command(b"QUIT").startswith(b"+OK")
        assert client.at_eof()

        assert wait_for_exit(bridge) == 0
    assert mailbox.observer().uids() == []  # the QUIT within the grace period applied the DELE
    assert [e["outcome"] for e in events_named(bridge, "session_end") if e.get("user")] == ["quit"]
    assert events_named(bridge, "deletions_applied", count=1)
    assert not events_named(bridge, "shutdown_sessions_closed")


def test_session_still_open_after_the_grace_period_is_closed_without_deleting(
    mailbox: Mailbox, tmp_path: Path
) -> None:
    uids = mailbox.append(numbered_messages(3)).uids
    bridge, _admin_port = _bridge(tmp_path, mailbox, grace_seconds=1)
    with bridge, RawPop3("127.0.0.1", bridge.port) as client:
        assert bridge.process is not None
        client.login(mailbox.user, mailbox.password)
        assert client.command(b"DELE 1").startswith(b"+OK")
        assert client.command(b"DELE 2").startswith(b"+OK")

        bridge.process.send_signal(signal.SIGTERM)
        # The client never sends QUIT; the bridge hangs up once the grace period is over.
        assert client.at_eof()
        assert wait_for_exit(bridge) == 0

    observer = mailbox.observer()
    assert observer.uids() == list(uids)
    assert all("\\Deleted" not in observer.flags(uid) for uid in uids)
    assert [e["outcome"] for e in events_named(bridge, "session_end") if e.get("user")] == ["shutdown"]
    assert events_named(bridge, "shutdown_sessions_closed")
    assert not events_named(bridge, "deletions_applied")


def test_readyz_is_false_at_once_and_a_second_signal_ends_the_grace(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(1))
    bridge, admin_port = _bridge(tmp_path, mailbox, grace_seconds=3600)
    with bridge, RawPop3("127.0.0.1", bridge.port) as client:
        assert bridge.process is not None
        assert http_get(admin_port, "/readyz")[0] == 200
        client.login(mailbox.user, mailbox.password)
        assert client.command(b"DELE 1").startswith(b"+OK")

        bridge.process.send_signal(signal.SIGTERM)
        # Right after the signal, with the session still open, the pod is drained.
        wait_for_event(bridge, "shutdown")
        status, body, _ = http_get(admin_port, "/readyz")
        assert (status, body) == (503, "shutting down\n")
        assert http_get(admin_port, "/healthz")[0] == 200
        assert bridge.process.poll() is None  # still waiting for the session

        bridge.process.send_signal(signal.SIGINT)
        assert client.at_eof()
        assert wait_for_exit(bridge) == 0
    assert len(mailbox.observer().uids()) == 1
    assert events_named(bridge, "shutdown_now", signal="SIGINT")


def test_sigint_without_sessions_exits_0(mailbox: Mailbox, tmp_path: Path) -> None:
    bridge, _admin_port = _bridge(tmp_path, mailbox, grace_seconds=30)
    with bridge:
        assert bridge.process is not None
        bridge.process.send_signal(signal.SIGINT)
        assert wait_for_exit(bridge) == 0
    assert events_named(bridge, "shutdown", signal="SIGINT")
