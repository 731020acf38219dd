"""Deletion as a mailbox owner sees it: only QUIT applies DELE, only to the marked messages,
and nothing other IMAP clients do to the folder is undone or finished by the bridge."""

from __future__ import annotations

import poplib
from collections.abc import Callable

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import (
    Pop3Client,
    RawPop3,
    ThreadedBridge,
    pop3_unstuff,
    poplib_payload,
    wait_for_event,
)


def upstream_uids(mailbox: Mailbox) -> list[int]:
    """The folder's UIDs as a fresh, independent IMAP session sees them."""
    observer = mailbox.observer()
    try:
        return observer.uids()
    finally:
        observer.close()


def test_dele_then_quit_removes_exactly_the_marked_messages(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(6))
    uids = mailbox.append(messages).uids
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        for n in (2, 3, 6):
            assert pop.dele(n).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")
    # QUIT's +OK comes only after the server confirmed the expunge: no waiting needed.
    assert upstream_uids(mailbox) == [uids[0], uids[3], uids[4]]
    observer = mailbox.observer()
    for uid in (uids[0], uids[3], uids[4]):
        assert "\\Deleted" not in observer.flags(uid)

    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        assert pop.stat()[0] == 3
        for n, original in enumerate((messages[0], messages[3], messages[4]), 1):
            assert poplib_payload(pop.retr(n)[1]) == original


def test_dele_then_dropped_connection_removes_nothing(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    uids = mailbox.append(numbered_messages(4)).uids
    raw = RawPop3("127.0.0.1", bridge.port)
    try:
        raw.login(mailbox.user, mailbox.password)
        for n in (1, 2, 3, 4):
            assert raw.command(b"DELE %d" % n).startswith(b"+OK")
        assert raw.command(b"STAT") == b"+OK 0 0\r\n"
    finally:
        raw.close()  # no QUIT
    wait_for_event(bridge, "session_end", user=mailbox.user)
    assert upstream_uids(mailbox) == uids
    observer = mailbox.observer()
    assert all("\\Deleted" not in observer.flags(uid) for uid in uids)
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        assert pop.stat()[0] == 4


def test_rset_undoes_the_marks(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    messages = list(numbered_messages(4))
    uids = mailbox.append(messages).uids
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        full = pop.stat()
        pop.dele(1)
        pop.dele(2)
        assert pop.stat()[0] == 2
        assert pop.rset().startswith(b"+OK")
        assert pop.stat() == full
        assert len(pop.list()[1]) == 4
        assert poplib_payload(pop.retr(1)[1]) == messages[0]
        assert pop.dele(3).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")
    assert upstream_uids(mailbox) == [uids[0], uids[1], uids[3]]


def test_mail_arriving_mid_session_is_not_listed_and_survives_quit(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    old = list(numbered_messages(3))
    mailbox.append(old)
    new = list(numbered_messages(1, start=100))
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        listed = pop.stat()
        assert listed[0] == 3
        (new_uid,) = mailbox.append(new).uids  # after PASS
        assert pop.stat() == listed
        assert len(pop.list()[1]) == 3
        assert len(pop.uidl()[1]) == 3
        with pytest.raises(poplib.error_proto):
            pop.retr(4)
        for n in (1, 2, 3):
            assert pop.dele(n).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")
    assert upstream_uids(mailbox) == [new_uid]
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        assert pop.stat() == (1, len(new[0]))
        assert poplib_payload(pop.retr(1)[1]) == new[0]


def test_message_flagged_deleted_by_another_client_is_hidden_and_left_alone(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(4))
    uids = mailbox.append(messages).uids
    observer = mailbox.observer()
    observer.store_flags([uids[1]], ["\\Deleted"])  # flagged, not expunged

    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        visible = [messages[0], messages[2], messages[3]]
        assert pop.stat() == (3, sum(map(len, visible)))
        for n, original in enumerate(visible, 1):
            assert poplib_payload(pop.retr(n)[1]) == original
        for n in (1, 2, 3):
            pop.dele(n)
        assert pop.quit().startswith(b"+OK")

    # The other client's message is still there, still only flagged: its owner may undo it.
    assert upstream_uids(mailbox) == [uids[1]]
    assert "\\Deleted" in mailbox.observer().flags(uids[1])


@pytest.mark.parametrize("engine", ["trio", "aioimaplib"])
def test_changes_between_sessions_show_in_the_next_session(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, engine: str
) -> None:
    """Between two polls of a device, other IMAP clients deliver, flag \\Deleted and expunge
    mail. The next session lists exactly what the folder then holds (whether or not the
    bridge kept its IMAP connection between the sessions)."""
    bridge = bridge_factory(upstream={"engine": engine})
    messages = list(numbered_messages(5))
    uids = mailbox.append(messages).uids
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        assert pop.stat()[0] == 5
        assert pop.quit().startswith(b"+OK")
    wait_for_event(bridge, "session_end", user=mailbox.user)

    observer = mailbox.observer()
    observer.store_flags([uids[1]], ["\\Deleted"])
    observer.expunge([uids[3]])
    observer.store_flags([uids[4]], ["\\Seen", "\\Flagged"])
    new = list(numbered_messages(2, start=50))
    new_uids = mailbox.append(new).uids

    expected = [(uids[0], messages[0]), (uids[2], messages[2]), (uids[4], messages[4])]
    expected += list(zip(new_uids, new, strict=True))
    uidvalidity = observer.uidvalidity()
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        assert pop.stat() == (len(expected), sum(len(m) for _, m in expected))
        _, lines, _ = pop.uidl()
        assert lines == [
            b"%d %08x%08x" % (n, uid, uidvalidity) for n, (uid, _) in enumerate(expected, 1)
        ]
        for n, (_, original) in enumerate(expected, 1):
            assert poplib_payload(pop.retr(n)[1]) == original
        assert pop.quit().startswith(b"+OK")


def test_message_expunged_mid_session_gives_err_and_session_goes_on(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(4))
    uids = mailbox.append(messages).uids
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.login(mailbox.user, mailbox.password)
        assert pop.command(b"STAT").startswith(b"+OK 4 ")
        mailbox.observer().expunge([uids[1]])  # another IMAP client removes message 2

        assert pop.command_multiline(b"RETR 2")[0].startswith(b"-ERR")
        assert pop.command(b"NOOP") == b"+OK\r\n"
        assert pop.command_multiline(b"TOP 2 0")[0].startswith(b"-ERR")
        assert pop.command(b"NOOP") == b"+OK\r\n"
        # A second attempt answers the same, and the neighbours are untouched.
        assert pop.command_multiline(b"RETR 2")[0].startswith(b"-ERR")
        for n in (1, 3, 4):
            status, body = pop.command_multiline(b"RETR %d" % n)
            assert status.startswith(b"+OK"), status
            assert pop3_unstuff(body) == messages[n - 1]
        assert pop.command(b"DELE 3").startswith(b"+OK")
        assert pop.command(b"QUIT").startswith(b"+OK")
    assert upstream_uids(mailbox) == [uids[0], uids[3]]
    wait_for_event(bridge, "message_gone", uid=uids[1])
