"""The core POP3 conformance tests, re-run against every upstream IMAP server the bridge
supports (Twisted's POP3 suite does the same over its mailbox variants): Dovecot 2.3 and
Cyrus IMAP 3.6, each a private instance started by the fixtures (sandbox/).

What differs between the two servers, and how each test copes (docs/compatibility.md):
- Cyrus refuses to store a message that has header text but no header/body separator and
  no line end at all (`NO Message contains invalid header`); Dovecot stores it. The corpus
  for Cyrus leaves it out, and a test pins the refusal down.
- Cyrus replaces 8-bit bytes in header fields with 'X' when storing (its `munge8bit`
  default); Dovecot keeps them. The bridge serves what the server stores, so RETR is
  compared with the stored bytes (an independent IMAP fetch), and on Dovecot also with
  the original.
- Dovecot (maildir here) names folders with '.' inside, Cyrus with '/', both present them
  as personal folders next to INBOX; the bridge only ever names whole folders.
- Both advertise UIDPLUS, MOVE, CONDSTORE, QRESYNC, IDLE, LITERAL+, SASL-IR; the
  capability-less paths are exercised by hiding capabilities (upstream.ignore_capabilities).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from sandbox import (
    DovecotSandbox,
    ImapObserver,
    big_message,
    numbered_messages,
    tricky_messages,
)
from sandbox.cyrus import CyrusSandbox
from sandbox.seeding import AppendResult, SeedingError
from tests.harness import (
    RawPop3,
    ThreadedBridge,
    bridge_settings,
    pop3_unstuff,
    retr_payload,
    wait_until,
)

CLIENT_TIMEOUT = 60.0
UIDL_RE = re.compile(rb"^[0-9a-f]{16}$")


class UpstreamMailbox(Protocol):
    user: str
    password: str
    host: str
    imap_port: int

    def append(self, messages: list[bytes], *, mailbox: str = "INBOX") -> AppendResult: ...
    def observer(self, mailbox: str = "INBOX") -> ImapObserver: ...
    def close(self) -> None: ...


@dataclass
class Upstream:
    """One IMAP server under test, with fresh mailboxes and bridges in front of it."""

    name: str
    server: DovecotSandbox | CyrusSandbox
    _boxes: list[UpstreamMailbox] = field(default_factory=list)
    _bridges: list[ThreadedBridge] = field(default_factory=list)

    def mailbox(self) -> UpstreamMailbox:
        box: UpstreamMailbox = self.server.new_mailbox()  # type: ignore[assignment]
        self._boxes.append(box)
        return box

    def bridge(self, **sections: dict[str, object]) -> ThreadedBridge:
        bridge = ThreadedBridge(bridge_settings(self.server.imap_port, **sections)).start()
        self._bridges.append(bridge)
        return bridge

    def close(self) -> None:
        for bridge in self._bridges:
            bridge.stop()
        for box in self._boxes:
            box.close()


@pytest.fixture(params=["dovecot", "cyrus"])
def upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    server = request.getfixturevalue(request.param)
    upstream = Upstream(request.param, server)
    try:
        yield upstream
    finally:
        upstream.close()


def client(bridge: ThreadedBridge, box: UpstreamMailbox) -> RawPop3:
    raw = RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT)
    raw.login(box.user, box.password)
    return raw


def stored(box: UpstreamMailbox, folder: str = "INBOX") -> list[bytes]:
    observer = box.observer(folder)
    try:
        return [observer.fetch(uid) for uid in observer.uids()]
    finally:
        observer.close()


def corpus_for(upstream: Upstream) -> dict[str, bytes]:
    corpus = dict(tricky_messages())
    if upstream.name == "cyrus":
        # Cyrus refuses this one at APPEND (test_cyrus_refuses_a_message_without_any_line_end).
        del corpus["single_line_no_crlf"]
    corpus["large_in_chunks"] = big_message(300_000, dot_every=3)
    corpus.update({f"numbered{n}": m for n, m in enumerate(numbered_messages(3), 1)})
    return corpus


def expected_top(message: bytes, lines: int) -> bytes:
    """TOP n lines of a stored message: the header, the blank line, `lines` body lines."""
    data = retr_payload(message)
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return data
    head, body = data[: head_end + 4], data[head_end + 4 :]
    kept = body.split(b"\r\n")[:-1][:lines]  # retr_payload's data always ends in CRLF
    return head + b"".join(line + b"\r\n" for line in kept) if lines else head


# -- logging in ---------------------------------------------------------------------------


def test_login_and_wrong_password(upstream: Upstream) -> None:
    box = upstream.mailbox()
    box.append(list(numbered_messages(1)))
    bridge = upstream.bridge()
    with RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT) as raw:
        assert raw.command(b"USER " + box.user.encode()).startswith(b"+OK")
        assert raw.command(b"PASS " + box.password.encode() + b"x").startswith(b"-ERR [AUTH]")
        assert raw.command(b"USER nosuchuser").startswith(b"+OK")
        assert raw.command(b"PASS whatever").startswith(b"-ERR [AUTH]")
        raw.login(box.user, box.password)
        assert raw.command(b"STAT").startswith(b"+OK 1 ")
        assert raw.command(b"QUIT").startswith(b"+OK")


# -- reading --------------------------------------------------------------------------------


def test_corpus_is_served_as_the_server_stores_it(upstream: Upstream) -> None:
    box = upstream.mailbox()
    corpus = corpus_for(upstream)
    originals = list(corpus.values())
    box.append(originals)
    on_server = stored(box)
    if upstream.name == "dovecot":
        assert on_server == originals
    bridge = upstream.bridge(upstream={"fetch_chunk": 4096})
    with client(bridge, box) as raw:
        count, total = raw.command(b"STAT").split()[1:3]
        assert int(count) == len(on_server)
        assert int(total) == sum(len(m) for m in on_server)
        status, body = raw.command_multiline(b"LIST")
        sizes = [int(line.split()[1]) for line in body.split(b"\r\n")[:-2]]
        assert sizes == [len(m) for m in on_server]
        for n, message in enumerate(on_server, 1):
            status, body = raw.command_multiline(b"RETR %d" % n)
            assert status.startswith(b"+OK"), status
            assert pop3_unstuff(body) == retr_payload(message), f"message {n} differs"
            for lines in (0, 3):
                status, body = raw.command_multiline(b"TOP %d %d" % (n, lines))
                assert pop3_unstuff(body) == expected_top(message, lines), f"TOP {n} {lines} differs"
        assert raw.command(b"QUIT").startswith(b"+OK")
    # Reading never set \Seen.
    observer = box.observer()
    assert all("\\Seen" not in info.flags for info in observer.messages())


def test_uidl_is_uid_and_uidvalidity_and_stable(upstream: Upstream) -> None:
    box = upstream.mailbox()
    result = box.append(list(numbered_messages(3)))
    bridge = upstream.bridge()
    listings = []
    for _session in range(2):
        with client(bridge, box) as raw:
            status, body = raw.command_multiline(b"UIDL")
            listings.append([line.split()[1] for line in body.split(b"\r\n")[:-2]])
            assert raw.command(b"QUIT").startswith(b"+OK")
    assert listings[0] == listings[1]
    assert listings[0] == [b"%08x%08x" % (uid, result.uidvalidity) for uid in result.uids]
    assert all(UIDL_RE.match(uidl) for uidl in listings[0])


def test_a_parked_connection_serves_the_next_login_with_what_changed_meanwhile(upstream: Upstream) -> None:
    """The next login gets the parked connection still in IDLE and ends it in the same write
    as its refresh (DONE, then SELECT and FETCH): whatever the server said during the IDLE
    and the refresh's answers must all be read, in order."""
    box = upstream.mailbox()
    box.append(list(numbered_messages(3)))
    bridge = upstream.bridge()
    with client(bridge, box) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    wait_until(
        lambda: any(e.get("event") == "pool_parked" for e in bridge.events()), "the connection to be parked"
    )
    box.append(list(numbered_messages(2, start=10)))
    for _session in range(3):
        with client(bridge, box) as raw:
            assert raw.command(b"STAT").startswith(b"+OK 4 ")
            status, body = raw.command_multiline(b"RETR 4")
            assert status.startswith(b"+OK")
            assert pop3_unstuff(body) == retr_payload(stored(box)[3])
            assert raw.command(b"QUIT").startswith(b"+OK")
    events = [e["event"] for e in bridge.events()]
    assert events.count("upstream_reused") == 3
    assert events.count("upstream_fresh") == 1
    assert [e for e in bridge.events() if e.get("level") in ("warning", "error", "critical")] == []


def test_mailbox_with_a_non_ascii_name(upstream: Upstream) -> None:
    box = upstream.mailbox()
    folder = "Boîte aux lettres"
    observer = box.observer()
    # Modified UTF-7 (RFC 3501 5.1.3), as an IMAP client creates it.
    assert observer.imap.create('"Bo&AO4-te aux lettres"')[0] == "OK"
    observer.close()
    messages = list(numbered_messages(2))
    append = box.append(messages, mailbox="Bo&AO4-te aux lettres")
    bridge = upstream.bridge(upstream={"mailbox": folder})
    with client(bridge, box) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 2 ")
        status, body = raw.command_multiline(b"RETR 2")
        assert pop3_unstuff(body) == retr_payload(messages[1])
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    assert box.observer("Bo&AO4-te aux lettres").uids() == append.uids[1:]


# -- deleting ------------------------------------------------------------------------------


def test_dele_quit_removes_exactly_the_marked_messages(upstream: Upstream) -> None:
    box = upstream.mailbox()
    messages = list(numbered_messages(5))
    uids = box.append(messages).uids
    other = box.observer()
    other.store_flags([uids[4]], ["\\Deleted"])  # another client's, not expunged
    bridge = upstream.bridge()
    with client(bridge, box) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 4 ")  # the flagged one is not listed
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"RSET").startswith(b"+OK")
        assert raw.command(b"DELE 3").startswith(b"+OK")
        assert raw.command(b"DELE 4").startswith(b"+OK")
    # No QUIT: nothing happened.
    assert box.observer().uids() == uids
    with client(bridge, box) as raw:
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"DELE 3").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    flags = {info.uid: info.flags for info in box.observer().messages()}
    # The other client's \Deleted message is still there for that client to expunge.
    assert sorted(flags) == [uids[0], uids[3], uids[4]]
    assert "\\Deleted" in flags[uids[4]]
    assert stored(box)[:2] == [messages[0], messages[3]]


def test_without_uidplus_messages_are_flagged_and_hidden(upstream: Upstream) -> None:
    box = upstream.mailbox()
    uids = box.append(list(numbered_messages(3))).uids
    bridge = upstream.bridge(upstream={"ignore_capabilities": ["UIDPLUS"]})
    with client(bridge, box) as raw:
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    flags = {info.uid: info.flags for info in box.observer().messages()}
    assert sorted(flags) == uids
    assert ["\\Deleted" in flags[uid] for uid in uids] == [False, True, False]
    with client(bridge, box) as raw:
        assert raw.command(b"STAT").startswith(b"+OK 2 ")


@pytest.mark.parametrize("hide", [[], ["MOVE"]], ids=["MOVE", "COPY+EXPUNGE"])
def test_move_policy(upstream: Upstream, hide: list[str]) -> None:
    box = upstream.mailbox()
    messages = list(numbered_messages(3))
    uids = box.append(messages).uids
    bridge = upstream.bridge(upstream={"ignore_capabilities": hide}, delete={"policy": "move"})
    with client(bridge, box) as raw:
        assert raw.command(b"DELE 1").startswith(b"+OK")
        assert raw.command(b"DELE 3").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    assert box.observer().uids() == [uids[1]]
    assert stored(box, "POP Downloaded") == [messages[0], messages[2]]


def test_keep_policy_sets_seen_only(upstream: Upstream) -> None:
    box = upstream.mailbox()
    uids = box.append(list(numbered_messages(2))).uids
    bridge = upstream.bridge(delete={"policy": "keep"})
    with client(bridge, box) as raw:
        assert raw.command(b"DELE 2").startswith(b"+OK")
        assert raw.command(b"QUIT").startswith(b"+OK")
    flags = {info.uid: info.flags for info in box.observer().messages()}
    assert sorted(flags) == uids
    assert "\\Seen" in flags[uids[1]] and "\\Seen" not in flags[uids[0]]


def test_per_client_policy_with_two_devices_and_expiry(upstream: Upstream) -> None:
    box = upstream.mailbox()
    messages = list(numbered_messages(3))
    uids = box.append(messages).uids
    bridge = upstream.bridge(delete={"policy": "per-client", "expire_after_days": 30})
    # Expiry counts the devices seen within the period: the printer makes itself known first.
    with RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT) as printer:
        printer.login(box.user + "#printer", box.password)
        assert printer.command(b"QUIT").startswith(b"+OK")
    phone = RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT)
    with phone:
        phone.login(box.user + "#phone", box.password)
        assert phone.command(b"DELE 1").startswith(b"+OK")
        assert phone.command(b"DELE 2").startswith(b"+OK")
        assert phone.command(b"QUIT").startswith(b"+OK")
    with RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT) as printer:
        printer.login(box.user + "#printer", box.password)
        assert printer.command(b"STAT").startswith(b"+OK 3 ")
        assert printer.command(b"DELE 1").startswith(b"+OK")
        assert printer.command(b"QUIT").startswith(b"+OK")
    with RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT) as phone_again:
        phone_again.login(box.user + "#phone", box.password)
        status, body = phone_again.command_multiline(b"RETR 1")
        assert pop3_unstuff(body) == retr_payload(messages[2])
        assert phone_again.command(b"STAT").startswith(b"+OK 1 ")
        assert phone_again.command(b"QUIT").startswith(b"+OK")
    # Message 1 was hidden by every device seen within the expiry period: expunged. The
    # others stay for the devices (and IMAP users) that have not hidden them.
    assert box.observer().uids() == uids[1:]


# -- what differs -----------------------------------------------------------------------------


def test_cyrus_refuses_a_message_without_any_line_end(cyrus: CyrusSandbox) -> None:
    box = cyrus.new_mailbox()
    try:
        with pytest.raises(SeedingError, match="invalid header"):
            box.append([tricky_messages()["single_line_no_crlf"]])
    finally:
        box.close()


def test_cyrus_restart_keeps_mail_and_the_bridge_reconnects() -> None:
    """The Cyrus sandbox itself: restartable on its port, mail kept, passwords checked."""
    workdir = tempfile.mkdtemp(prefix="bridge-cyrus-own-")
    try:
        with CyrusSandbox(workdir) as server:
            box = server.new_mailbox()
            messages = list(numbered_messages(2))
            box.append(messages)
            bridge = ThreadedBridge(bridge_settings(server.imap_port)).start()
            try:
                with client(bridge, box) as raw:
                    assert raw.command(b"QUIT").startswith(b"+OK")
                port = server.imap_port
                server.restart()
                assert server.imap_port == port
                with client(bridge, box) as raw:
                    status, body = raw.command_multiline(b"RETR 2")
                    assert pop3_unstuff(body) == retr_payload(messages[1])
                    assert raw.command(b"QUIT").startswith(b"+OK")
            finally:
                bridge.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
