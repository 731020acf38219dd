"""A real POP3 client in production use: Debian's fetchmail, run against the bridge, delivers
every message through an MDA that writes each one to a file. The delivered files are compared
with the messages as IMAP stores them, modulo what fetchmail documents it changes."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbox import Mailbox, big_message, numbered_messages, tricky_messages
from tests.harness import ThreadedBridge

FETCHMAIL = "/usr/bin/fetchmail"
# RFC 5322 caps lines at 998 octets. fetchmail 6.4 cuts longer lines at its 8 KiB buffer and
# inserts bytes from uninitialised memory there (it does the same against Dovecot's own POP3),
# so the two 20,000-octet-line messages of the corpus cannot be compared after fetchmail.
RFC5322_MAX_LINE = 998

# fetchmail puts its own trace header on top: "Received: from ... by ... with POP3 (fetchmail-x)
# for <...>; date", folded over several lines.
_RECEIVED = re.compile(rb"\AReceived: [^\n]*\n(?:[ \t][^\n]*\n)*")
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)


def fetchmail_corpus() -> list[bytes]:
    """The tricky corpus (lines up to RFC 5322's limit), a message of 2 MiB (two 1 MiB fetch
    chunks and then some), and a few ordinary ones: each with a distinct Message-ID."""
    messages = [
        data
        for data in tricky_messages().values()
        if max(len(line) for line in data.split(b"\r\n")) <= RFC5322_MAX_LINE
    ]
    messages.append(big_message(2 * 1024 * 1024 + 12345, tag="fetchmail-big"))
    messages.extend(numbered_messages(5))
    return messages


def as_fetchmail_delivers(stored: bytes) -> bytes:
    """What fetchmail hands its MDA for a message, apart from its Received header: LF line
    endings (fetchmail strips the CR of CRLF before an MDA, see its "stripcr" option), a final
    newline if the message lacked one, and a blank line after a header with no body."""
    data = stored.replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    if b"\n\n" not in data:
        data += b"\n"
    return data


def message_key(data: bytes) -> bytes:
    found = _MESSAGE_ID.search(data)
    if found:
        return found.group(1)
    # The corpus's one-line message has no Message-ID; its only line is unique.
    return data.split(b"\n", 1)[0].rstrip(b"\r")


@dataclass
class FetchmailRun:
    returncode: int
    output: str
    delivered: list[bytes]


class Fetchmail:
    """fetchmail with a private HOME (so ~/.fetchids, ~/.fetchmailrc and the pid file are the
    test's own) and an MDA script that stores each message in its own file."""

    def __init__(self, home: Path) -> None:
        if not Path(FETCHMAIL).is_file():
            raise AssertionError(f"{FETCHMAIL} is missing; install the Debian package fetchmail")
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.maildir = home / "delivered"
        self.maildir.mkdir()
        self.mda = home / "mda.sh"
        self.mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {self.maildir}/msg.XXXXXXXXXX)"\n')
        self.mda.chmod(0o755)
        self.rcfile = home / "fetchmailrc"
        self._runs = 0

    def run(self, port: int, mailbox: Mailbox, options: str, server_options: str = "") -> FetchmailRun:
        # sslproto "": fetchmail 6.4 insists on STARTTLS by default; this bridge is plaintext
        # on loopback. "no rewrite": leave the headers alone.
        self.rcfile.write_text(
            "set no bouncemail\n"
            "set no syslog\n"
            f"poll 127.0.0.1 protocol POP3 port {port} timeout 60 {server_options}\n"
            f'  user "{mailbox.user}" there with password "{mailbox.password}"\n'
            f'  options {options} no rewrite sslproto ""\n'
            f'  mda "{self.mda}"\n'
        )
        self.rcfile.chmod(0o600)  # fetchmail refuses an rcfile others can read
        before = set(self.maildir.iterdir())
        env = {
            "HOME": str(self.home),
            "FETCHMAILHOME": str(self.home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
        }
        result = subprocess.run(
            [FETCHMAIL, "-f", str(self.rcfile), "--nodetach", "-v"],
            env=env, capture_output=True, timeout=300, stdin=subprocess.DEVNULL, cwd=self.home,
        )
        new = sorted(set(self.maildir.iterdir()) - before)
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        return FetchmailRun(result.returncode, output, [path.read_bytes() for path in new])


@pytest.fixture
def fetchmail(tmp_path: Path) -> Fetchmail:
    return Fetchmail(tmp_path / "fetchmail-home")


def assert_delivered_intact(run: FetchmailRun, stored: list[bytes]) -> None:
    assert run.returncode == 0, run.output
    delivered: dict[bytes, bytes] = {}
    for data in run.delivered:
        received = _RECEIVED.match(data)
        assert received is not None, f"no Received header from fetchmail: {data[:200]!r}"
        body = data[received.end() :]
        key = message_key(body)
        assert key not in delivered, f"{key!r} delivered twice"
        delivered[key] = body
    expected = {message_key(as_fetchmail_delivers(data)): as_fetchmail_delivers(data) for data in stored}
    assert sorted(delivered) == sorted(expected), run.output[-3000:]
    for key, data in expected.items():
        assert delivered[key] == data, f"{key!r} changed on the way"


def test_fetchmail_keep_retrieves_everything_and_leaves_it(
    bridge: ThreadedBridge, mailbox: Mailbox, fetchmail: Fetchmail
) -> None:
    messages = fetchmail_corpus()
    uids = mailbox.append(messages).uids
    observer = mailbox.observer()
    stored = [observer.fetch(uid) for uid in uids]

    run = fetchmail.run(bridge.port, mailbox, "keep fetchall")
    assert_delivered_intact(run, stored)
    assert mailbox.observer().uids() == uids, "keep: nothing may be deleted"

    # A second run with keep and UIDL bookkeeping (fetchmail's .fetchids) finds nothing new:
    # the UIDLs are stable across sessions, so a device does not download everything again.
    first = fetchmail.run(bridge.port, mailbox, "keep", server_options="uidl")
    second = fetchmail.run(bridge.port, mailbox, "keep", server_options="uidl")
    assert first.returncode == 0, first.output
    assert len(first.delivered) == len(messages)
    assert second.returncode == 1, second.output  # 1: no mail
    assert second.delivered == []
    assert mailbox.observer().uids() == uids


def test_fetchmail_without_keep_empties_the_mailbox(
    bridge: ThreadedBridge, mailbox: Mailbox, fetchmail: Fetchmail
) -> None:
    messages = fetchmail_corpus()
    uids = mailbox.append(messages).uids
    observer = mailbox.observer()
    stored = [observer.fetch(uid) for uid in uids]

    run = fetchmail.run(bridge.port, mailbox, "nokeep fetchall")
    assert_delivered_intact(run, stored)
    assert mailbox.observer().uids() == [], "fetchmail deleted what it fetched"

    again = fetchmail.run(bridge.port, mailbox, "nokeep fetchall")
    assert again.returncode == 1, again.output  # 1: no mail
    assert again.delivered == []

