"""What the bridge writes to its log, as an operator reads it: sessions are traceable by one
id, and no password ever appears, whether the login worked or not."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.harness import (
    Pop3Client,
    RawPop3,
    SubprocessBridge,
    ThreadedBridge,
    wait_for_event,
)


def secret_forms(user: str, password: str) -> list[str]:
    """The password, and the forms it takes on the way upstream (SASL PLAIN's base64 token,
    LOGIN's quoted string), any of which in a log would leak it."""
    forms = [password]
    token = b"\0" + user.encode() + b"\0" + password.encode()
    forms.append(base64.b64encode(token).decode())
    forms.append(base64.b64encode(password.encode()).decode())
    return forms


def login_attempts(port: int, mailbox: Mailbox, wrong: list[str]) -> None:
    with RawPop3("127.0.0.1", port) as pop:
        for password in wrong:
            assert pop.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
            assert pop.command(b"PASS " + password.encode()).startswith(b"-ERR [AUTH]")
        pop.login(mailbox.user, mailbox.password)
        assert pop.command(b"STAT").startswith(b"+OK")
        # A second session while this one holds the maildrop: [IN-USE], with a password.
        with RawPop3("127.0.0.1", port) as other:
            other.command(b"USER " + mailbox.user.encode())
            assert other.command(b"PASS " + mailbox.password.encode()).startswith(b"-ERR [IN-USE]")
        assert pop.command(b"QUIT").startswith(b"+OK")


@pytest.fixture
def distinctive_mailbox(dovecot: DovecotSandbox) -> Iterator[Mailbox]:
    box = dovecot.new_mailbox(password="Corr3ct-H0rse-" + os.urandom(6).hex())
    yield box
    box.close()


def test_passwords_never_appear_in_the_log(
    bridge: ThreadedBridge, distinctive_mailbox: Mailbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # anything sent to stdlib logging too (aioimaplib's)
    box = distinctive_mailbox
    box.append(numbered_messages(1))
    wrong = ["Wr0ng-Battery-" + os.urandom(6).hex(), "Wr0ng Staple with spaces " + os.urandom(4).hex()]
    login_attempts(bridge.port, box, wrong)
    wait_for_event(bridge, "session_end", user=box.user, outcome="quit")

    log = bridge.log.getvalue() + caplog.text
    # The log did record the logins (debug level, every command), so it is not just empty.
    events = [event["event"] for event in bridge.events()]
    assert "login_failed" in events and "login_ok" in events
    assert box.user in log
    for password in [box.password, *wrong]:
        for form in secret_forms(box.user, password):
            assert form not in log, f"a password ({form!r}) is in the log"


def test_passwords_never_appear_in_the_real_process_output(
    dovecot: DovecotSandbox,
    distinctive_mailbox: Mailbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same with `python -m bridge serve`: everything the process prints (stdout and
    stderr, at debug level) is scanned, not just what structlog renders."""
    box = distinctive_mailbox
    box.append(numbered_messages(1))
    monkeypatch.setenv("BRIDGE_LOGGING__LEVEL", "debug")
    wrong = ["Wr0ng-Subprocess-" + os.urandom(6).hex()]
    with SubprocessBridge(tmp_path, dovecot.imap_port) as bridge:
        login_attempts(bridge.port, box, wrong)
    output = bridge.log_path.read_text(errors="replace")
    assert '"login_ok"' in output and '"login_failed"' in output and '"command"' in output
    for password in [box.password, *wrong]:
        for form in secret_forms(box.user, password):
            assert form not in output, f"a password ({form!r}) is in the process output"


def test_session_events_share_one_session_id(
    bridge_factory: Callable[..., ThreadedBridge], mailbox_factory: Callable[[], Mailbox]
) -> None:
    bridge = bridge_factory()
    first, second = mailbox_factory(), mailbox_factory()
    first.append(numbered_messages(1))
    with Pop3Client(bridge.port, first.user, first.password) as a, Pop3Client(
        bridge.port, second.user, second.password
    ) as b:
        a.retr(1)
        b.stat()
        assert a.quit().startswith(b"+OK")
        assert b.quit().startswith(b"+OK")

    ids = set()
    for box in (first, second):
        login = wait_for_event(bridge, "login_ok", user=box.user)
        session = login["session"]
        ids.add(session)
        end = wait_for_event(bridge, "session_end", session=session)
        assert end["outcome"] == "quit"
        events = [event for event in bridge.events() if event.get("session") == session]
        names = [event["event"] for event in events]
        assert names[0] == "session_start" and names[-1] == "session_end", names
        assert "login_ok" in names
        # Every event of the session carries its peer, and after login its user.
        assert len({event.get("peer") for event in events}) == 1
        assert all(event.get("user") == box.user for event in events[names.index("login_ok") :])
    assert len(ids) == 2, "two sessions, two ids"

