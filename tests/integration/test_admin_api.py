"""The admin API and its command line, end to end: the real bridge process, its admin
listener, `pop3-imap-bridge admin ...` as a helpdesk runs it, real POP3 clients, and the
devices read and reset through the back end's admin login (a Dovecot master user, a Cyrus
admin)."""

from __future__ import annotations

import http.client
import json
import poplib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox import DovecotSandbox, numbered_messages
from sandbox.cyrus import CyrusSandbox
from tests.harness import TEST_STATE_KEY, SubprocessBridge, free_port
from tests.integration.ops_support import events_named, wait_for, wait_for_event

TOKEN = "helpdesk token " + secrets.token_hex(16)


@dataclass
class Helpdesk:
    bridge: SubprocessBridge
    admin_port: int
    token_file: Path

    def run(self, *args: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable, "-m", "bridge", "admin", "--url", f"http://127.0.0.1:{self.admin_port}",
            "--token-file", str(token_file or self.token_file), *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def helpdesk(dovecot: DovecotSandbox, cyrus: CyrusSandbox, tmp_path: Path) -> Iterator[Helpdesk]:
    """A per-client bridge in front of the session's Dovecot (accounts *@dovecot.example) and
    Cyrus (*@cyrus.example, logged in by local part), each with its admin login."""
    master, master_password = f"master{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    dovecot.add_master_user(master, master_password)
    cyrus_admin, admin_password = cyrus.admin_login, cyrus.admin_password
    (tmp_path / "master.password").write_text(master_password + "\n")
    (tmp_path / "cyrus-admin.password").write_text(admin_password + "\n")
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    admin_port = free_port()
    extra = (
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\napi = true\ntoken_file = "{token_file}"\n'
        '[delete]\npolicy = "per-client"\n'
        f'[[routes]]\nname = "dovecot"\nmatch = "*@dovecot.example"\nport = {dovecot.imap_port}\n'
        f'admin_login = "{master}"\nadmin_password_file = "{tmp_path / "master.password"}"\n'
        f'[[routes]]\nname = "cyrus"\nmatch = "*@cyrus.example"\nport = {cyrus.imap_port}\nlogin = "{{local}}"\n'
        f'admin_login = "{cyrus_admin}"\nadmin_password_file = "{tmp_path / "cyrus-admin.password"}"\n'
    )
    with SubprocessBridge(tmp_path, dovecot.imap_port, extra) as bridge:
        yield Helpdesk(bridge, admin_port, token_file)


@dataclass
class Account:
    name: str  # the POP3 account
    password: str
    box: Any  # the sandbox mailbox


@pytest.fixture(params=["dovecot", "cyrus"])
def account(request: pytest.FixtureRequest, dovecot: DovecotSandbox, cyrus: CyrusSandbox) -> Account:
    if request.param == "dovecot":
        box = dovecot.new_mailbox(user=f"d{secrets.token_hex(4)}@dovecot.example")
        return Account(box.user, box.password, box)
    box = cyrus.new_mailbox()
    return Account(f"{box.user}@cyrus.example", box.password, box)


def pop3(helpdesk: Helpdesk, login: str, password: str) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", helpdesk.bridge.port, timeout=60)
    pop.user(login)
    pop.pass_(password)
    return pop


def stat(helpdesk: Helpdesk, login: str, password: str) -> int:
    pop = pop3(helpdesk, login, password)
    try:
        return pop.stat()[0]
    finally:
        pop.quit()


def test_who_lists_sessions_and_kick_ends_them_without_their_deletions(helpdesk: Helpdesk, account: Account) -> None:
    account.box.append(numbered_messages(3))
    phone = pop3(helpdesk, f"{account.name}#phone", account.password)
    tablet = pop3(helpdesk, f"{account.name}#tablet", account.password)
    try:
        phone.retr(1)
        phone.dele(1)
        sessions = helpdesk.json("who", "--account", account.name.upper())["sessions"]
        by_device = {s["device"]: s for s in sessions}
        assert set(by_device) == {"phone", "tablet"}
        assert by_device["phone"]["account"] == account.name
        assert by_device["phone"]["state"] == "transaction"
        assert by_device["phone"]["backend"] == account.name.rsplit(".", 1)[0].split("@")[1]
        assert by_device["phone"]["client"].startswith("127.0.0.1:")
        assert by_device["phone"]["bytes_sent"] > by_device["tablet"]["bytes_sent"] > 0
        assert helpdesk.json("who", "--account", "*@elsewhere.example")["sessions"] == []
        table = helpdesk.run("who").stdout
        assert table.splitlines()[0].split() == ["ACCOUNT", "DEVICE", "CLIENT", "BACKEND", "SINCE", "STATE", "BYTES", "SENT"]

        result = helpdesk.run("kick", account.name, "--device", "phone")
        assert (result.returncode, result.stdout.strip()) == (0, "kicked 1 session (their deletions are not applied)")
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            phone.stat()
        wait_for_event(helpdesk.bridge, "session_end", outcome="kicked")
        # The tablet was not kicked; the phone's DELE was never applied.
        assert tablet.stat()[0] == 3
    finally:
        phone.close()
        tablet.quit()
    assert stat(helpdesk, f"{account.name}#phone", account.password) == 3
    kicked = events_named(helpdesk.bridge, "sessions_kicked")
    assert kicked[0]["account"] == account.name and kicked[0]["device"] == "phone"


def test_devices_and_device_reset_through_the_admin_login(helpdesk: Helpdesk, account: Account) -> None:
    account.box.append(numbered_messages(3))
    phone = pop3(helpdesk, f"{account.name}#phone", account.password)
    for number in (1, 2, 3):
        phone.dele(number)
    phone.quit()
    assert stat(helpdesk, f"{account.name}#phone", account.password) == 0

    listing = helpdesk.json("devices", account.name)
    assert listing["messages"] == 3
    (device,) = listing["devices"]
    assert (device["device"], device["hidden"], device["records"]) == ("phone", 3, 1)
    assert device["last_seen"] is not None
    assert "phone" in helpdesk.run("devices", account.name).stdout

    result = helpdesk.run("device-reset", account.name, "phone")
    assert result.returncode == 0, result.stderr
    assert "see all 3 messages again" in result.stdout
    assert stat(helpdesk, f"{account.name}#phone", account.password) == 3

    # A new device on a mailbox full of old mail: only what arrives from now on.
    result = helpdesk.run("device-reset", account.name, "tablet", "--from-now-on")
    assert result.returncode == 0, result.stderr
    assert stat(helpdesk, f"{account.name}#tablet", account.password) == 0
    account.box.append([b"Subject: new\r\n\r\narrived after the reset\r\n"])
    tablet = pop3(helpdesk, f"{account.name}#tablet", account.password)
    try:
        assert tablet.stat()[0] == 1
        assert b"arrived after the reset" in b"\n".join(tablet.retr(1)[1])
    finally:
        tablet.quit()
    devices = {d["device"]: d["hidden"] for d in helpdesk.json("devices", account.name)["devices"]}
    assert devices == {"phone": 0, "tablet": 3}
    assert wait_for_event(helpdesk.bridge, "device_reset", device="tablet")["from_now_on"] is True


def _request(port: int, method: str, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_api_needs_the_token(helpdesk: Helpdesk, tmp_path: Path) -> None:
    port = helpdesk.admin_port
    assert _request(port, "GET", "/admin/sessions", None)[0] == 401
    assert _request(port, "GET", "/admin/sessions", "wrong")[0] == 401
    assert _request(port, "GET", "/admin/sessions", TOKEN) == (200, {"sessions": []})
    assert _request(port, "GET", "/admin/kick?account=a", TOKEN)[0] == 405
    assert _request(port, "POST", "/admin/kick", TOKEN)[0] == 400
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not it")
    result = helpdesk.run("who", token_file=wrong)
    assert result.returncode == 1 and "refused (401)" in result.stderr
    # The token never appears in the log, only who asked for what.
    assert TOKEN not in helpdesk.bridge.log_path.read_text()
    assert events_named(helpdesk.bridge, "admin_request", status=401)
    # The probes and metrics need no token.
    assert _request_status(port, "/healthz") == 200


def _request_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_without_a_token_the_api_refuses_everything(dovecot: DovecotSandbox, tmp_path: Path) -> None:
    admin_port = free_port()
    extra = f'[admin]\nlisten = "127.0.0.1:{admin_port}"\napi = true\n'
    with SubprocessBridge(tmp_path, dovecot.imap_port, extra):
        status, body = _request(admin_port, "GET", "/admin/sessions", "anything")
        assert status == 403 and "no token configured" in body["error"]


def test_the_api_on_a_reachable_address_without_a_token_does_not_start(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[admin]\nlisten = "0.0.0.0:9110"\napi = true\n')
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "BRIDGE_DELETE__STATE_KEY": TEST_STATE_KEY},
    )
    assert result.returncode == 2
    assert "admin.api: on a listener other machines can reach (0.0.0.0:9110) the admin API needs a token" in result.stderr


def test_who_with_the_configuration_file(helpdesk: Helpdesk, account: Account) -> None:
    """`--config` finds the listener and the token the way the service does."""
    pop = pop3(helpdesk, account.name, account.password)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "admin", "--config", str(helpdesk.bridge.config_path), "who", "--json"],
            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "BRIDGE_DELETE__STATE_KEY": TEST_STATE_KEY},
        )
        assert result.returncode == 0, result.stderr
        assert [s["account"] for s in json.loads(result.stdout)["sessions"]] == [account.name]
    finally:
        pop.quit()
    wait_for(lambda: not helpdesk.json("who")["sessions"], "the session to end")


def test_with_workers_the_supervisor_asks_every_worker(dovecot: DovecotSandbox, tmp_path: Path) -> None:
    """Sessions live in the workers (whichever accepts first); who and kick reach all of them."""
    box = dovecot.new_mailbox()
    box.append(numbered_messages(1))
    admin_port = free_port()
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    extra = (
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\napi = true\ntoken_file = "{token_file}"\n'
        '[server]\nworkers = 2\n[delete]\npolicy = "per-client"\n'
    )
    with SubprocessBridge(tmp_path, dovecot.imap_port, extra) as bridge:
        helpdesk = Helpdesk(bridge, admin_port, token_file)
        wait_for(lambda: events_named(bridge, "worker_started") and len(events_named(bridge, "listening")) == 2, "both workers")
        clients = [pop3(helpdesk, f"{box.user}#d{number}", box.password) for number in range(8)]
        try:
            sessions = helpdesk.json("who")["sessions"]
            assert sorted(s["device"] for s in sessions) == [f"d{number}" for number in range(8)]
            assert {s["worker"] for s in sessions} <= {0, 1}
            assert helpdesk.json("kick", box.user)["kicked"] == 8
            for client in clients:
                with pytest.raises((poplib.error_proto, OSError, EOFError)):
                    client.stat()
        finally:
            for client in clients:
                client.close()
        wait_for(lambda: not helpdesk.json("who")["sessions"], "every session ended")
        # Devices are read by one worker; its refusal comes back as it is.
        result = helpdesk.run("devices", box.user)
        assert result.returncode == 1 and "refused (409): back end default has no admin login" in result.stderr
