"""Logging in: the RFC 3206 / RFC 2449 response codes a client acts on, and that a failed
login leaves the connection usable."""

from __future__ import annotations

import poplib
from collections.abc import Callable

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import (
    Pop3Client,
    RawPop3,
    ThreadedBridge,
    free_port,
    wait_for_event,
)


def login_error(pop: poplib.POP3, user: str, password: str) -> bytes:
    assert pop.user(user).startswith(b"+OK")
    with pytest.raises(poplib.error_proto) as caught:
        pop.pass_(password)
    return caught.value.args[0]


def test_wrong_password_is_auth_and_the_client_may_try_again(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    mailbox.append(numbered_messages(2))
    with Pop3Client(bridge.port) as pop:
        reply = login_error(pop, mailbox.user, mailbox.password + "-wrong")
        assert reply.startswith(b"-ERR [AUTH]"), reply
        reply = login_error(pop, "no-such-user-" + mailbox.user, mailbox.password)
        assert reply.startswith(b"-ERR [AUTH]"), reply
        # Still in AUTHORIZATION: transaction commands are refused, a good login works.
        with pytest.raises(poplib.error_proto):
            pop.stat()
        pop.user(mailbox.user)
        assert pop.pass_(mailbox.password).startswith(b"+OK")
        assert pop.stat()[0] == 2
        assert pop.quit().startswith(b"+OK")


def test_upstream_down_is_sys_temp(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    # Nothing listens on a port that was free a moment ago: connection refused. The bridge
    # retries within upstream.timeout_seconds before it gives up; 2 s keeps the test short.
    bridge = bridge_factory(upstream={"port": free_port(), "timeout_seconds": 2})
    with Pop3Client(bridge.port) as pop:
        assert pop.getwelcome().startswith(b"+OK"), "the POP3 side is up without IMAP"
        reply = login_error(pop, mailbox.user, mailbox.password)
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        # The session goes on: the client may retry, and QUIT closes it cleanly.
        reply = login_error(pop, mailbox.user, mailbox.password)
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        assert "TOP" in pop.capa()
        assert pop.quit().startswith(b"+OK")
    assert wait_for_event(bridge, "login_failed", user=mailbox.user)["reason"] == "upstream"


def test_second_concurrent_session_is_in_use(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    mailbox.append(numbered_messages(2))
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as first:
        assert first.stat()[0] == 2
        with Pop3Client(bridge.port) as second:
            reply = login_error(second, mailbox.user, mailbox.password)
            assert reply.startswith(b"-ERR [IN-USE]"), reply
            # The first session is unaffected, and so is its mailbox.
            assert first.dele(1).startswith(b"+OK")
            assert first.quit().startswith(b"+OK")
            # With the first session over, the same connection can now log in.
            second.user(mailbox.user)
            assert second.pass_(mailbox.password).startswith(b"+OK")
            assert second.stat()[0] == 1
            assert second.quit().startswith(b"+OK")


def test_other_accounts_are_not_in_use(
    bridge: ThreadedBridge, mailbox_factory: Callable[[], Mailbox]
) -> None:
    first_box, second_box = mailbox_factory(), mailbox_factory()
    with Pop3Client(bridge.port, first_box.user, first_box.password) as first, Pop3Client(
        bridge.port, second_box.user, second_box.password
    ) as second:
        assert first.stat() == (0, 0)
        assert second.stat() == (0, 0)


def test_dropped_session_releases_the_maildrop(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    """A device that loses its connection must be able to log in again."""
    with RawPop3("127.0.0.1", bridge.port) as raw:
        raw.login(mailbox.user, mailbox.password)
        session = wait_for_event(bridge, "login_ok", user=mailbox.user)["session"]
    wait_for_event(bridge, "session_end", session=session)
    with Pop3Client(bridge.port, mailbox.user, mailbox.password) as pop:
        assert pop.stat() == (0, 0)
        assert pop.quit().startswith(b"+OK")
