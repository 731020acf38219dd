"""Several real POP3 clients on one mailbox with the per-client policy: fetchmail deleting
what it fetches while a second device still gets everything; three devices and an IMAP user
over several polls."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sandbox import Mailbox, numbered_messages
from tests.harness import ThreadedBridge
from tests.integration.policy_support import message_number, poll, visible

BridgeFactory = Callable[..., ThreadedBridge]
FETCHMAIL = "/usr/bin/fetchmail"


def seed(box: Mailbox, count: int, start: int = 1) -> list[int]:
    return box.append(list(numbered_messages(count, start=start))).uids


def _rc_string(text: str) -> str:
    # fetchmailrc strings: double quotes, backslash escapes.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Fetchmail:
    """Runs /usr/bin/fetchmail once per `run()` against the bridge, delivering each message
    through an MDA script into its own file, so every download can be counted."""

    def __init__(self, home: Path, port: int, login: str, password: str) -> None:
        if not os.access(FETCHMAIL, os.X_OK):
            raise AssertionError(f"{FETCHMAIL} is missing; scripts/install-deps installs fetchmail")
        self.home = home
        self.delivered = home / "delivered"
        self.delivered.mkdir(parents=True)
        mda = home / "deliver"
        mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {self.delivered}/msg.XXXXXX)"\n')
        mda.chmod(0o700)
        self.rcfile = home / "fetchmailrc"
        self.rcfile.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 protocol POP3 port {port} auth password\n"
            f"  user {_rc_string(login)} password {_rc_string(password)}\n"
            # sslproto '': fetchmail 6.4 otherwise insists on STLS, even on loopback.
            f"  no keep fetchall sslproto '' mda {_rc_string(str(mda))}\n"
        )
        # fetchmail refuses an rcfile others can read: it holds a password.
        self.rcfile.chmod(0o600)

    def run(self) -> int:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "FETCHMAILHOME": str(self.home),
            "LC_ALL": "C",
        }
        result = subprocess.run(
            [FETCHMAIL, "-f", str(self.rcfile), "--pidfile", str(self.home / "fetchmail.pid"), "--nodetach"],
            env=env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=False,
        )
        # 0: mail delivered, 1: no mail; anything else is a failure worth reading.
        assert result.returncode in (0, 1), result.stdout.decode() + result.stderr.decode()
        return result.returncode

    def messages(self) -> list[int]:
        return sorted(message_number(path.read_bytes()) for path in self.delivered.iterdir())


def test_fetchmail_deleting_gets_each_message_once_while_another_device_gets_them_too(
    bridge_factory: BridgeFactory, mailbox: Mailbox, tmp_path: Path
) -> None:
    assert shutil.which("fetchmail") or os.access(FETCHMAIL, os.X_OK)
    uids = seed(mailbox, 3)
    bridge = bridge_factory(delete={"policy": "per-client"})
    fetchmail = Fetchmail(tmp_path / "fetchmail", bridge.port, f"{mailbox.user}#fetch", mailbox.password)

    assert fetchmail.run() == 0
    assert fetchmail.messages() == [1, 2, 3]
    assert fetchmail.run() == 1  # no mail: everything was fetched and deleted
    assert fetchmail.run() == 1
    assert fetchmail.messages() == [1, 2, 3]

    seed(mailbox, 1, start=4)
    assert fetchmail.run() == 0
    assert fetchmail.run() == 1
    assert fetchmail.messages() == [1, 2, 3, 4]

    # fetchmail's deletions were its own: the phone and IMAP users still have everything.
    assert poll(bridge.port, f"{mailbox.user}#phone", mailbox.password, delete=False) == [1, 2, 3, 4]
    assert len(mailbox.observer().uids()) == len(uids) + 1
    logins = [e for e in bridge.events() if e["event"] == "login_ok" and e.get("device") == "fetch"]
    assert len(logins) == 5


def test_three_devices_each_download_every_message_exactly_once(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    uids = seed(mailbox, 4)
    bridge = bridge_factory(delete={"policy": "per-client"})
    observer = mailbox.observer()
    devices = [f"{mailbox.user}#{name}" for name in ("phone", "laptop", "tablet")]
    downloads: dict[str, Counter[int]] = {device: Counter() for device in devices}

    def poll_all() -> None:
        for device in devices:
            downloads[device].update(poll(bridge.port, device, mailbox.password))

    poll_all()
    poll_all()
    new = seed(mailbox, 1, start=5)  # arrives between polls
    poll_all()
    poll_all()

    for device in devices:
        assert downloads[device] == Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 1}), device
        assert visible(bridge.port, device, mailbox.password) == []
    observer.noop()
    assert observer.uids() == uids + new
    assert all(info.flags == frozenset() for info in observer.messages())
