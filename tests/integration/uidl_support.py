"""What the UIDL tests share: old POP3 servers with their own UIDL schemes, a migration that
copies mail into the IMAP store through APPEND (changing what real migrations change),
real "leave mail on server" clients whose record of seen UIDLs is carried over to the
bridge's address, and `uidl import` run through the real command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sandbox import ImapObserver, numbered_messages
from tests.harness import TEST_STATE_KEY

REPO = Path(__file__).resolve().parents[2]
FETCHMAIL = "/usr/bin/fetchmail"
_SUBJECT = re.compile(rb"^Subject: ([^\r\n]*)", re.MULTILINE)
# The bridge listens on a second loopback address, so a client's record of seen UIDLs (kept
# per server address) must be carried over, as it would be by the device keeping its server
# name across the cut-over.
BRIDGE_HOST = "127.0.0.2"


def subjects(messages: list[bytes]) -> list[bytes]:
    found = []
    for data in messages:
        match = _SUBJECT.search(data)
        assert match is not None, data[:200]
        found.append(match.group(1))
    return found


def corpus(count: int, tag: str, start: int = 1) -> list[bytes]:
    """Numbered messages with a tag in the subject and Message-ID (distinct across tests)."""
    return [
        data.replace(b"Subject: message", f"Subject: {tag} message".encode()).replace(
            b"@sandbox.example.org>", f"@{tag}.example.org>".encode()
        )
        for data in numbered_messages(count, start=start)
    ]


def as_migrated(message: bytes) -> bytes:
    """What a migration tool copying through IMAP APPEND may store: a Return-Path on top (as
    a delivery adds one) and bare LF line ends, so the message's size and bytes on the IMAP
    side differ from the old server's."""
    return b"Return-Path: <sender@example.org>\n" + message.replace(b"\r\n", b"\n")


def migrate(messages: list[bytes], host: str, port: int, user: str, password: str, *, order: list[int] | None = None) -> list[int]:
    """APPEND `messages` (as_migrated, in `order` of their indexes) to the IMAP INBOX; their
    UIDs in the same order as `messages`."""
    from sandbox.seeding import append_messages

    order = order if order is not None else list(range(len(messages)))
    uids = append_messages(host, port, user, password, [as_migrated(messages[i]) for i in order]).uids
    by_index = dict(zip(order, uids, strict=True))
    return [by_index[i] for i in range(len(messages))]


def recreate_folder(host: str, port: int, user: str, password: str, folder: str) -> None:
    """Delete and re-create a folder with the same messages (new UIDVALIDITY): copied aside,
    the folder deleted, re-created, and the messages appended back in reverse order."""
    with ImapObserver(host, port, user, password, folder) as observer:
        imap = observer.imap
        messages = [observer.fetch(uid) for uid in observer.uids()]
        old = observer.uidvalidity()
        imap.close()
        assert imap.delete(f'"{folder}"')[0] == "OK"
        assert imap.create(f'"{folder}"')[0] == "OK"
    from sandbox.seeding import append_messages

    append_messages(host, port, user, password, list(reversed(messages)), mailbox=folder)
    with ImapObserver(host, port, user, password, folder) as observer:
        assert observer.uidvalidity() != old, "the re-created folder kept its UIDVALIDITY"


def write_config(path: Path, imap_port: int, extra: str = "", upstream: str = "") -> Path:
    """A bridge.toml for `uidl import`: the store on `imap_port`, the tests' state key, and
    `extra` sections (`upstream`: more [upstream] lines)."""
    path.write_text(
        f'[upstream]\nhost = "127.0.0.1"\nport = {imap_port}\ntls = "none"\n{upstream}'
        f'[delete]\nstate_key = "{TEST_STATE_KEY}"\n{extra}'
    )
    return path


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def uidl_import(config: Path, old_server: str, *args: str, stdin: str | None = None) -> CommandResult:
    """`pop3-imap-bridge uidl import --config CONFIG --from OLD_SERVER ARGS...` as a process."""
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("BRIDGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "uidl", "import", "--config", str(config), "--from", old_server, *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env, input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    return CommandResult(result.returncode, result.stdout, result.stderr)


class FetchmailKeep:
    """fetchmail in "leave mail on server" mode (`keep` and `uidl`): it downloads only
    messages whose UIDL is not in its .fetchids, and keeps that record per user and server
    address, like a device."""

    def __init__(self, home: Path, user: str, password: str) -> None:
        if not os.access(FETCHMAIL, os.X_OK):
            raise AssertionError(f"{FETCHMAIL} is missing; scripts/install-deps installs fetchmail")
        self.home, self.user, self.password = home, user, password
        self.delivered = home / "delivered"
        self.delivered.mkdir(parents=True)
        self.mda = home / "mda.sh"
        self.mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {self.delivered}/msg.XXXXXXXX)"\n')
        self.mda.chmod(0o755)

    def run(self, host: str, port: int) -> list[bytes]:
        """One poll; the messages delivered by it."""
        rcfile = self.home / "fetchmailrc"
        rcfile.write_text(
            "set no bouncemail\nset no syslog\n"
            f"poll {host} protocol POP3 port {port} uidl timeout 60\n"
            f'  user "{self.user}" there with password "{self.password}"\n'
            f'  options keep no rewrite sslproto ""\n  mda "{self.mda}"\n'
        )
        rcfile.chmod(0o600)
        before = set(self.delivered.iterdir())
        env = {"HOME": str(self.home), "FETCHMAILHOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        result = subprocess.run(
            [FETCHMAIL, "-f", str(rcfile), "--nodetach"], env=env, capture_output=True, timeout=300,
            stdin=subprocess.DEVNULL, cwd=self.home,
        )
        # 0: mail delivered, 1: no mail.
        assert result.returncode in (0, 1), (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        return [path.read_bytes() for path in sorted(set(self.delivered.iterdir()) - before)]

    def carry_over(self, old_host: str, new_host: str) -> int:
        """Rewrite the seen-UIDL record's server key; the number of UIDLs carried."""
        path = self.home / ".fetchids"
        lines = path.read_text().splitlines()
        carried = [line.replace(f"{self.user}@{old_host} ", f"{self.user}@{new_host} ", 1) for line in lines]
        path.write_text("".join(line + "\n" for line in carried))
        return sum(line.startswith(f"{self.user}@{new_host} ") for line in carried)


_GETMAIL_MDA = (
    "cat > $(mktemp DIR/msg.XXXXXXXX); i=0; "
    "while [ $i -lt 3000 ] && [ $(( 0x$(awk '/^SigCgt/ {print $2}' /proc/$PPID/status) & 0x10000 )) -eq 0 ]; "
    "do sleep 0.01; i=$((i + 1)); done"
)


class GetmailKeep:
    """getmail6 leaving mail on the server (`delete = false`, `read_all = false`): it
    downloads only messages whose UIDL is not in its oldmail file, one file per server,
    port and user (oldmail-SERVER-PORT-USER)."""

    def __init__(self, home: Path, user: str, password: str) -> None:
        self.getmail = shutil.which("getmail")
        assert self.getmail is not None, "getmail is missing; install the Debian package getmail6 (scripts/install-deps)"
        self.home, self.user, self.password = home, user, password
        self.delivered = home / "delivered"
        self.delivered.mkdir(parents=True)

    def run(self, host: str, port: int) -> list[bytes]:
        (self.home / "getmailrc").write_text(
            f"[retriever]\ntype = SimplePOP3Retriever\nserver = {host}\nport = {port}\n"
            f"username = {self.user}\npassword = {self.password}\n"
            # The MDA exits once its parent catches SIGCHLD (see test_compat_clients.py).
            f"[destination]\ntype = MDA_external\npath = /bin/sh\n"
            f'arguments = ("-c", "{_GETMAIL_MDA.replace("DIR", str(self.delivered))}")\n'
            f"allow_root_commands = true\n"
            f"[options]\ndelete = false\nread_all = false\ndelivered_to = false\nreceived = false\nverbose = 0\n"
        )
        before = set(self.delivered.iterdir())
        result = subprocess.run(
            [self.getmail, f"--getmaildir={self.home}", "--rcfile=getmailrc"],
            capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
            env={"HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        )
        assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        return [path.read_bytes() for path in sorted(set(self.delivered.iterdir()) - before)]

    def carry_over(self, old_host: str, old_port: int, new_host: str, new_port: int) -> int:
        """Rename the oldmail file to the bridge's server and port; the UIDLs it holds."""
        old = self.home / f"oldmail-{old_host}-{old_port}-{self.user}"
        new = self.home / f"oldmail-{new_host}-{new_port}-{self.user}"
        old.rename(new)
        return sum(1 for line in new.read_bytes().splitlines() if line.strip())
