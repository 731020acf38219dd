"""The IMAP server restarts (Dovecot stopped and started on the same ports) between POP3
sessions, while a session is open, and while the bridge holds a parked connection
(bridge.imap.pool). The bridge must reconnect by itself, answer every command (or close)
within its timeout, and lose nothing.

These tests own their Dovecot: stopping the session-wide one would break every other test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox import DovecotSandbox, Mailbox, big_message, numbered_messages
from tests.harness import (
    RawPop3,
    ThreadedBridge,
    bridge_settings,
    pop3_unstuff,
    retr_payload,
    wait_for_event,
)

TEMP = b"-ERR [SYS/TEMP]"
CLIENT_TIMEOUT = 60.0

# The guarantees hold on both engines: every test here runs on each.
pytestmark = pytest.mark.usefixtures("on_every_engine")


@pytest.fixture
def restart_bridge(own_dovecot: DovecotSandbox) -> Iterator[ThreadedBridge]:
    # A short timeout: a connection that died with the server must not hold anyone long.
    bridge = ThreadedBridge(bridge_settings(own_dovecot.imap_port, upstream={"timeout_seconds": 5})).start()
    try:
        yield bridge
    finally:
        bridge.stop()


def client(bridge: ThreadedBridge, box: Mailbox) -> RawPop3:
    raw = RawPop3("127.0.0.1", bridge.port, timeout=CLIENT_TIMEOUT)
    raw.login(box.user, box.password)
    return raw


def poll_all(bridge: ThreadedBridge, box: Mailbox) -> tuple[list[bytes], list[bytes]]:
    """RETR and UIDL of every message, then QUIT (which parks the upstream connection)."""
    with client(bridge, box) as raw:
        count = int(raw.command(b"STAT").split()[1])
        bodies, uidls = [], []
        for n in range(1, count + 1):
            status, body = raw.command_multiline(b"RETR %d" % n)
            assert status.startswith(b"+OK")
            bodies.append(pop3_unstuff(body))
            uidls.append(raw.command(b"UIDL %d" % n).split()[2])
        assert raw.command(b"QUIT").startswith(b"+OK")
    return bodies, uidls


def test_server_restarted_between_sessions(own_dovecot: DovecotSandbox, restart_bridge: ThreadedBridge) -> None:
    box = own_dovecot.new_mailbox()
    messages = list(numbered_messages(3))
    box.append(messages)
    bodies, uidls = poll_all(restart_bridge, box)
    assert bodies == [retr_payload(m) for m in messages]
    # The first session's connection is parked for the account's next session (the pool):
    # the restart kills it under the bridge's feet.
    wait_for_event(restart_bridge, "pool_parked")
    own_dovecot.restart()
    assert poll_all(restart_bridge, box) == (bodies, uidls)
    # Twice, so a connection parked after the restart is reused, too.
    assert poll_all(restart_bridge, box) == (bodies, uidls)


def test_server_down_then_back(own_dovecot: DovecotSandbox, restart_bridge: ThreadedBridge) -> None:
    box = own_dovecot.new_mailbox()
    messages = list(numbered_messages(2))
    box.append(messages)
    bodies, uidls = poll_all(restart_bridge, box)
    own_dovecot.stop()
    try:
        with RawPop3("127.0.0.1", restart_bridge.port, timeout=CLIENT_TIMEOUT) as raw:
            assert raw.command(b"USER " + box.user.encode()).startswith(b"+OK")
            reply = raw.command(b"PASS " + box.password.encode())
            if reply.startswith(b"+OK"):
                # A parked connection served the login (its server process may outlive the
                # master by a moment): whatever RETR says, it is never a wrong message.
                status, body = raw.command_multiline(b"RETR 1")
                if status.startswith(b"+OK"):
                    assert pop3_unstuff(body) == bodies[0]
                else:
                    assert status.startswith(TEMP)
            else:
                assert reply.startswith(TEMP)
    finally:
        own_dovecot.start()
    assert poll_all(restart_bridge, box) == (bodies, uidls)


def test_server_restarted_during_a_session(own_dovecot: DovecotSandbox, restart_bridge: ThreadedBridge) -> None:
    box = own_dovecot.new_mailbox()
    # The middle one too big for the read-ahead: its RETR needs the server.
    messages = [*numbered_messages(1), big_message(2 * 1024 * 1024), *numbered_messages(1, start=3)]
    uids = box.append(messages).uids
    with client(restart_bridge, box) as raw:
        status, body = raw.command_multiline(b"RETR 1")
        assert pop3_unstuff(body) == retr_payload(messages[0])
        assert raw.command(b"DELE 1").startswith(b"+OK")
        # Dovecot's imap processes outlive their master (each serves its client to the
        # end): kicked first, the session's connection dies with the server, as on a
        # server whose restart ends its clients.
        own_dovecot.kick(box.user)
        own_dovecot.restart()
        # The client was between commands: nothing was in flight, so the bridge takes
        # another connection for the session's next command, with its snapshot unchanged.
        status, body = raw.command_multiline(b"RETR 2")
        assert status.startswith(b"+OK")
        assert pop3_unstuff(body) == retr_payload(messages[1])
        assert raw.command(b"QUIT").startswith(b"+OK")
    remaining = box.observer().uids()
    assert remaining == uids[1:]
    assert wait_for_event(restart_bridge, "upstream_checked_out_again", reason="broken")
    # And the next session works.
    with client(restart_bridge, box) as raw:
        assert raw.command(b"STAT").startswith(b"+OK %d " % len(remaining))
        assert raw.command(b"QUIT").startswith(b"+OK")


def test_quit_after_the_server_ended_the_sessions_connection_applies_its_deletions(
    own_dovecot: DovecotSandbox, restart_bridge: ThreadedBridge
) -> None:
    # The server ends an IMAP connection while its POP3 client is between commands (an
    # administrator's kick here; an IMAP idle logout, a proxy's timeout alike): the
    # deletions the client marked are applied at QUIT on another connection, not lost.
    box = own_dovecot.new_mailbox()
    messages = list(numbered_messages(3))
    uids = box.append(messages).uids
    with client(restart_bridge, box) as raw:
        assert raw.command(b"DELE 2").startswith(b"+OK")
        own_dovecot.kick(box.user)
        assert raw.command(b"QUIT").startswith(b"+OK")
    assert box.observer().uids() == [uids[0], uids[2]]
    assert wait_for_event(restart_bridge, "upstream_checked_out_again", reason="broken")
