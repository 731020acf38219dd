"""The message cache against a real Dovecot, on both engines: a big message's second RETR is
sent from the cache, byte for byte what Dovecot's own POP3 sends; only to its own account; a
RETR that broke off keeps nothing; nothing is left in the cache directory."""

from __future__ import annotations

import poplib
import socket
from pathlib import Path

import pytest

from sandbox import Mailbox, big_message
from tests.harness import SubprocessBridge, free_port
from tests.integration.ops_support import quiet_metrics, value

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


def _bridge(tmp_path: Path, imap_port: int, admin_port: int, cache_dir: Path, max_bytes: int = 64 << 20) -> SubprocessBridge:
    cache_dir.mkdir(exist_ok=True)
    return SubprocessBridge(
        tmp_path, imap_port,
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f'[cache]\nmax_bytes = {max_bytes}\nmin_message_bytes = 1048576\ndirectory = "{cache_dir}"\n',
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
