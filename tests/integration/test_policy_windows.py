"""What of a huge maildrop a device sees (bridge.policy.windows), against a real Dovecot on both
engines: `window = "last-N-messages"` and `"last-N-days"`, and a first login "from now on",
per account and per device, with the delete policies. A message outside what a device sees
is never deleted, and UIDLs are those of the whole maildrop."""

from __future__ import annotations

import imaplib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import ThreadedBridge
from tests.integration.policy_support import listing, message_number, poll, visible

pytestmark = pytest.mark.usefixtures("on_every_engine")


def _append_dated(mailbox: Mailbox, numbers_and_days_ago: list[tuple[int, int]]) -> None:
    """Messages `numbered_messages` would make, with an arrival date (INTERNALDATE) that many
    days ago."""
    messages = {message_number(m): m for m in numbered_messages(max(n for n, _ in numbers_and_days_ago))}
    client = imaplib.IMAP4("127.0.0.1", mailbox.imap_port)
    try:
        client.login(mailbox.user, mailbox.password)
        for number, days_ago in numbers_and_days_ago:
            moment = datetime.now(UTC) - timedelta(days=days_ago)
            status, _ = client.append("INBOX", "", imaplib.Time2Internaldate(moment.timestamp()), messages[number])
            assert status == "OK"
    finally:
        client.logout()


def test_last_n_messages_lists_only_the_newest_and_deletes_only_what_was_listed(
    mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    mailbox.append(numbered_messages(10))
    full = bridge_factory()
    whole = listing(full.port, mailbox.user, mailbox.password)
    windowed = bridge_factory(delete={"window": "last-3-messages"})
    seen = listing(windowed.port, mailbox.user, mailbox.password)
    # The newest three, numbered 1..3, with the UIDLs the whole maildrop gives them.
    assert seen == whole[-3:]
    # Downloading and deleting them (expunge) leaves the seven older ones untouched; they
    # then come into the window.
    assert poll(windowed.port, mailbox.user, mailbox.password) == [8, 9, 10]
    assert visible(full.port, mailbox.user, mailbox.password) == list(range(1, 8))
    assert visible(windowed.port, mailbox.user, mailbox.password) == [5, 6, 7]


def test_last_n_days_by_arrival_date_per_device(mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]) -> None:
    _append_dated(mailbox, [(1, 400), (2, 40), (3, 20), (4, 3), (5, 0)])
    account = mailbox.user
    bridge = bridge_factory(
        delete={"accounts": {account: {"window": "last-30-days", "devices": {"printer": {"window": "last-7-days"}}}}}
    )
    assert visible(bridge.port, account, mailbox.password) == [3, 4, 5]
    assert visible(bridge.port, f"{account}#printer", mailbox.password) == [4, 5]
    assert visible(bridge.port, f"{account}#laptop", mailbox.password) == [3, 4, 5]
    # Nothing left the mailbox for being outside a window.
    assert len(mailbox.observer().uids()) == 5


@pytest.mark.parametrize("policy", ["keep", "per-client", "expunge"])
def test_a_first_login_from_now_on_sees_only_later_mail(
    policy: str, mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    mailbox.append(numbered_messages(5))
    account = mailbox.user
    bridge = bridge_factory(
        delete={"policy": policy, "accounts": {account: {"devices": {"phone": {"first_login": "from-now-on"}}}}}
    )
    phone = f"{account}#phone"
    assert visible(bridge.port, phone, mailbox.password) == []
    mailbox.append(list(numbered_messages(7))[5:])
    assert visible(bridge.port, phone, mailbox.password) == [6, 7]
    # Another device of the account sees everything; the old mail is still there.
    assert visible(bridge.port, f"{account}#tablet", mailbox.password) == [1, 2, 3, 4, 5, 6, 7]
    assert poll(bridge.port, phone, mailbox.password) == [6, 7]
    remaining = visible(bridge.port, f"{account}#tablet", mailbox.password)
    if policy == "expunge":
        assert remaining == [1, 2, 3, 4, 5]
    else:
        assert remaining == [1, 2, 3, 4, 5, 6, 7]
    assert visible(bridge.port, phone, mailbox.password) == ([] if policy != "keep" else [6, 7])


def test_a_first_login_from_now_on_is_recorded_once(mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]) -> None:
    """The second login is not a first login: mail that arrived in between is shown, not
    hidden again."""
    mailbox.append(numbered_messages(2))
    bridge = bridge_factory(delete={"policy": "keep", "first_login": "from-now-on"})
    assert visible(bridge.port, mailbox.user, mailbox.password) == []
    mailbox.append(list(numbered_messages(3))[2:])
    assert visible(bridge.port, mailbox.user, mailbox.password) == [3]
    assert visible(bridge.port, mailbox.user, mailbox.password) == [3]
    logs = [e for e in bridge.events() if e.get("event") == "device_first_login"]
    assert len(logs) == 1 and logs[0]["hidden"] == 2
