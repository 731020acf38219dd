"""A hostile or misbehaving IMAP server: what it may not make the bridge do.

No real server sends these, so the upstream here is a scripted stub on loopback
(tests/imap_stub.py); everything in front of it is the real bridge and a real POP3 client.
An on-path attacker reaches the same place whenever the upstream connection is not TLS
(`upstream.tls = "none"`), or before STARTTLS.
"""

from __future__ import annotations

import poplib
from collections.abc import Callable
from contextlib import closing

import pytest

from tests.harness import ThreadedBridge, wait_for_event
from tests.imap_stub import StubConnection, StubImapServer, stub_settings

BridgeFactory = Callable[..., ThreadedBridge]


@pytest.fixture(params=["trio", "aioimaplib"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pass_reply(bridge: ThreadedBridge, user: str = "victim", password: str = "any password at all") -> str:
    """The answer to PASS (poplib raises on -ERR: its message is the reply)."""
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=60)
    try:
        pop.user(user)
        try:
            return pop.pass_(password).decode()
        except poplib.error_proto as exc:
            answer = exc.args[0]  # poplib's own "-ERR EOF" (connection closed) is a str
            return answer.decode() if isinstance(answer, bytes) else str(answer)
    finally:
        pop.close()


class PreauthStub(StubImapServer):
    """Greets with PREAUTH: "you are logged in already", as an attacker would to skip LOGIN
    and STARTTLS, and serves its own mail to whoever comes."""

    capabilities = b"IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR"

    def greeting(self, connection: StubConnection) -> bytes:
        return b"* PREAUTH hi\r\n"


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_a_preauth_greeting_is_refused(bridge_factory: BridgeFactory, engine: str, tls: str) -> None:
    """Either engine used to skip LOGIN after PREAUTH (any POP3 password accepted), and
    aioimaplib skipped STARTTLS too. The POP3 client now hears -ERR [SYS/TEMP]: the fault is
    the server's, not the password's, so [AUTH] would wrongly ask the user for another one."""
    with PreauthStub(messages=[b"Subject: from the attacker\r\n\r\nhi\r\n"]) as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine=engine, tls=tls))
        reply = pass_reply(bridge)
        assert reply.startswith("-ERR [SYS/TEMP]"), reply
        failed = wait_for_event(bridge, "login_failed", reason="upstream")
        assert "PREAUTH" in failed["error"]
        # Nothing of the attacker's mailbox was looked at, nothing more was said.
        assert [c for c in stub.commands() if not c.upper().startswith(b"LOGOUT")] == []


# -- numbers that would become memory -----------------------------------------------------------


class HostileStub(StubImapServer):
    """Sane for "bystander"; for "victim", `hostile_select` and `hostile_listing` (bytes to
    add to the SELECT answer, or to the listing FETCH answer) and `hostile_body` (the whole
    answer to a body FETCH, tagged line aside)."""

    capabilities = b"IMAP4rev1 AUTH=PLAIN SASL-IR ENABLE CONDSTORE QRESYNC"
    hostile_select = b""
    hostile_listing = b""
    hostile_body = b""

    def select_answer(self, connection: StubConnection) -> bytes:
        sane = super().select_answer(connection) + b"* OK [HIGHESTMODSEQ 5] modseq\r\n"
        if connection.user != "victim":
            return sane
        if b" EXISTS" in self.hostile_select:  # in place of the true count
            sane = b"".join(line for line in sane.splitlines(keepends=True) if b" EXISTS" not in line)
        return sane + self.hostile_select

    def fetch_answer(self, connection: StubConnection, command: bytes) -> bytes:
        if connection.user == "victim":
            if self.hostile_body and b"BODY.PEEK" in command.upper():
                return self.hostile_body
            if self.hostile_listing and b"RFC822.SIZE" in command.upper():
                return self.hostile_listing + super().fetch_answer(connection, command)
        return super().fetch_answer(connection, command)


def hostile(**answers: bytes) -> HostileStub:
    stub = HostileStub(messages=[b"Subject: one\r\n\r\nfirst\r\n"])
    for name, value in answers.items():
        setattr(stub, name, value)
    return stub


def bystander_is_served(bridge: ThreadedBridge) -> None:
    """The service goes on: another session, on the same bridge and upstream, works."""
    with closing(poplib.POP3("127.0.0.1", bridge.port, timeout=60)) as pop:
        pop.user("bystander")
        pop.pass_("pw")
        assert pop.stat()[0] == 1
        pop.quit()


def login_refused_for_a_hostile_number(bridge: ThreadedBridge, stub: HostileStub, what: str) -> None:
    reply = pass_reply(bridge)
    assert reply.startswith("-ERR [SYS/TEMP]"), reply
    failed = wait_for_event(bridge, "login_failed", user="victim")
    assert what in failed["error"], failed
    bystander_is_served(bridge)
    # The connection that carried the number was dropped, not parked: the next login
    # connects afresh.
    pass_reply(bridge)
    assert stub.connections_of("victim") == 2


def test_a_huge_exists_count_fails_the_login(bridge_factory: BridgeFactory, engine: str) -> None:
    """`* 4294967295 EXISTS` was a list of that many entries (the trio engine: a MemoryError
    that crashed the session) or was believed (aioimaplib)."""
    with hostile(hostile_select=b"* 4294967295 EXISTS\r\n") as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine=engine))
        login_refused_for_a_hostile_number(bridge, stub, "EXISTS")
        # Nothing was asked after the SELECT that announced it.
        victim = [c for c in stub.commands() if b"RFC822.SIZE" in c.upper()]
        assert len(victim) == 1  # the bystander's listing only


def test_a_huge_sequence_number_fails_the_login(bridge_factory: BridgeFactory) -> None:
    """The trio engine keeps the server's numbering (`* 4294967295 FETCH` would grow it to
    that); aioimaplib's listing never looks at sequence numbers."""
    with hostile(hostile_listing=b"* 4294967295 FETCH (UID 7 RFC822.SIZE 10 FLAGS ())\r\n") as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine="trio"))
        login_refused_for_a_hostile_number(bridge, stub, "sequence number")


def test_a_vanished_range_over_every_uid_fails_the_login(bridge_factory: BridgeFactory) -> None:
    """QRESYNC's VANISHED (trio engine only: aioimaplib does not enable QRESYNC) used to
    become a set of every UID in the range: four billion here."""
    with hostile(hostile_listing=b"* VANISHED 1:4294967295\r\n") as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine="trio"))
        login_refused_for_a_hostile_number(bridge, stub, "VANISHED")


def test_a_vanished_earlier_range_over_every_uid_costs_nothing(bridge_factory: BridgeFactory) -> None:
    """VANISHED (EARLIER) may name UIDs that never existed (RFC 7162), so a wide range is no
    error; it is applied to the listing without being spelt out UID by UID."""
    with hostile(hostile_listing=b"* VANISHED (EARLIER) 1:4294967295\r\n") as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine="trio"))
        with closing(poplib.POP3("127.0.0.1", bridge.port, timeout=60)) as pop:
            pop.user("victim")
            pop.pass_("pw")
            assert pop.stat()[0] == 1  # the listing's message came after the VANISHED


def test_a_huge_literal_fails_the_login_at_once(bridge_factory: BridgeFactory, engine: str) -> None:
    """A literal announced as 4 GiB where no message body was asked for: the engines waited
    for (and would have held) all of it."""
    with hostile(hostile_select=b"* FLAGS {4294967295}\r\n") as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine=engine))
        login_refused_for_a_hostile_number(bridge, stub, "literal")


def test_a_body_literal_larger_than_asked_for_fails_the_retr(bridge_factory: BridgeFactory, engine: str) -> None:
    with hostile(hostile_body=b"* 1 FETCH (UID 1 BODY[]<0> {4294967295}\r\n" + b"x" * 100) as stub:
        bridge = bridge_factory(upstream=stub_settings(stub, engine=engine), pool={"park_seconds": 0})
        with closing(poplib.POP3("127.0.0.1", bridge.port, timeout=60)) as pop:
            pop.user("victim")
            pop.pass_("pw")
            with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                pop.retr(1)
        error = wait_for_event(bridge, "upstream_error", command="RETR")["error"]
        assert "literal" in error, error
        bystander_is_served(bridge)
