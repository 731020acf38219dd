"""The message cache against a real Dovecot, on both engines: a big message's second RETR is
sent from the cache, byte for byte what Dovecot's own POP3 sends; only to its own account; a
RETR that broke off keeps nothing; nothing is left in the cache directory. A slow reader's
first RETR is spooled: it gets the whole message while its session holds no IMAP connection,
also when the spool's file cannot take the whole message."""

from __future__ import annotations

import poplib
import resource
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from sandbox import Mailbox, big_message
from tests.harness import RawPop3, SubprocessBridge, free_port
from tests.integration.ops_support import quiet_metrics, scrape, value, wait_for

pytestmark = pytest.mark.usefixtures("on_every_engine")

SIZE = 3 * 1024 * 1024


def _retr(port: int, mailbox: Mailbox, number: int = 1) -> bytes:
    client = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        client.user(mailbox.user)
        client.pass_(mailbox.password)
        lines = client.retr(number)[1]
        client.quit()
        return b"\r\n".join(lines)
    finally:
        client.close()


def _bridge(
    tmp_path: Path, imap_port: int, admin_port: int, cache_dir: Path, max_bytes: int = 64 << 20,
    extra: str = "", env: dict[str, str] | None = None,
) -> SubprocessBridge:
    cache_dir.mkdir(exist_ok=True)
    return SubprocessBridge(
        tmp_path, imap_port,
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f'[cache]\nmax_bytes = {max_bytes}\nmin_message_bytes = 1048576\ndirectory = "{cache_dir}"\n{extra}',
        env=env,
    )


def _hits(admin_port: int) -> float:
    return value(quiet_metrics(admin_port), "bridge_message_cache_hits_total")


def test_the_second_retr_of_a_big_message_comes_from_the_cache(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append([big_message(SIZE, tag="cached"), b"Subject: small\r\n\r\nsmall\r\n"])
    expected = _retr(mailbox.pop3_port, mailbox)
    admin_port, cache_dir = free_port(), tmp_path / "cache"
    with _bridge(tmp_path, mailbox.imap_port, admin_port, cache_dir) as bridge:
        before = _hits(admin_port)
        assert _retr(bridge.port, mailbox) == expected
        assert _hits(admin_port) == before
        assert _retr(bridge.port, mailbox) == expected
        assert _retr(bridge.port, mailbox) == expected
        assert _hits(admin_port) == before + 2
        # Small messages are never kept (the read-ahead serves those).
        assert _retr(bridge.port, mailbox, 2) == _retr(bridge.port, mailbox, 2)
        assert _hits(admin_port) == before + 2
        # The files have no names: nothing in the directory to find or to leave behind.
        assert list(cache_dir.iterdir()) == []


def test_a_kept_message_is_served_only_to_its_own_account(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two accounts whose first message has the same UID and size (and, created in the same
    second, often the same UIDVALIDITY): each gets its own."""
    alice, bob = dovecot.new_mailbox(), dovecot.new_mailbox()
    alice.append([big_message(SIZE, tag="alice")])
    bob.append([big_message(SIZE, tag="bobby")])
    admin_port = free_port()
    with _bridge(tmp_path, dovecot.imap_port, admin_port, tmp_path / "cache") as bridge:
        for _round in range(2):
            assert b"alice" in _retr(bridge.port, alice)[:4096]
            assert b"bobby" in _retr(bridge.port, bob)[:4096]


def test_a_retr_that_broke_off_keeps_nothing(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append([big_message(SIZE, tag="broken")])
    expected = _retr(mailbox.pop3_port, mailbox)
    admin_port = free_port()
    with _bridge(tmp_path, mailbox.imap_port, admin_port, tmp_path / "cache") as bridge:
        before = _hits(admin_port)
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=30) as raw:
            raw.recv(100)
            raw.sendall(b"USER %s\r\nPASS %s\r\nRETR 1\r\n" % (mailbox.user.encode(), mailbox.password.encode()))
            received = b""
            while len(received) < 100_000:
                received += raw.recv(65536)
            # Gone after the first 100 KB: the bridge never finished writing the message.
        assert _retr(bridge.port, mailbox) == expected
        assert _hits(admin_port) == before
        assert _retr(bridge.port, mailbox) == expected
        assert _hits(admin_port) == before + 1


def test_no_cache_when_it_is_off(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append([big_message(SIZE, tag="uncached")])
    expected = _retr(mailbox.pop3_port, mailbox)
    admin_port = free_port()
    with _bridge(tmp_path, mailbox.imap_port, admin_port, tmp_path / "cache", max_bytes=0) as bridge:
        before = _hits(admin_port)
        assert _retr(bridge.port, mailbox) == expected
        assert _retr(bridge.port, mailbox) == expected
        assert _hits(admin_port) == before


def _slow_retr(port: int, mailbox: Mailbox) -> socket.socket:
    """A client with a small receive buffer that logged in and sent RETR 1, and has read
    nothing but the greeting (the test reads the rest, `_read_rest`)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    sock.recv(100)
    sock.sendall(b"USER %s\r\nPASS %s\r\nRETR 1\r\n" % (mailbox.user.encode(), mailbox.password.encode()))
    return sock


def _read_rest(sock: socket.socket, received: bytes = b"", pause: float = 0.0) -> bytes:
    """What the socket gets up to the message's terminator, 4 KiB at a time with `pause`
    between reads if given."""
    while not received.endswith(b"\r\n.\r\n"):
        chunk = sock.recv(4096 if pause else 65536)
        assert chunk, "the bridge closed the connection before the message's terminator"
        received += chunk
        time.sleep(pause)
    return received


def _message_on_the_wire(port: int, mailbox: Mailbox) -> bytes:
    """RETR 1's body as the server sends it (dot-stuffed, terminator included)."""
    with RawPop3("127.0.0.1", port) as raw:
        raw.login(mailbox.user, mailbox.password)
        status, body = raw.command_multiline(b"RETR 1")
    assert status.startswith(b"+OK"), status
    return body


def _body(wire: bytes) -> bytes:
    return wire[wire.index(b"octets\r\n") + 8:]


def test_a_slow_reader_gets_its_message_from_a_spool_and_holds_no_imap_connection(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With one IMAP connection for the whole bridge, another account logs in, reads and
    quits while a slow reader is still in the middle of a big RETR: the slow reader's
    session gave its connection back once the rest of its message was spooled."""
    slow, other = dovecot.new_mailbox(), dovecot.new_mailbox()
    slow.append([big_message(6 * 1024 * 1024, tag="spooled")])
    other.append([b"Subject: small\r\n\r\nsmall\r\n"])
    expected = _message_on_the_wire(dovecot.pop3_port, slow)
    admin_port = free_port()
    # Without the spool the other account's login would wait for the slow reader's
    # connection until the upstream timeout, then be refused.
    extra, env = "[pool]\nmax_connections = 1\n", {"BRIDGE_UPSTREAM__TIMEOUT_SECONDS": "5"}
    with _bridge(tmp_path, dovecot.imap_port, admin_port, tmp_path / "cache", extra=extra, env=env) as bridge:
        before = _hits(admin_port)
        got: list[bytes] = []
        with _slow_retr(bridge.port, slow) as sock:
            # About 400 KB/s: the 6 MiB take some 15 s.
            reader = threading.Thread(target=lambda: got.append(_read_rest(sock, pause=0.01)), daemon=True)
            reader.start()
            wait_for(lambda: value(scrape(admin_port), "bridge_message_spool_bytes") > 0, "a spool for the slow reader", 30)
            client = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
            try:
                client.user(other.user)
                client.pass_(other.password)
                assert client.retr(1)[1] == [b"Subject: small", b"", b"small"]
                client.quit()
            finally:
                client.close()
            assert reader.is_alive(), "the slow reader had its whole message before the other account was served"
            reader.join(60)
        assert got and _body(got[0]) == expected
        # The spool was the message cache's file: the next RETR is sent from it.
        assert _retr(bridge.port, slow) == _retr(dovecot.pop3_port, slow)
        assert _hits(admin_port) == before + 1
        assert value(quiet_metrics(admin_port), "bridge_message_spool_bytes") == 0


def test_a_spool_whose_file_fills_up_still_delivers_the_whole_message(mailbox: Mailbox, tmp_path: Path) -> None:
    """The cache's file stops taking data part of the way into the spool (the bridge's file
    size limit stands in for a full disk): what it took goes out from it, the rest is
    streamed from the upstream, and nothing is kept."""
    mailbox.append([big_message(SIZE, tag="fills up")])
    expected = _message_on_the_wire(mailbox.pop3_port, mailbox)
    admin_port = free_port()
    with _bridge(tmp_path, mailbox.imap_port, admin_port, tmp_path / "cache") as bridge:
        assert bridge.process is not None
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG.
        limit = 1024 * 1024
        psutil.Process(bridge.process.pid).rlimit(psutil.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        before = _hits(admin_port)
        with _slow_retr(bridge.port, mailbox) as sock:
            received = b""
            while len(received) < 100_000:
                received += sock.recv(4096)
                time.sleep(0.01)
            assert _body(_read_rest(sock, received)) == expected
        assert _retr(bridge.port, mailbox) == _retr(mailbox.pop3_port, mailbox)
        assert _hits(admin_port) == before
        assert "message_cache_write_failed" in bridge.log_path.read_text(errors="replace")
