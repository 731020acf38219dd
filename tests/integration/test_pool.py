"""Parked upstream connections (bridge.imap.pool) against the real Dovecot, with both
IMAP engines: reuse, password checks, a listing kept fresh while parked, a connection killed
server-side, caps and eviction, and retries against an upstream that refuses connections.

What a user would see is the POP3 conversation; whether a session reused a parked
connection is what the bridge logs (`upstream_reused` / `upstream_fresh`).
"""

from __future__ import annotations

import imaplib
import poplib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.harness import ThreadedBridge, free_port, wait_until

BridgeFactory = Callable[..., ThreadedBridge]


@pytest.fixture(params=["trio", "aioimaplib"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start(bridge_factory: BridgeFactory, engine: str, **pool: Any) -> ThreadedBridge:
    return bridge_factory(upstream={"engine": engine}, pool=pool)


def sessions_ended(bridge: ThreadedBridge, count: int) -> None:
    # A session hands its connection back before it logs session_end.
    wait_until(
        lambda: sum(1 for e in bridge.events() if e.get("event") == "session_end") >= count,
        f"{count} sessions ended",
    )


def pool_events(bridge: ThreadedBridge, user: str) -> list[str]:
    """How each login of `user` got its upstream connection, in order: "reused" or the
    reason it needed a fresh one."""
    found = []
    for item in bridge.events():
        if item.get("account") != user:
            continue
        if item.get("event") == "upstream_reused":
            found.append("reused")
        elif item.get("event") == "upstream_fresh":
            found.append(item["reason"])
    return found


@contextmanager
def logged_in(bridge: ThreadedBridge, user: str, password: str) -> Iterator[poplib.POP3]:
    """A poplib session, ended with QUIT when the block succeeds."""
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    try:
        pop.user(user)
        pop.pass_(password)
        yield pop
        pop.quit()
    finally:
        pop.close()


def stat(bridge: ThreadedBridge, user: str, password: str) -> tuple[int, int]:
    with logged_in(bridge, user, password) as pop:
        return pop.stat()


def test_next_session_reuses_the_parked_connection(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    mailbox.append(numbered_messages(3))
    bridge = start(bridge_factory, engine)
    first = stat(bridge, mailbox.user, mailbox.password)
    sessions_ended(bridge, 1)
    second = stat(bridge, mailbox.user, mailbox.password)
    assert first == second and first[0] == 3
    assert pool_events(bridge, mailbox.user) == ["none_parked", "reused"]


def test_wrong_password_gets_no_parked_connection_and_does_not_evict_it(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    mailbox.append(numbered_messages(2))
    bridge = start(bridge_factory, engine)
    stat(bridge, mailbox.user, mailbox.password)
    sessions_ended(bridge, 1)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        stat(bridge, mailbox.user, mailbox.password + "x")
    sessions_ended(bridge, 2)
    assert stat(bridge, mailbox.user, mailbox.password)[0] == 2
    # The wrong password went to the server (which refused it); the good connection stayed.
    assert pool_events(bridge, mailbox.user) == ["none_parked", "password_mismatch", "reused"]


def test_mail_arriving_while_parked_is_in_the_next_stat(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    first_batch = list(numbered_messages(2))
    mailbox.append(first_batch)
    bridge = start(bridge_factory, engine)
    assert stat(bridge, mailbox.user, mailbox.password)[0] == 2
    sessions_ended(bridge, 1)
    arrived = list(numbered_messages(3, start=10))
    mailbox.append(arrived)
    count, size = stat(bridge, mailbox.user, mailbox.password)
    assert (count, size) == (5, sum(len(m) for m in first_batch + arrived))
    assert pool_events(bridge, mailbox.user) == ["none_parked", "reused"]


def test_mail_expunged_while_parked_is_gone_from_the_next_session(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    uids = mailbox.append(numbered_messages(4)).uids
    bridge = start(bridge_factory, engine)
    assert stat(bridge, mailbox.user, mailbox.password)[0] == 4
    sessions_ended(bridge, 1)
    with mailbox.observer() as observer:
        observer.expunge([uids[1]])
        observer.store_flags([uids[3]], ["\\Deleted"])  # flagged by an IMAP client, not expunged
    with logged_in(bridge, mailbox.user, mailbox.password) as pop:
        listed = [line.split()[1] for line in pop.uidl()[1]]
    with mailbox.observer() as observer:
        uidvalidity = observer.uidvalidity()
    assert listed == [f"{uid:08x}{uidvalidity:08x}".encode() for uid in (uids[0], uids[2])]
    assert pool_events(bridge, mailbox.user) == ["none_parked", "reused"]


def listings(bridge: ThreadedBridge, user: str, password: str) -> tuple[list[bytes], list[bytes]]:
    """UIDL and LIST of one session, as poplib returns their lines."""
    with logged_in(bridge, user, password) as pop:
        return pop.uidl()[1], pop.list()[1]


def test_listings_follow_flag_changes_made_while_parked(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    # Sessions of an unchanged maildrop share what the first one built (bridge.session
    # maildrop_from_snapshot); any change in between must show in the next listing.
    messages = list(numbered_messages(3))
    uids = mailbox.append(messages).uids
    bridge = start(bridge_factory, engine)
    with mailbox.observer() as observer:
        uidvalidity = observer.uidvalidity()

    def expected(kept: list[int]) -> tuple[list[bytes], list[bytes]]:
        numbered = list(enumerate(kept, 1))
        return (
            [b"%d %08x%08x" % (n, uids[i], uidvalidity) for n, i in numbered],
            [b"%d %d" % (n, len(messages[i])) for n, i in numbered],
        )

    assert listings(bridge, mailbox.user, mailbox.password) == expected([0, 1, 2])
    sessions_ended(bridge, 1)
    assert listings(bridge, mailbox.user, mailbox.password) == expected([0, 1, 2])
    sessions_ended(bridge, 2)
    with mailbox.observer() as observer:
        observer.store_flags([uids[1]], ["\\Deleted"])
    assert listings(bridge, mailbox.user, mailbox.password) == expected([0, 2])
    sessions_ended(bridge, 3)
    with mailbox.observer() as observer:
        observer.store_flags([uids[1]], ["\\Deleted"], mode="-")
    assert listings(bridge, mailbox.user, mailbox.password) == expected([0, 1, 2])
    assert pool_events(bridge, mailbox.user) == ["none_parked", "reused", "reused", "reused"]


def test_parked_connection_killed_by_the_server_is_replaced(
    bridge_factory: BridgeFactory, dovecot: DovecotSandbox, mailbox: Mailbox, engine: str
) -> None:
    mailbox.append(numbered_messages(2))
    bridge = start(bridge_factory, engine)
    stat(bridge, mailbox.user, mailbox.password)
    sessions_ended(bridge, 1)
    dovecot.kick(mailbox.user)
    mailbox.append(numbered_messages(1, start=5))
    assert stat(bridge, mailbox.user, mailbox.password)[0] == 3
    assert pool_events(bridge, mailbox.user)[-1] == "none_parked"


def test_per_account_cap_keeps_the_newest_connections(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    mailbox.append(numbered_messages(1))
    bridge = start(bridge_factory, engine, max_per_account=1)
    # Two devices of one account poll at the same time: two connections come back.
    phone = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    laptop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    try:
        for pop, login in ((phone, f"{mailbox.user}#phone"), (laptop, f"{mailbox.user}#laptop")):
            pop.user(login)
            pop.pass_(mailbox.password)
        phone.quit()
        laptop.quit()
    finally:
        phone.close()
        laptop.close()
    sessions_ended(bridge, 2)
    wait_until(
        lambda: any(e.get("reason") == "account_cap" for e in bridge.events() if e.get("event") == "pool_connection_closed"),
        "a connection logged out for the per-account cap",
    )
    assert stat(bridge, f"{mailbox.user}#phone", mailbox.password)[0] == 1
    assert pool_events(bridge, mailbox.user) == ["none_parked", "none_parked", "reused"]


def test_total_cap_logs_out_the_least_recently_used(
    bridge_factory: BridgeFactory, mailbox_factory: Callable[[], Mailbox], engine: str
) -> None:
    boxes = [mailbox_factory() for _ in range(3)]
    for box in boxes:
        box.append(numbered_messages(1))
    bridge = start(bridge_factory, engine, max_connections=2)
    for number, box in enumerate(boxes, 1):
        stat(bridge, box.user, box.password)
        sessions_ended(bridge, number)
    # boxes[0] parked first, so the third one pushed it out.
    stat(bridge, boxes[2].user, boxes[2].password)
    stat(bridge, boxes[0].user, boxes[0].password)
    assert pool_events(bridge, boxes[2].user) == ["none_parked", "reused"]
    assert pool_events(bridge, boxes[0].user) == ["none_parked", "none_parked"]
    assert any(e.get("reason") == "total_cap" for e in bridge.events() if e.get("event") == "pool_connection_closed")


def test_parking_off_logs_every_session_in_afresh(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    mailbox.append(numbered_messages(1))
    bridge = start(bridge_factory, engine, park_seconds=0)
    for number in (1, 2):
        stat(bridge, mailbox.user, mailbox.password)
        sessions_ended(bridge, number)
    assert pool_events(bridge, mailbox.user) == ["none_parked", "none_parked"]


def test_upstream_refusing_connections_is_retried_with_growing_waits_then_sys_temp(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    # Nothing listens on this port: every connect is refused at once.
    bridge = bridge_factory(
        upstream={
            "engine": engine,
            "port": free_port(),
            "timeout_seconds": 2,
            "reconnect_initial_seconds": 0.05,
            "reconnect_max_seconds": 0.5,
        }
    )
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    try:
        pop.user(mailbox.user)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            pop.pass_(mailbox.password)
        # The session goes on after the refusal.
        assert "USER" in pop.capa()
    finally:
        pop.close()
    retries = [e for e in bridge.events() if e.get("event") == "upstream_retry"]
    waits = [e["wait_seconds"] for e in retries]
    assert [e["attempt"] for e in retries] == list(range(1, len(retries) + 1))
    assert len(waits) >= 3
    # Doubling with jitter in [0.5, 1] of the step: never shorter than the previous wait
    # until the cap, never above the cap.
    capped = [w for w in waits if w < 0.25]
    assert capped == sorted(capped)
    assert max(waits) <= 0.5
    assert any(e.get("event") == "upstream_retries_exhausted" for e in bridge.events())


def dovecot_accepts(mailbox: Mailbox, password: str) -> bool:
    """Whether Dovecot itself takes `password` for the mailbox's user now."""
    with imaplib.IMAP4(mailbox.host, mailbox.imap_port, timeout=30) as imap:
        try:
            imap.login(mailbox.user, password)
        except imaplib.IMAP4.error:
            return False
        imap.logout()
        return True


def change_password(dovecot: DovecotSandbox, mailbox: Mailbox, password: str) -> None:
    dovecot.set_password(mailbox.user, password)
    wait_until(lambda: dovecot_accepts(mailbox, password), "Dovecot to take the new password")


def refused(bridge: ThreadedBridge, user: str, password: str) -> bytes | None:
    """The -ERR of a login, or None if it succeeded."""
    try:
        stat(bridge, user, password)
    except poplib.error_proto as exc:
        return bytes(exc.args[0])
    return None


def test_an_old_password_stops_working_once_the_connection_reaches_max_age(
    bridge_factory: BridgeFactory, dovecot: DovecotSandbox, mailbox: Mailbox, engine: str
) -> None:
    """The review's reproduction: a device keeps polling with the password that was changed
    upstream, more often than park_seconds. Each poll used to re-park the connection, and the
    old password kept working for ever."""
    mailbox.append(numbered_messages(1))
    old = mailbox.password
    bridge = start(bridge_factory, engine, max_age_seconds=2)
    stat(bridge, mailbox.user, old)
    sessions_ended(bridge, 1)
    change_password(dovecot, mailbox, old + "-changed")
    answer = wait_until(lambda: refused(bridge, mailbox.user, old), "the old password to be refused")
    assert answer.startswith(b"-ERR [AUTH]")
    # Refused by Dovecot: the connection that had logged in with it was not handed over.
    assert pool_events(bridge, mailbox.user)[-1] == "none_parked"
    assert any(
        e.get("reason") == "max_age" for e in bridge.events() if e.get("event") == "pool_connection_closed"
    )


def test_a_login_with_the_new_password_retires_the_old_passwords_connection_at_once(
    bridge_factory: BridgeFactory, dovecot: DovecotSandbox, mailbox: Mailbox, engine: str
) -> None:
    mailbox.append(numbered_messages(1))
    old, new = mailbox.password, mailbox.password + "-changed"
    bridge = start(bridge_factory, engine)  # the default max_age_seconds, minutes
    stat(bridge, mailbox.user, old)
    sessions_ended(bridge, 1)
    change_password(dovecot, mailbox, new)
    assert stat(bridge, mailbox.user, new)[0] == 1
    sessions_ended(bridge, 2)
    answer = refused(bridge, mailbox.user, old)
    assert answer is not None and answer.startswith(b"-ERR [AUTH]")
    assert pool_events(bridge, mailbox.user) == ["none_parked", "password_mismatch", "password_mismatch"]
    closed = [e for e in bridge.events() if e.get("event") == "pool_connection_closed"]
    assert [e["reason"] for e in closed] == ["password_changed"]
    # The new password's connection is the one parked now.
    assert stat(bridge, mailbox.user, new)[0] == 1
    assert pool_events(bridge, mailbox.user)[-1] == "reused"
