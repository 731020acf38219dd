"""Another IMAP client changes the maildrop while a POP3 session has it open (expunges,
flags, moves messages, or deletes and recreates the folder, which changes its UIDVALIDITY).
The POP3 session must never serve one message under another's number, never delete a
message it did not mark, and go on where it can.
"""

from __future__ import annotations

import imaplib
from collections.abc import Callable

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, pop3_unstuff, retr_payload

MAILDROP = "Maildrop"
CLIENT_TIMEOUT = 60.0


def client(bridge: ThreadedBridge, box: Mailbox) -> RawPop3:
    raw = RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT)
    raw.login(box.user, box.password)
    return raw


def retr(raw: RawPop3, number: int) -> tuple[bytes, bytes | None]:
    status, body = raw.command_multiline(b"RETR %d" % number)
    return status, (pop3_unstuff(body) if status.startswith(b"+OK") else None)


def uidls(raw: RawPop3) -> list[bytes]:
    status, body = raw.command_multiline(b"UIDL")
    assert status.startswith(b"+OK")
    return [line.split()[1] for line in body.split(b"\r\n") if line and line != b"."]


def test_message_expunged_by_another_client_during_the_session(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    with client(bridge, mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 3 ")
        mailbox.observer().expunge([uids[1]])
        status, body = retr(raw, 2)
        assert status.startswith(b"-ERR") and not status.startswith(b"-ERR [SYS/TEMP]")
        # The session goes on: the other messages are served, and marking the vanished one
        # is harmless.
        assert retr(raw, 3)[1] == retr_payload(messages[2])
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"DELE 3").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    observer = mailbox.observer()
    assert observer.uids() == [uids[0]]
    assert observer.fetch(uids[0]) == messages[0]


def test_message_flagged_deleted_by_another_client_is_left_to_that_client(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    with client(bridge, mailbox) as raw:
        other = mailbox.observer()
        other.store_flags([uids[0]], ["\\Deleted"])
        # Still there, so still served: the snapshot was taken before the flag.
        assert retr(raw, 1)[1] == retr_payload(messages[0])
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    # UID EXPUNGE removed exactly the marked message, not the one the other client flagged.
    flags = {info.uid: info.flags for info in mailbox.observer().messages()}
    assert sorted(flags) == [uids[0], uids[2]]
    assert "\\Deleted" in flags[uids[0]] and "\\Deleted" not in flags[uids[2]]
    # The next session leaves out the flagged message.
    with client(bridge, mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 1 ")
        assert retr(raw, 1)[1] == retr_payload(messages[2])


def test_flags_and_keywords_set_by_another_client_change_nothing(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    messages = list(numbered_messages(2))
    uids = mailbox.append(messages).uids
    with client(bridge, mailbox) as raw:
        before = uidls(raw)
        mailbox.observer().store_flags(uids, ["\\Seen", "\\Flagged", "$Label1"])
        assert retr(raw, 1)[1] == retr_payload(messages[0])
        assert raw.command(b"LIST 2").split()[2] == str(len(messages[1])).encode()
        assert raw.command(b"QUIT").startswith(b"+OK")
    with client(bridge, mailbox) as raw:
        assert uidls(raw) == before
    flags = {info.uid: info.flags for info in mailbox.observer().messages()}
    assert all({"\\Seen", "\\Flagged", "$Label1"} <= flags[uid] for uid in uids)


def test_message_moved_by_another_client_during_the_session(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    other = mailbox.observer()
    other.imap.create("Archive")
    with client(bridge, mailbox) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 3 ")
        typ, _ = other.imap.uid("MOVE", str(uids[0]), "Archive")
        assert typ == "OK"
        assert retr(raw, 1)[0].startswith(b"-ERR")
        assert retr(raw, 2)[1] == retr_payload(messages[1])
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    # The moved message is intact where the other client put it; nothing else was touched.
    archive = mailbox.observer("Archive")
    assert [archive.fetch(uid) for uid in archive.uids()] == [messages[0]]
    assert mailbox.observer().uids() == uids[1:]


# -- UIDVALIDITY ------------------------------------------------------------------------------


def recreate(box: Mailbox, folder: str, messages: list[bytes]) -> list[int]:
    """Delete and recreate `folder` with new messages (a new UIDVALIDITY, old UIDs reused)."""
    imap = imaplib.IMAP4(box.host, box.imap_port, timeout=30)
    try:
        imap.login(box.user, box.password)
        imap.delete(f'"{folder}"')
        assert imap.create(f'"{folder}"')[0] == "OK"
    finally:
        imap.logout()
    return box.append(messages, mailbox=folder).uids


@pytest.fixture
def maildrop_box(mailbox: Mailbox) -> Mailbox:
    imap = imaplib.IMAP4(mailbox.host, mailbox.imap_port, timeout=30)
    try:
        imap.login(mailbox.user, mailbox.password)
        assert imap.create(MAILDROP)[0] == "OK"
    finally:
        imap.logout()
    return mailbox


@pytest.mark.parametrize("policy", ["expunge", "per-client"])
def test_uidvalidity_change_between_sessions(
    bridge_factory: Callable[..., ThreadedBridge], maildrop_box: Mailbox, policy: str
) -> None:
    box = maildrop_box
    bridge = bridge_factory(upstream={"mailbox": MAILDROP}, delete={"policy": policy})
    old = list(numbered_messages(3))
    old_uids = box.append(old, mailbox=MAILDROP).uids
    with client(bridge, box) as raw:
        first = uidls(raw)
        # per-client: the device hides message 1 in its state (for this UIDVALIDITY)
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")

    new = list(numbered_messages(3, start=100))
    new_uids = recreate(box, MAILDROP, new)
    assert new_uids == old_uids  # the server reused the UIDs: only UIDVALIDITY tells them apart

    with client(bridge, box) as raw:
        second = uidls(raw)
        # New UIDVALIDITY, new UIDLs: the device downloads the new messages, and no old
        # per-device state hides any of them.
        assert len(second) == 3 and not set(second) & set(first)
        assert [retr(raw, n)[1] for n in (1, 2, 3)] == [retr_payload(m) for m in new]
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    observer = box.observer(MAILDROP)
    if policy == "expunge":
        assert observer.uids() == [new_uids[0], new_uids[2]]
    else:
        assert observer.uids() == new_uids
    for uid in observer.uids():
        assert observer.fetch(uid) in new


@pytest.mark.parametrize("engine", ["trio", "aioimaplib"])
@pytest.mark.parametrize("policy", ["expunge", "per-client", "move"])
def test_uidvalidity_change_during_a_session(
    bridge_factory: Callable[..., ThreadedBridge], maildrop_box: Mailbox, policy: str, engine: str
) -> None:
    """Dovecot keeps a session's view of a folder deleted and recreated behind its back, and
    would apply the old UIDs to the new messages: the bridge must check before it changes
    anything (found by this test: `move` moved the three unmarked new messages)."""
    box = maildrop_box
    bridge = bridge_factory(
        upstream={"mailbox": MAILDROP, "engine": engine}, delete={"policy": policy, "expire_after_days": 1}
    )
    old = list(numbered_messages(3))
    box.append(old, mailbox=MAILDROP)
    new = list(numbered_messages(3, start=100))
    with client(bridge, box) as raw:
        assert retr(raw, 1)[1] == retr_payload(old[0])
        new_uids = recreate(box, MAILDROP, new)
        # Message 2 of this session no longer exists; UID 2 now names another message,
        # which must not be served in its place.
        status, body = retr(raw, 2)
        assert status.startswith(b"-ERR") or body == retr_payload(old[1])
        assert body != retr_payload(new[1])
        for n in (1, 2, 3):
            raw.command(b"DELE %d" % n)
        # The deletions belong to the old folder: refused, as docs/design.md ("Deletion,
        # exactly") and docs/devices.md ("Errors a device can see") say.
        assert raw.command(b"QUIT") == b"-ERR [SYS/TEMP] could not apply the deletions on the mail server; try again\r\n"
    # None of the new messages (which nobody marked) is gone.
    observer = box.observer(MAILDROP)
    assert observer.uids() == new_uids
    assert [observer.fetch(uid) for uid in new_uids] == new
    assert all("\\Deleted" not in info.flags for info in observer.messages())
