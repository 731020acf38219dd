"""pool.max_connections caps every IMAP connection of the process (bridge.imap.capacity), and
sessions hold theirs only while a command uses it (bridge.session.upstream): against a real
Dovecot, on both engines, counting the connections Dovecot itself has open.

What users see: many devices connected through a few IMAP connections, each still getting its
own messages, UIDLs and deletions; a session whose maildrop changed under it while it had no
connection is refused rather than served other messages; a login that finds every connection
busy waits at most upstream.timeout_seconds and hears -ERR [SYS/TEMP]."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import psutil
import pytest

from bridge.ops import metrics
from sandbox import DovecotSandbox, Mailbox, big_message, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, retr_payload
from tests.integration.test_faults_concurrent import MAILDROP, recreate, retr

pytestmark = pytest.mark.usefixtures("on_every_engine")


def connections_at(dovecot: DovecotSandbox) -> int:
    """IMAP connections Dovecot has open now (the server's end of each)."""
    return sum(
        1
        for conn in psutil.net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == dovecot.imap_port and conn.status == psutil.CONN_ESTABLISHED
    )


@contextmanager
def logged_in(bridge: ThreadedBridge, box: Mailbox) -> Iterator[RawPop3]:
    with RawPop3("127.0.0.1", bridge.port) as raw:
        assert raw.command(b"USER " + box.user.encode()).startswith(b"+OK")
        assert raw.command(b"PASS " + box.password.encode()).startswith(b"+OK")
        yield raw


def _evictions(reason: str) -> float:
    return metrics.POOL_EVICTIONS.labels(reason)._value.get()  # in-process bridge: same registry


def test_many_sessions_share_two_connections(dovecot: DovecotSandbox, bridge_factory: Callable[..., ThreadedBridge]) -> None:
    boxes = [dovecot.new_mailbox() for _ in range(6)]
    corpora = [list(numbered_messages(2, start=10 * n)) for n in range(len(boxes))]
    for box, corpus in zip(boxes, corpora, strict=True):
        box.append(corpus)
    bridge = bridge_factory(pool={"max_connections": 2})
    before = _evictions("idle_session")
    most = 0
    with ExitStack() as stack:
        sessions = []
        for box in boxes:
            raw = stack.enter_context(logged_in(bridge, box))
            assert raw.command(b"STAT").startswith(b"+OK 2 ")
            sessions.append(raw)
            most = max(most, connections_at(dovecot))
        # Each session, in turn, needs the server again: its connection was taken back for
        # the later logins, and it gets one for RETR and for QUIT.
        for raw, corpus in zip(sessions, corpora, strict=True):
            status, body = retr(raw, 2)
            assert status.startswith(b"+OK") and body == retr_payload(corpus[1])
            assert raw.command(b"DELE 1").startswith(b"+OK")
            most = max(most, connections_at(dovecot))
        for raw in sessions:
            assert raw.command(b"QUIT") == b"+OK bye\r\n"
            most = max(most, connections_at(dovecot))
    assert most <= 2
    assert _evictions("idle_session") - before >= len(boxes) - 2
    for box, corpus in zip(boxes, corpora, strict=True):
        observer = box.observer()
        assert [observer.fetch(uid) for uid in observer.uids()] == [corpus[1]]


def test_a_session_whose_maildrop_was_recreated_while_it_had_no_connection(
    dovecot: DovecotSandbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    first, second = dovecot.new_mailbox(), dovecot.new_mailbox()
    for box in (first, second):
        box.append([b"Subject: x\r\n\r\nx\r\n"])
    import imaplib

    imap = imaplib.IMAP4(first.host, first.imap_port, timeout=30)
    imap.login(first.user, first.password)
    assert imap.create(MAILDROP)[0] == "OK"
    imap.logout()
    old = list(numbered_messages(3))
    first.append(old, mailbox=MAILDROP)
    bridge = bridge_factory(pool={"max_connections": 1}, upstream={"mailbox": MAILDROP})
    with logged_in(bridge, first) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 3 ")
        # Another account's login takes this session's only connection ...
        second_imap = imaplib.IMAP4(second.host, second.imap_port, timeout=30)
        second_imap.login(second.user, second.password)
        assert second_imap.create(MAILDROP)[0] == "OK"
        second_imap.logout()
        with logged_in(bridge, second) as other:
            assert other.command(b"STAT").startswith(b"+OK 0 ")
            assert other.command(b"QUIT") == b"+OK bye\r\n"
        # ... and the folder is recreated meanwhile: the same UIDs now name other messages.
        new = list(numbered_messages(3, start=100))
        new_uids = recreate(first, MAILDROP, new)
        status, body = retr(raw, 2)
        assert status.startswith(b"-ERR") and body != retr_payload(new[1])
        for number in (1, 2, 3):
            raw.command(b"DELE %d" % number)
        assert raw.command(b"QUIT").startswith(b"-ERR [SYS/TEMP]")
    observer = first.observer(MAILDROP)
    assert observer.uids() == new_uids and [observer.fetch(uid) for uid in new_uids] == new


@pytest.mark.bridge_errors()
def test_a_login_that_finds_every_connection_busy_waits_then_hears_sys_temp(
    dovecot: DovecotSandbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    busy, waiting = dovecot.new_mailbox(), dovecot.new_mailbox()
    busy.append([big_message(48 * 1024 * 1024, tag="busy")])
    bridge = bridge_factory(pool={"max_connections": 1}, upstream={"timeout_seconds": 2})
    full_before = metrics.POOL_FULL._value.get()
    with logged_in(bridge, busy) as raw:
        # A RETR its client does not read: the session is inside a command and keeps its
        # connection (the send stalls once the socket buffers are full).
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.sock.sendall(b"RETR 1\r\n")
        raw.sock.recv(1024)
        with RawPop3("127.0.0.1", bridge.port) as late:
            assert late.command(b"USER " + waiting.user.encode()).startswith(b"+OK")
            assert late.command(b"PASS " + waiting.password.encode()) == (
                b"-ERR [SYS/TEMP] mail server unavailable, try again later\r\n"
            )
        assert metrics.POOL_FULL._value.get() == full_before + 1
        assert connections_at(dovecot) <= 1


def test_logins_at_once_beyond_the_cap_all_get_in(dovecot: DovecotSandbox, bridge_factory: Callable[..., ThreadedBridge]) -> None:
    """Twelve devices logging in at the same moment through three connections: each waits for
    a session that finished its login to go idle, and takes its connection (they waited out
    their timeout before, when only a closed connection woke them)."""
    from concurrent.futures import ThreadPoolExecutor

    boxes = [dovecot.new_mailbox() for _ in range(12)]
    for box in boxes:
        box.append([b"Subject: x\r\n\r\nx\r\n"])
    bridge = bridge_factory(pool={"max_connections": 3}, upstream={"timeout_seconds": 20})
    with ExitStack() as stack:

        def log_in(box: Mailbox) -> bytes:
            raw = stack.enter_context(logged_in(bridge, box))
            return raw.command(b"STAT")

        with ThreadPoolExecutor(max_workers=len(boxes)) as pool:
            answers = list(pool.map(log_in, boxes))
        assert all(answer.startswith(b"+OK 1 ") for answer in answers), answers
        assert connections_at(dovecot) <= 3
