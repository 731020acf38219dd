"""What a reused (parked) connection lists when the server lacks the extensions the fast paths
use. Dovecot offers QRESYNC, CONDSTORE, IDLE and SASL-IR; each is hidden here in turn
(`upstream.ignore_capabilities`), so every fallback runs against a real server: the listing
refresh with CONDSTORE only and with neither, the NOOP keepalive of a server without IDLE, and
LOGIN without SASL-IR. In each case, after another client changed flags, delivered mail and
expunged a message while the connection was parked, the reused connection must list exactly
what a fresh connection lists. A fault proxy between the bridge and Dovecot (passing
everything) shows which commands the bridge sent."""

from __future__ import annotations

import imaplib
import poplib
from collections.abc import Callable, Iterator

import pytest

from sandbox import Mailbox, numbered_messages
from tests.faultproxy import FaultProxy
from tests.harness import ThreadedBridge, wait_until

FALLBACKS = {
    "everything offered": [],
    "CONDSTORE without QRESYNC": ["QRESYNC"],
    "neither QRESYNC nor CONDSTORE": ["QRESYNC", "CONDSTORE"],
    "no IDLE": ["IDLE"],
    "no SASL-IR": ["SASL-IR"],
}


@pytest.fixture
def proxy(mailbox: Mailbox) -> Iterator[FaultProxy]:
    with FaultProxy(mailbox.host, mailbox.imap_port) as running:
        yield running


def listing(bridge: ThreadedBridge, mailbox: Mailbox) -> tuple[list[bytes], list[bytes]]:
    """UIDL and LIST of one POP3 session, ended with QUIT."""
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    try:
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
        uidl, listed = pop.uidl()[1], pop.list()[1]
        pop.quit()
        return uidl, listed
    finally:
        pop.close()


def events_of(bridge: ThreadedBridge, name: str) -> list[dict[str, object]]:
    return [event for event in bridge.events() if event.get("event") == name]


def sent_after(proxy: FaultProxy, start: int) -> list[bytes]:
    return proxy.lines_to_server()[start:]


def change_while_parked(mailbox: Mailbox) -> None:
    """Another IMAP client: a flag change, \\Deleted on a message it leaves in place, new
    mail, and an expunge."""
    client = imaplib.IMAP4(mailbox.host, mailbox.imap_port)
    client.login(mailbox.user, mailbox.password)
    client.select("INBOX")
    client.uid("STORE", "1", "+FLAGS", "(\\Seen)")
    client.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
    client.uid("STORE", "4", "+FLAGS", "(\\Deleted)")
    client.uid("EXPUNGE", "4")
    client.logout()
    mailbox.append(numbered_messages(2, start=10))


@pytest.mark.parametrize("hidden", list(FALLBACKS.values()), ids=list(FALLBACKS))
def test_a_reused_connection_lists_what_a_fresh_one_lists(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, proxy: FaultProxy, hidden: list[str],
    on_every_engine: str,
) -> None:
    mailbox.append(numbered_messages(5))
    upstream = {"port": proxy.port, "ignore_capabilities": hidden}
    parked = bridge_factory(upstream=upstream, pool={"keepalive_seconds": 1})
    listing(parked, mailbox)
    wait_until(lambda: events_of(parked, "session_end"), "the first session's end")
    parked_at = len(proxy.lines_to_server())

    # Parked: the keeper holds the connection with IDLE, or NOOP without it.
    keepalive = b" NOOP" if "IDLE" in hidden or on_every_engine == "aioimaplib" else b" IDLE"
    wait_until(
        lambda: sum(keepalive in line for line in sent_after(proxy, parked_at)) >= 2, f"two {keepalive.decode()}s"
    )
    assert not any(b" IDLE" in line for line in sent_after(proxy, parked_at)) or keepalive == b" IDLE"

    change_while_parked(mailbox)
    reused = listing(parked, mailbox)
    assert [event["event"] for event in events_of(parked, "upstream_reused")] == ["upstream_reused"]

    fresh_bridge = bridge_factory(upstream=upstream, pool={"park_seconds": 0})
    assert reused == listing(fresh_bridge, mailbox)
    # And that is the mailbox as it is: UIDs 1 and 3, 5 and the two new ones (2 is \Deleted,
    # 4 expunged).
    assert [int(line.split()[1][:8], 16) for line in reused[0]] == [1, 3, 5, 6, 7]

    lines = proxy.lines_to_server()
    logins = [line for line in lines if b" LOGIN " in line or b" AUTHENTICATE " in line]
    assert logins, "no login went through the proxy"
    expected = b" LOGIN " if "SASL-IR" in hidden else b" AUTHENTICATE PLAIN "
    assert all(expected in line for line in logins), logins
    if on_every_engine == "trio":
        refresh = sent_after(proxy, parked_at)
        if not hidden or hidden == ["IDLE"] or hidden == ["SASL-IR"]:
            assert any(b"(QRESYNC (" in line for line in refresh), "the QRESYNC refresh was not used"
        elif hidden == ["QRESYNC"]:
            assert any(b"(CHANGEDSINCE " in line for line in refresh) and not any(b"QRESYNC" in line for line in refresh)
        else:
            assert not any(b"CHANGEDSINCE" in line or b"QRESYNC" in line for line in refresh)
