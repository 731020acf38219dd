"""A hostile or misbehaving IMAP server: what it may not make the bridge do.

No real server sends these, so the upstream here is a scripted stub on loopback
(tests/imap_stub.py); everything in front of it is the real bridge and a real POP3 client.
An on-path attacker reaches the same place whenever the upstream connection is not TLS
(`upstream.tls = "none"`), or before STARTTLS.
"""

from __future__ import annotations

import poplib
from collections.abc import Callable

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
            return str(exc.args[0].decode())
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
