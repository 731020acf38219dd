"""Bad input from a client: every bad line gets exactly one -ERR and the session carries on
(the next command is answered +OK, and the maildrop is as it was)."""

from __future__ import annotations

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, pop3_unstuff

# Lines a client might send before logging in, none of which may be accepted.
BAD_BEFORE_LOGIN = [
    pytest.param(b"FOO", id="unknown-command"),
    pytest.param(b"", id="empty-line"),
    pytest.param(b"   ", id="only-spaces"),
    pytest.param(b"STAT", id="STAT-before-login"),
    pytest.param(b"LIST", id="LIST-before-login"),
    pytest.param(b"RETR 1", id="RETR-before-login"),
    pytest.param(b"DELE 1", id="DELE-before-login"),
    pytest.param(b"NOOP", id="NOOP-before-login"),
    pytest.param(b"RSET", id="RSET-before-login"),
    pytest.param(b"TOP 1 0", id="TOP-before-login"),
    pytest.param(b"UIDL", id="UIDL-before-login"),
    pytest.param(b"PASS secret", id="PASS-without-USER"),
    pytest.param(b"USER", id="USER-without-name"),
    pytest.param(b"\xff\xfe\xfd", id="invalid-utf8"),
    pytest.param(b"CA\xc3\x28PA", id="invalid-utf8-in-keyword"),
    pytest.param(b"NO\x00OP", id="nul-in-keyword"),
    pytest.param(b"CAPA\x00", id="nul-after-keyword"),
    pytest.param(b"USER " + b"u" * 300, id="over-long-line"),
    pytest.param(b"X" * 100_000, id="100-kB-line"),
]

# Lines a logged-in client might send, against a maildrop of 3 messages where 1 is DELE'd.
BAD_IN_TRANSACTION = [
    pytest.param(b"FOO", id="unknown-command"),
    pytest.param(b"XTND XMIT", id="unknown-extension"),
    pytest.param(b"", id="empty-line"),
    pytest.param(b"RETR", id="RETR-missing-number"),
    pytest.param(b"DELE", id="DELE-missing-number"),
    pytest.param(b"TOP", id="TOP-missing-everything"),
    pytest.param(b"TOP 2", id="TOP-missing-line-count"),
    pytest.param(b"RETR abc", id="RETR-non-numeric"),
    pytest.param(b"RETR 1.5", id="RETR-fraction"),
    pytest.param(b"RETR -2", id="RETR-negative"),
    pytest.param(b"RETR +2", id="RETR-plus-sign"),
    pytest.param(b"LIST x", id="LIST-non-numeric"),
    pytest.param(b"UIDL 2x", id="UIDL-trailing-garbage"),
    pytest.param(b"DELE two", id="DELE-non-numeric"),
    pytest.param(b"TOP x 1", id="TOP-non-numeric-number"),
    pytest.param(b"TOP 2 x", id="TOP-non-numeric-lines"),
    pytest.param(b"TOP 2 -1", id="TOP-negative-lines"),
    pytest.param(b"RETR 0", id="RETR-0"),
    pytest.param(b"LIST 0", id="LIST-0"),
    pytest.param(b"UIDL 0", id="UIDL-0"),
    pytest.param(b"DELE 0", id="DELE-0"),
    pytest.param(b"TOP 0 1", id="TOP-0"),
    pytest.param(b"RETR 4", id="RETR-past-end"),
    pytest.param(b"LIST 99", id="LIST-past-end"),
    pytest.param(b"UIDL 99", id="UIDL-past-end"),
    pytest.param(b"DELE 4", id="DELE-past-end"),
    pytest.param(b"TOP 99 0", id="TOP-past-end"),
    pytest.param(b"RETR 99999999999999999999999999", id="RETR-huge-number"),
    pytest.param(b"RETR 1", id="RETR-deleted-message"),
    pytest.param(b"DELE 1", id="DELE-deleted-message"),
    pytest.param(b"LIST 1", id="LIST-deleted-message"),
    pytest.param(b"TOP 1 0", id="TOP-deleted-message"),
    pytest.param(b"USER someone", id="USER-after-login"),
    pytest.param(b"PASS secret", id="PASS-after-login"),
    pytest.param(b"NOOP " + b"x" * 300, id="over-long-line"),
    # The part past the limit must not be read as a command of its own.
    pytest.param(b"NOOP" + b" " * 300 + b"DELE 2", id="over-long-line-hiding-a-command"),
    pytest.param(b"X" * 100_000, id="100-kB-line"),
    pytest.param(b"STAT\x00", id="nul-after-keyword"),
    pytest.param(b"RETR \x002", id="nul-in-argument"),
    pytest.param(b"\xc3\x28", id="invalid-utf8"),
    pytest.param(b"RETR \xff", id="invalid-utf8-argument"),
    pytest.param(b"LIST \xe2\x82", id="truncated-utf8-argument"),
    pytest.param(b"RETR \xd9\xa2", id="arabic-indic-digit"),
]


def test_bad_lines_before_login_are_refused_and_login_still_works(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    mailbox.append(numbered_messages(1))
    with RawPop3("127.0.0.1", bridge.port) as pop:
        for param in BAD_BEFORE_LOGIN:
            (line,) = param.values
            reply = pop.command(line)
            assert reply.startswith(b"-ERR"), (param.id, reply)
            status, _ = pop.command_multiline(b"CAPA")
            assert status.startswith(b"+OK"), (param.id, status)
        pop.login(mailbox.user, mailbox.password)
        assert pop.command(b"STAT").startswith(b"+OK 1 ")


@pytest.mark.parametrize("line", BAD_IN_TRANSACTION)
def test_bad_line_in_transaction_gets_err_and_session_continues(
    bridge: ThreadedBridge, mailbox: Mailbox, line: bytes
) -> None:
    messages = list(numbered_messages(3))
    mailbox.append(messages)
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.login(mailbox.user, mailbox.password)
        assert pop.command(b"DELE 1").startswith(b"+OK")
        before = pop.command(b"STAT")

        reply = pop.command(line)
        assert reply.startswith(b"-ERR"), reply
        assert pop.command(b"NOOP").startswith(b"+OK")
        assert pop.command(b"STAT") == before
        status, body = pop.command_multiline(b"RETR 2")
        assert status.startswith(b"+OK") and pop3_unstuff(body) == messages[1]
        assert pop.command(b"QUIT").startswith(b"+OK")
    # Only the DELE'd message is gone.
    assert len(mailbox.observer().uids()) == 2


def test_bad_lines_pipelined_in_one_write(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    """The same bad lines sent back to back, each followed by NOOP, in a single write: the
    answers come in order, one per line."""
    mailbox.append(numbered_messages(3))
    lines = [param.values[0] for param in BAD_IN_TRANSACTION]
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.login(mailbox.user, mailbox.password)
        assert pop.command(b"DELE 1").startswith(b"+OK")
        pop.send(b"".join(line + b"\r\nNOOP\r\n" for line in lines) + b"STAT\r\n")
        for line in lines:
            assert pop.status().startswith(b"-ERR"), line[:40]
            assert pop.status() == b"+OK\r\n", line[:40]
        assert pop.status().startswith(b"+OK 2 ")


def test_invalid_utf8_credentials_get_auth_error_and_session_continues(
    bridge: ThreadedBridge, mailbox: Mailbox
) -> None:
    mailbox.append(numbered_messages(1))
    with RawPop3("127.0.0.1", bridge.port) as pop:
        assert pop.command(b"USER \xff\xfe" + mailbox.user.encode()).startswith(b"+OK")
        assert pop.command(b"PASS \xc3\x28").startswith(b"-ERR [AUTH]")
        assert pop.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
        assert pop.command(b"PASS \xff" + mailbox.password.encode()).startswith(b"-ERR [AUTH]")
        pop.login(mailbox.user, mailbox.password)
        assert pop.command(b"STAT").startswith(b"+OK 1 ")


def test_line_ending_in_bare_lf_is_accepted(bridge: ThreadedBridge, mailbox: Mailbox) -> None:
    """Not bad input, but often mistaken for it: sloppy clients end lines with LF only, and
    command keywords are case-insensitive (RFC 1939 section 3)."""
    mailbox.append(numbered_messages(2))
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.send(b"user " + mailbox.user.encode() + b"\n")
        assert pop.status().startswith(b"+OK")
        pop.send(b"pass " + mailbox.password.encode() + b"\n")
        assert pop.status().startswith(b"+OK")
        pop.send(b"sTaT\n")
        assert pop.status().startswith(b"+OK 2 ")
