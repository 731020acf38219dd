"""Retention for the per-client policy (`delete.expire_after_days`): what is removed, when,
and what CAPA's EXPIRE tells clients. docs/devices.md, "Delete policies" and "Expiry"."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from bridge.policy.device_state import StateSigner, render_state
from bridge.policy.uid_ranges import UidRanges
from sandbox import Mailbox, numbered_messages
from tests.harness import TEST_STATE_KEY, Pop3Client, ThreadedBridge
from tests.integration.policy_support import (
    MOVE_FOLDER,
    STATE_FOLDER,
    append_dated,
    create_folder,
    folder_names,
    poll,
    visible,
)

BridgeFactory = Callable[..., ThreadedBridge]


def seed(box: Mailbox, count: int, start: int = 1) -> list[int]:
    return box.append(list(numbered_messages(count, start=start))).uids


def capa_expire(port: int, login: str | None = None, password: str = "") -> list[str]:
    with Pop3Client(port, login, password) as pop:
        value = pop.capa()["EXPIRE"]
        pop.quit()
    return value


def imap_date(moment: datetime) -> str:
    return moment.strftime("%d-%b-%Y %H:%M:%S +0000")


# -- CAPA EXPIRE ---------------------------------------------------------------------------


def test_capa_says_expire_never_without_expiry(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    for policy in ("expunge", "move", "keep", "per-client"):
        bridge = bridge_factory(delete={"policy": policy})
        assert capa_expire(bridge.port) == ["NEVER"]
        assert capa_expire(bridge.port, f"{mailbox.user}#phone", mailbox.password) == ["NEVER"]
        bridge.stop()


def test_capa_says_expire_days_with_expiry(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    bridge = bridge_factory(delete={"policy": "per-client", "expire_after_days": 30})
    assert capa_expire(bridge.port) == ["30"]
    assert capa_expire(bridge.port, f"{mailbox.user}#phone", mailbox.password) == ["30"]


def test_capa_says_expire_user_when_accounts_differ(
    bridge_factory: BridgeFactory, mailbox_factory: Callable[[], Mailbox]
) -> None:
    alice, bob = mailbox_factory(), mailbox_factory()
    bridge = bridge_factory(
        delete={
            "policy": "expunge",
            "expire_after_days": 14,
            "accounts": {alice.user: {"policy": "per-client"}},
        }
    )
    # Before login the server cannot know which applies (RFC 2449: "USER").
    assert capa_expire(bridge.port) == ["NEVER", "USER"]
    assert capa_expire(bridge.port, f"{alice.user}#phone", alice.password) == ["14"]
    assert capa_expire(bridge.port, bob.user, bob.password) == ["NEVER"]


# -- what expiry removes ----------------------------------------------------------------------


@pytest.mark.parametrize("action", ["expunge", "move"])
def test_a_message_every_recent_device_has_hidden_is_removed(
    bridge_factory: BridgeFactory, mailbox: Mailbox, action: str
) -> None:
    uids = seed(mailbox, 3)
    observer = mailbox.observer()
    originals = {uid: observer.fetch(uid) for uid in uids}
    bridge = bridge_factory(
        delete={"policy": "per-client", "expire_after_days": 7, "expire_action": action}
    )
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    # Both devices have been seen; the phone has downloaded nothing yet.
    assert poll(bridge.port, phone, mailbox.password, delete=False) == [1, 2, 3]
    assert poll(bridge.port, laptop, mailbox.password) == [1, 2, 3]
    observer.noop()
    assert observer.uids() == uids, "the phone still needs them"
    assert visible(bridge.port, phone, mailbox.password) == [1, 2, 3]

    with Pop3Client(bridge.port, phone, mailbox.password) as pop:
        pop.dele(1)
        pop.dele(3)
        assert pop.quit().startswith(b"+OK")

    observer.noop()
    assert observer.uids() == [uids[1]]
    if action == "move":
        with mailbox.observer(MOVE_FOLDER) as target:
            assert [target.fetch(uid) for uid in target.uids()] == [originals[uids[0]], originals[uids[2]]]
    else:
        assert MOVE_FOLDER not in folder_names(mailbox)
    assert visible(bridge.port, phone, mailbox.password) == [2]
    assert visible(bridge.port, f"{mailbox.user}#tablet", mailbox.password) == [2]


def test_without_expiry_hidden_messages_stay_forever(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    uids = seed(mailbox, 2)
    bridge = bridge_factory(delete={"policy": "per-client"})
    for device in ("phone", "laptop"):
        assert poll(bridge.port, f"{mailbox.user}#{device}", mailbox.password) == [1, 2]
    assert mailbox.observer().uids() == uids


def test_a_device_not_seen_within_the_limit_no_longer_holds_mail_back(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    uids = seed(mailbox, 2)
    observer = mailbox.observer()
    # A tablet last polled 30 days ago and never downloaded anything; a printer 3 days ago.
    create_folder(mailbox, STATE_FOLDER)
    now = datetime.now(UTC)
    signer = StateSigner(TEST_STATE_KEY.encode(), mailbox.user)
    mailbox.append(
        [
            render_state(signer, "tablet", "INBOX", observer.uidvalidity(), UidRanges(), now - timedelta(days=30)),
            render_state(signer, "printer", "INBOX", observer.uidvalidity(), UidRanges(), now - timedelta(days=3)),
        ],
        mailbox=STATE_FOLDER,
    )
    bridge = bridge_factory(delete={"policy": "per-client", "expire_after_days": 7})
    phone = f"{mailbox.user}#phone"
    assert poll(bridge.port, phone, mailbox.password) == [1, 2]
    observer.noop()
    assert observer.uids() == uids, "the printer, seen 3 days ago, still holds both back"

    assert poll(bridge.port, f"{mailbox.user}#printer", mailbox.password) == [1, 2]
    observer.noop()
    # The tablet, silent for 30 days, counts no more.
    assert observer.uids() == []


def test_messages_older_than_the_limit_are_removed_regardless(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    old, recent, new = numbered_messages(3)
    now = datetime.now(UTC)
    append_dated(mailbox, old, imap_date(now - timedelta(days=40)))
    append_dated(mailbox, recent, imap_date(now - timedelta(days=5)))
    append_dated(mailbox, new, imap_date(now))
    observer = mailbox.observer()
    uids = observer.uids()
    bridge = bridge_factory(delete={"policy": "per-client", "expire_after_days": 10})
    phone = f"{mailbox.user}#phone"
    # Logging in and leaving without QUIT removes nothing.
    with Pop3Client(bridge.port, phone, mailbox.password) as pop:
        assert pop.stat()[0] == 3
    observer.noop()
    assert observer.uids() == uids

    # A session that deletes nothing still applies the retention limit at QUIT.
    assert poll(bridge.port, phone, mailbox.password, delete=False) == [1, 2, 3]
    observer.noop()
    assert observer.uids() == uids[1:]
    assert visible(bridge.port, f"{mailbox.user}#laptop", mailbox.password) == [2, 3]


def test_expiry_leaves_other_maildrops_and_other_policies_alone(
    bridge_factory: BridgeFactory, mailbox_factory: Callable[[], Mailbox]
) -> None:
    alice, bob = mailbox_factory(), mailbox_factory()
    long_ago = imap_date(datetime.now(UTC) - timedelta(days=400))
    for box in (alice, bob):
        append_dated(box, next(numbered_messages(1)), long_ago)
    bridge = bridge_factory(
        delete={
            "policy": "keep",
            "expire_after_days": 30,
            "accounts": {alice.user: {"policy": "per-client"}},
        }
    )
    assert poll(bridge.port, bob.user, bob.password) == [1]
    assert len(bob.observer().uids()) == 1, "keep never deletes, however old"
    assert poll(bridge.port, alice.user, alice.password, delete=False) == [1]
    assert alice.observer().uids() == []
