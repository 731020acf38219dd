"""Read-ahead for a client downloading in order, against a real Dovecot, on both engines.

What a user sees: every message exactly as Dovecot's own POP3 serves it, with or without the
read-ahead, in order or not, with DELE in between; what an operator sees: the RETRs answered
from the read-ahead (`bridge_readahead_hits_total`), none once `upstream.readahead_max_bytes`
is 0.
"""

from __future__ import annotations

import poplib
import socket
from pathlib import Path

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import SubprocessBridge, free_port
from tests.integration.ops_support import quiet_metrics, value

pytestmark = pytest.mark.usefixtures("on_every_engine")

COUNT = 600


def _download(port: int, mailbox: Mailbox, numbers: list[int], delete: bool = False) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        client.user(mailbox.user)
        client.pass_(mailbox.password)
        got = []
        for number in numbers:
            got.append(b"\r\n".join(client.retr(number)[1]))
            if delete:
                client.dele(number)
        client.quit()
        return got
    finally:
        client.close()


def _bridge(tmp_path: Path, mailbox: Mailbox, admin_port: int, env: dict[str, str] | None = None) -> SubprocessBridge:
    return SubprocessBridge(tmp_path, mailbox.imap_port, f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n', env=env)


def test_a_download_in_order_is_served_from_the_read_ahead(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(COUNT))
    numbers = list(range(1, COUNT + 1))
    expected = _download(mailbox.pop3_port, mailbox, numbers)
    admin_port = free_port()
    with _bridge(tmp_path, mailbox, admin_port) as bridge:
        before = quiet_metrics(admin_port)
        assert _download(bridge.port, mailbox, numbers) == expected
        # Out of order, and again: the same messages, from wherever the bridge finds them.
        shuffled = numbers[300:] + numbers[:300][::-1]
        assert _download(bridge.port, mailbox, shuffled) == [expected[n - 1] for n in shuffled]
        after = quiet_metrics(admin_port)
    hits = value(after, "bridge_readahead_hits_total") - value(before, "bridge_readahead_hits_total")
    # The first download: every message but the first came from the read-ahead. The second
    # read 301..600 in order (as a device downloading only its new messages does: read ahead
    # but its first), then went backwards (never read ahead).
    assert hits == (COUNT - 1) + (COUNT - 300 - 1)


def test_deletions_in_between_and_every_message_once(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(COUNT))
    numbers = list(range(1, COUNT + 1))
    expected = _download(mailbox.pop3_port, mailbox, numbers)
    with _bridge(tmp_path, mailbox, free_port()) as bridge:
        assert _download(bridge.port, mailbox, numbers, delete=True) == expected
    assert mailbox.observer().uids() == []


def test_no_read_ahead_without_budget(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(50))
    numbers = list(range(1, 51))
    expected = _download(mailbox.pop3_port, mailbox, numbers)
    admin_port = free_port()
    with _bridge(tmp_path, mailbox, admin_port, {"BRIDGE_UPSTREAM__READAHEAD_MAX_BYTES": "0"}) as bridge:
        before = quiet_metrics(admin_port)
        assert _download(bridge.port, mailbox, numbers) == expected
        after = quiet_metrics(admin_port)
    assert value(after, "bridge_readahead_hits_total") == value(before, "bridge_readahead_hits_total")


def _conversation(port: int, mailbox: Mailbox, writes: list[bytes]) -> list[bytes]:
    """Logs in, sends each of `writes` as one write (a write may hold several commands) and
    returns every reply in order: a status line, or for +OK to RETR and TOP the whole reply."""
    replies: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for line in (b"USER %s\r\n" % mailbox.user.encode(), b"PASS %s\r\n" % mailbox.password.encode()):
            sock.sendall(line)
            assert reader.readline().startswith(b"+OK")
        for write in writes:
            sock.sendall(write)
            for command in write.splitlines():
                status = reader.readline()
                if not (status.startswith(b"+OK") and command.upper()[:4] in (b"RETR", b"TOP ")):
                    # The texts differ between servers; whether it worked does not.
                    replies.append(status[:3])
                    continue
                body = b""
                while not body.endswith(b"\r\n.\r\n"):
                    body += reader.readline()
                replies.append(body)
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"+OK")
    return replies


def test_replies_made_in_advance_match_dovecot_whatever_the_client_sends_next(
    mailbox: Mailbox, tmp_path: Path
) -> None:
    """The bridge makes the reply to the next RETR while the client reads the last one; what
    the client sends instead (the command in lower case, a DELE of that very message, two
    RETRs in one write, a jump backwards) gets what Dovecot's own POP3 gives."""
    mailbox.append(numbered_messages(40))
    writes = [
        b"RETR 1\r\n",
        b"retr 2\r\n",
        b"DELE 3\r\n",
        b"RETR 3\r\n",  # marked after its reply was made: refused
        b"RETR 4\r\n",
        b"RETR 5\r\nRETR 6\r\n",
        b"RSET\r\n",
        b"RETR 3\r\n",
        b"RETR 1\r\n",
        b"RETR 2\r\n",
        b"TOP 3 0\r\n",
        b"RETR 3\r\n",
        b"NOOP\r\nRETR 4\r\n",
    ]
    expected = _conversation(mailbox.pop3_port, mailbox, writes)
    assert expected[3] == b"-ER" and expected[0].endswith(b"end of message 1\r\n.\r\n")
    admin_port = free_port()
    with _bridge(tmp_path, mailbox, admin_port) as bridge:
        assert _conversation(bridge.port, mailbox, writes) == expected
    # Nothing was deleted: no QUIT after the DELE was left standing.
    assert len(mailbox.observer().uids()) == 40
