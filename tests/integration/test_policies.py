"""Delete policies and device names, end to end: poplib devices through the real bridge,
a real Dovecot behind it, and an independent IMAP client checking what the mailbox owner
sees. README: "Several devices on one mailbox"."""

from __future__ import annotations

import poplib
from collections.abc import Callable

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import ENGINES, Pop3Client, RawPop3, ThreadedBridge, wait_for_event
from tests.integration.policy_support import (
    MOVE_FOLDER,
    STATE_FOLDER,
    folder_names,
    listing,
    poll,
    state_records,
    visible,
)

BridgeFactory = Callable[..., ThreadedBridge]
POLICIES = ["expunge", "move", "keep", "per-client"]


def seed(box: Mailbox, count: int, start: int = 1) -> list[int]:
    return box.append(list(numbered_messages(count, start=start))).uids


def dele_and_quit(port: int, login: str, password: str, numbers: list[int]) -> bytes:
    with Pop3Client(port, login, password) as pop:
        for number in numbers:
            assert pop.dele(number).startswith(b"+OK")
        return pop.quit()


def login_reply(port: int, login: str, password: str) -> bytes:
    with RawPop3("127.0.0.1", port) as pop:
        assert pop.command(b"USER " + login.encode()).startswith(b"+OK")
        reply = pop.command(b"PASS " + password.encode())
        pop.command(b"QUIT")
    return reply


# -- expunge -------------------------------------------------------------------------


def test_expunge_is_the_default_and_removes_exactly_the_marked_messages(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    uids = seed(mailbox, 4)
    observer = mailbox.observer()
    # Another IMAP client flagged message 4 \Deleted and has not expunged it yet.
    observer.store_flags([uids[3]], ["\\Deleted"])
    bridge = bridge_factory()
    assert bridge.settings.delete.policy == "expunge"
    assert visible(bridge.port, mailbox.user, mailbox.password) == [1, 2, 3]

    assert dele_and_quit(bridge.port, mailbox.user, mailbox.password, [1, 3]).startswith(b"+OK")

    observer.noop()
    assert observer.uids() == [uids[1], uids[3]]
    assert "\\Deleted" in observer.flags(uids[3])
    assert visible(bridge.port, mailbox.user, mailbox.password) == [2]
    assert MOVE_FOLDER not in folder_names(mailbox)
    assert STATE_FOLDER not in folder_names(mailbox)


# -- move ----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("ignore", "method"), [([], "MOVE"), (["MOVE"], "COPY")], ids=["imap-move", "copy-fallback"]
)
def test_move_policy_moves_exactly_the_marked_messages(
    bridge_factory: BridgeFactory, mailbox: Mailbox, ignore: list[str], method: str, engine: str
) -> None:
    uids = seed(mailbox, 5)
    observer = mailbox.observer()
    originals = {uid: observer.fetch(uid) for uid in uids}
    observer.store_flags([uids[2]], ["\\Seen"])
    observer.store_flags([uids[4]], ["\\Deleted"])  # another client's, not expunged yet
    assert MOVE_FOLDER not in folder_names(mailbox)
    bridge = bridge_factory(
        delete={"policy": "move"}, upstream={"ignore_capabilities": ignore, "engine": engine}
    )

    assert dele_and_quit(bridge.port, mailbox.user, mailbox.password, [1, 3]).startswith(b"+OK")

    assert wait_for_event(bridge, "messages_moved")["method"] == method
    assert MOVE_FOLDER in folder_names(mailbox)  # created on first use
    observer.noop()
    assert observer.uids() == [uids[1], uids[3], uids[4]]
    assert observer.flags(uids[4]) == {"\\Deleted"}
    assert observer.flags(uids[1]) == observer.flags(uids[3]) == frozenset()
    with mailbox.observer(MOVE_FOLDER) as target:
        moved = [target.fetch(uid) for uid in target.uids()]
        assert moved == [originals[uids[0]], originals[uids[2]]]
        # The copies keep their flags and never carry the \Deleted of the fallback.
        assert [info.flags for info in target.messages()] == [frozenset(), {"\\Seen"}]

    # The folder exists now; the next session moves into it too.
    assert dele_and_quit(bridge.port, mailbox.user, mailbox.password, [1]).startswith(b"+OK")
    observer.noop()
    assert observer.uids() == [uids[3], uids[4]]
    with mailbox.observer(MOVE_FOLDER) as target:
        assert [target.fetch(uid) for uid in target.uids()] == [originals[uids[i]] for i in (0, 2, 1)]
    assert visible(bridge.port, mailbox.user, mailbox.password) == [4]


def test_move_folder_can_be_set_per_account(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    uids = seed(mailbox, 2)
    bridge = bridge_factory(
        delete={"policy": "expunge", "accounts": {mailbox.user: {"policy": "move", "folder": "Done.POP"}}}
    )
    assert dele_and_quit(bridge.port, mailbox.user, mailbox.password, [2]).startswith(b"+OK")
    with mailbox.observer("Done.POP") as target:
        assert len(target.uids()) == 1
    observer = mailbox.observer()
    assert observer.uids() == [uids[0]]
    assert MOVE_FOLDER not in folder_names(mailbox)


# -- keep ----------------------------------------------------------------------------


def test_keep_policy_deletes_nothing_and_marks_downloaded_mail_seen(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    uids = seed(mailbox, 3)
    bridge = bridge_factory(delete={"policy": "keep"})
    before = listing(bridge.port, mailbox.user, mailbox.password)

    assert poll(bridge.port, mailbox.user, mailbox.password, delete=False) == [1, 2, 3]
    assert dele_and_quit(bridge.port, mailbox.user, mailbox.password, [1, 2]).startswith(b"+OK")

    observer = mailbox.observer()
    assert observer.uids() == uids
    assert [info.flags for info in observer.messages()] == [{"\\Seen"}, {"\\Seen"}, frozenset()]
    # The device sees them again, with the same UIDLs.
    assert listing(bridge.port, mailbox.user, mailbox.password) == before
    assert MOVE_FOLDER not in folder_names(mailbox)


# -- per-client ------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_per_client_hides_a_message_from_the_deleting_device_only(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    uids = seed(mailbox, 3)
    bridge = bridge_factory(delete={"policy": "per-client"}, upstream={"engine": engine})
    user, password = mailbox.user, mailbox.password
    phone, laptop, tablet = f"{user}#phone", f"{user}#laptop", f"{user}#tablet"
    observer = mailbox.observer()
    flags_before = observer.messages()

    assert poll(bridge.port, phone, password) == [1, 2, 3]
    assert visible(bridge.port, phone, password) == []
    assert visible(bridge.port, laptop, password) == [1, 2, 3]
    assert visible(bridge.port, user, password) == [1, 2, 3]  # the "default" device

    assert dele_and_quit(bridge.port, laptop, password, [2]).startswith(b"+OK")
    assert visible(bridge.port, laptop, password) == [1, 3]
    # A device that never deletes keeps seeing everything, session after session.
    for _ in range(3):
        assert poll(bridge.port, tablet, password, delete=False) == [1, 2, 3]

    # IMAP users see every message, with the flags they had.
    observer.noop()
    assert observer.uids() == uids
    assert observer.messages() == flags_before
    # Mail arriving later reaches the device that had hidden everything.
    new = seed(mailbox, 1, start=4)
    assert visible(bridge.port, phone, password) == [4]
    assert listing(bridge.port, phone, password)[0][1] == listing(bridge.port, tablet, password)[3][1]
    observer.noop()
    assert observer.uids() == uids + new


# -- a session that never QUITs --------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_session_ending_without_quit_changes_nothing(
    bridge_factory: BridgeFactory, mailbox: Mailbox, policy: str, engine: str
) -> None:
    seed(mailbox, 3)
    bridge = bridge_factory(delete={"policy": policy, "expire_after_days": 1}, upstream={"engine": engine})
    observer = mailbox.observer()
    before = observer.messages()
    login = f"{mailbox.user}#phone"

    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.login(login, mailbox.password)
        assert pop.command_multiline(b"RETR 1")[0].startswith(b"+OK")
        assert pop.command(b"DELE 1").startswith(b"+OK")
        assert pop.command(b"DELE 2").startswith(b"+OK")
    # The bridge has noticed the client is gone and ended the session.
    assert wait_for_event(bridge, "session_end", device="phone")["outcome"] != "quit"

    observer.noop()
    assert observer.messages() == before
    assert MOVE_FOLDER not in folder_names(mailbox)
    assert state_records(mailbox) == []
    assert visible(bridge.port, login, mailbox.password) == [1, 2, 3]


# -- device names -----------------------------------------------------------------------


def test_device_logins_authenticate_as_the_account(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    bridge = bridge_factory(delete={"policy": "per-client"})
    assert login_reply(bridge.port, f"{mailbox.user}#phone", mailbox.password).startswith(b"+OK")
    assert login_reply(bridge.port, f"{mailbox.user}#phone", "wrong").startswith(b"-ERR [AUTH]")
    assert login_reply(bridge.port, f"nobody-{mailbox.user}#phone", mailbox.password).startswith(b"-ERR [AUTH]")
    login_ok = [e for e in bridge.events() if e["event"] == "login_ok"]
    assert [(e["account"], e["device"]) for e in login_ok] == [(mailbox.user, "phone")]


@pytest.mark.parametrize(
    "device", ["", "my phone", "x" * 65, "t\u00e9l\u00e9phone", "a/b"], ids=["empty", "space", "long", "accent", "slash"]
)
def test_invalid_device_names_get_auth_errors_and_the_session_goes_on(
    bridge_factory: BridgeFactory, mailbox: Mailbox, device: str
) -> None:
    seed(mailbox, 1)
    bridge = bridge_factory(delete={"policy": "per-client"})
    with RawPop3("127.0.0.1", bridge.port) as pop:
        assert pop.command(f"USER {mailbox.user}#{device}".encode()).startswith(b"+OK")
        reply = pop.command(b"PASS " + mailbox.password.encode())
        assert reply.startswith(b"-ERR [AUTH] invalid login"), reply
        # Still in AUTHORIZATION: the same connection can log in properly.
        pop.login(f"{mailbox.user}#phone", mailbox.password)
        assert pop.command(b"STAT").startswith(b"+OK 1 ")
        assert pop.command(b"QUIT").startswith(b"+OK")
    assert wait_for_event(bridge, "login_failed", reason="device_name")


def test_device_separator_is_configurable(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    seed(mailbox, 2)
    bridge = bridge_factory(delete={"policy": "per-client", "device_separator": "+"})
    assert poll(bridge.port, f"{mailbox.user}+phone", mailbox.password) == [1, 2]
    assert visible(bridge.port, f"{mailbox.user}+phone", mailbox.password) == []
    assert visible(bridge.port, mailbox.user, mailbox.password) == [1, 2]
    # "#" is no separator now: "user#phone" is an account that does not exist.
    assert login_reply(bridge.port, f"{mailbox.user}#phone", mailbox.password).startswith(b"-ERR [AUTH]")
    assert [r.device for r in state_records(mailbox)] == ["phone"]


def test_login_without_device_is_the_default_device(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    seed(mailbox, 2)
    bridge = bridge_factory(delete={"policy": "per-client"})
    assert poll(bridge.port, mailbox.user, mailbox.password) == [1, 2]
    assert visible(bridge.port, f"{mailbox.user}#default", mailbox.password) == []
    assert visible(bridge.port, f"{mailbox.user}#phone", mailbox.password) == [1, 2]
    assert [r.device for r in state_records(mailbox)] == ["default"]


def test_fixed_login_mapping_for_devices_that_cannot_change_their_login(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 3)
    bridge = bridge_factory(
        delete={"policy": "per-client", "logins": {"office-printer": f"{mailbox.user}#printer"}}
    )
    # The printer logs in with a name of its own and the account's password.
    assert poll(bridge.port, "office-printer", mailbox.password) == [1, 2, 3]
    assert visible(bridge.port, "office-printer", mailbox.password) == []
    assert visible(bridge.port, f"{mailbox.user}#printer", mailbox.password) == []
    assert visible(bridge.port, mailbox.user, mailbox.password) == [1, 2, 3]
    assert login_reply(bridge.port, "office-printer", "wrong").startswith(b"-ERR [AUTH]")
    event = wait_for_event(bridge, "login_ok", user="office-printer")
    assert (event["account"], event["device"]) == (mailbox.user, "printer")


def test_per_account_default_device_and_policy(
    bridge_factory: BridgeFactory, mailbox_factory: Callable[[], Mailbox]
) -> None:
    alice, bob = mailbox_factory(), mailbox_factory()
    alice_uids, bob_uids = seed(alice, 3), seed(bob, 3)
    bridge = bridge_factory(
        delete={
            "policy": "expunge",
            "accounts": {alice.user: {"policy": "per-client", "default_device": "desk-phone"}},
        }
    )
    # Alice's unchangeable device logs in with the bare account name.
    assert dele_and_quit(bridge.port, alice.user, alice.password, [1]).startswith(b"+OK")
    assert visible(bridge.port, f"{alice.user}#desk-phone", alice.password) == [2, 3]
    assert visible(bridge.port, f"{alice.user}#laptop", alice.password) == [1, 2, 3]
    assert alice.observer().uids() == alice_uids
    assert [r.device for r in state_records(alice)] == ["desk-phone"]
    # Bob keeps the service-wide policy: DELE expunges.
    assert dele_and_quit(bridge.port, f"{bob.user}#phone", bob.password, [1]).startswith(b"+OK")
    assert bob.observer().uids() == bob_uids[1:]
    assert state_records(bob) == []


def test_uidl_is_stable_per_device_across_sessions(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    seed(mailbox, 4)
    bridge = bridge_factory(delete={"policy": "per-client"})
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    first = dict(listing(bridge.port, phone, mailbox.password))
    assert len(set(first.values())) == 4
    assert dele_and_quit(bridge.port, phone, mailbox.password, [2]).startswith(b"+OK")
    again = dict(listing(bridge.port, phone, mailbox.password))
    assert again == {n: uidl for n, uidl in first.items() if n != 2}
    # Each message has one UIDL, whichever device asks.
    assert dict(listing(bridge.port, laptop, mailbox.password)) == first


def test_two_devices_of_one_account_poll_at_once_but_one_device_only_once(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 1)
    bridge = bridge_factory(delete={"policy": "per-client"})
    with Pop3Client(bridge.port, f"{mailbox.user}#phone", mailbox.password) as phone:
        with Pop3Client(bridge.port, f"{mailbox.user}#laptop", mailbox.password) as laptop:
            assert phone.stat() == laptop.stat()
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            with Pop3Client(bridge.port, f"{mailbox.user}#phone", mailbox.password):
                pass
        assert phone.quit().startswith(b"+OK")
