"""`pop3-imap-bridge oauth2 ...` driven as a person or a script would: a subprocess without a
terminal, its output read, the browser played with plain HTTP requests to the loopback
provider, the final redirect pasted on standard input; then a real POP3 login through a
running bridge that was never restarted."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox import DovecotSandbox, Mailbox
from sandbox.oauth2 import OAuth2Provider
from sandbox.seeding import numbered_messages
from tests.harness import Pop3Client, RawPop3, ThreadedBridge, wait_until
from tests.oauth2_support import (
    DEVICE_PASSWORD,
    enrol,
    oauth2_command,
    password_file,
    read_until,
    start_oauth2_command,
    stored_record,
    write_config,
)

Bridge = Callable[..., ThreadedBridge]
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _browser_consents(authorize_url: str) -> str:
    """What the browser is redirected to after the (automatic) consent: the Location."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(authorize_url)
    except urllib.error.HTTPError as response:
        assert response.code == 302, response.read()
        return str(response.headers["Location"])
    raise AssertionError("the authorization endpoint did not redirect")


@pytest.fixture
def box(oauth2_dovecot: DovecotSandbox) -> Mailbox:
    mailbox = oauth2_dovecot.new_mailbox()
    mailbox.append(list(numbered_messages(2)))
    return mailbox


@pytest.fixture
def config(tmp_path: Path, oauth2_dovecot: DovecotSandbox, oauth2_provider: OAuth2Provider, oauth2_store: str) -> Path:
    return write_config(tmp_path, oauth2_dovecot.imap_port, oauth2_provider, oauth2_store)


def _pop3_login_works(bridge: ThreadedBridge, user: str, password: str = DEVICE_PASSWORD) -> bool:
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.command(b"USER " + user.encode())
        return pop.command(b"PASS " + password.encode()).startswith(b"+OK")


def test_enrol_with_the_device_flow(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, config: Path, box: Mailbox, tmp_path: Path
) -> None:
    bridge = oauth2_bridge_factory()  # running before the enrolment, never restarted
    assert not _pop3_login_works(bridge, box.user)
    process = start_oauth2_command("enrol", box.user, "--config", str(config), "--flow", "device", "--device-password-file", str(password_file(tmp_path)))
    printed = read_until(process, "Waiting for the approval")
    url = re.search(r"^\s+(http\S+)$", printed, re.M)
    code = re.search(r"enter the code\s+(\S+)", printed)
    assert url is not None and code is not None, printed
    assert url.group(1) == f"{oauth2_provider.url}/device"
    # The command polls (authorization_pending) until the owner approves on another device.
    wait_until(lambda: oauth2_provider.token_calls(DEVICE_GRANT) >= 1, "the first poll")
    urllib.request.urlopen(f"{oauth2_provider.url}/device/approve?user_code={code.group(1)}&user={box.user}").read()
    assert process.wait(60) == 0, process.stderr.read() if process.stderr else ""
    assert oauth2_provider.token_calls(DEVICE_GRANT) >= 2
    with Pop3Client(bridge.port, box.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2


@pytest.mark.parametrize("redirect", ["loopback", "pasted"])
def test_enrol_with_the_browser_flow(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, config: Path, box: Mailbox, tmp_path: Path, redirect: str
) -> None:
    oauth2_provider.consent_user = box.user
    process = start_oauth2_command("enrol", box.user, "--config", str(config), "--flow", "browser", "--device-password-file", str(password_file(tmp_path)))
    printed = read_until(process, "paste it here")
    authorize = re.search(r"^\s+(http\S+/authorize\?\S+)$", printed, re.M)
    assert authorize is not None, printed
    location = _browser_consents(authorize.group(1))
    assert location.startswith("http://127.0.0.1:")
    if redirect == "loopback":
        page = urllib.request.urlopen(location).read()  # the browser on this machine follows it
        assert b"You can close this window" in page
    else:
        assert process.stdin is not None
        process.stdin.write(location + "\n")  # a browser elsewhere: its address bar, pasted
        process.stdin.flush()
    assert process.wait(60) == 0, process.stderr.read() if process.stderr else ""
    assert oauth2_provider.token_calls("authorization_code") == 1
    bridge = oauth2_bridge_factory()
    with Pop3Client(bridge.port, box.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2


def test_a_consent_given_as_another_user_is_refused_and_nothing_saved(
    oauth2_provider: OAuth2Provider, oauth2_dovecot: DovecotSandbox, config: Path, box: Mailbox, oauth2_store: str, tmp_path: Path
) -> None:
    other = oauth2_dovecot.new_mailbox()
    oauth2_provider.consent_user = other.user
    process = start_oauth2_command("enrol", box.user, "--config", str(config), "--flow", "browser", "--device-password-file", str(password_file(tmp_path)))
    printed = read_until(process, "paste it here")
    authorize = re.search(r"^\s+(http\S+/authorize\?\S+)$", printed, re.M)
    assert authorize is not None
    urllib.request.urlopen(_browser_consents(authorize.group(1))).read()
    assert process.wait(60) == 1
    assert process.stderr is not None and "refused the new token" in process.stderr.read()
    assert stored_record(oauth2_store, box.user) is None


def test_without_a_terminal_or_a_password_file_the_command_fails_at_once(config: Path, box: Mailbox) -> None:
    result = oauth2_command("enrol", box.user, "--config", str(config))
    assert result.returncode == 2
    assert "no terminal to ask for the device password: give it in a file with --device-password-file FILE" in result.stderr


def _rsa_key_file(directory: Path, email: str) -> tuple[Path, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    path = directory / "service-account.json"
    path.write_text(json.dumps({"type": "service_account", "client_email": email, "private_key": pem, "private_key_id": "k1"}))
    return path, key.public_key()


@pytest.mark.parametrize("grant", ["client_credentials", "jwt_bearer"])
def test_add_an_account_for_an_app_only_grant(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_dovecot: DovecotSandbox, oauth2_store: str,
    box: Mailbox, tmp_path: Path, grant: str,
) -> None:
    overrides: dict[str, str] = {"grant": grant}
    if grant == "client_credentials":
        oauth2_provider.app_mailbox = box.user
    else:
        key_file, public_key = _rsa_key_file(tmp_path, "bridge@project.example")
        oauth2_provider.jwt_issuers["bridge@project.example"] = public_key
        overrides["service_account_key_file"] = str(key_file)
    config = write_config(tmp_path, oauth2_dovecot.imap_port, oauth2_provider, oauth2_store, **overrides)
    result = oauth2_command("add", box.user, "--config", str(config), "--device-password-file", str(password_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert oauth2_provider.token_calls(grant if grant == "client_credentials" else "urn:ietf:params:oauth:grant-type:jwt-bearer") == 1
    bridge = oauth2_bridge_factory(oauth2=overrides, pool={"park_seconds": 0})
    with Pop3Client(bridge.port, box.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2
    # Its token expires: a new one is asked for with the same grant (no refresh token here).
    oauth2_provider.expire_access_tokens()
    with Pop3Client(bridge.port, box.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2
    record = stored_record(oauth2_store, box.user)
    assert record is not None and record.grant == grant


def test_list_status_passwd_and_remove(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, config: Path, box: Mailbox, oauth2_store: str, tmp_path: Path
) -> None:
    enrol(oauth2_store, box.user, oauth2_provider.consent(box.user))
    bridge = oauth2_bridge_factory(pool={"park_seconds": 0})
    listed = oauth2_command("list", "--config", str(config))
    assert listed.returncode == 0 and listed.stdout == f"{box.user}\trefresh_token\tenrolled\n"
    status = oauth2_command("status", box.user, "--config", str(config))
    assert status.returncode == 0
    assert "state: enrolled" in status.stdout and "last refresh: never" in status.stdout
    assert _pop3_login_works(bridge, box.user)
    status = oauth2_command("status", box.user, "--config", str(config))
    assert "last refresh: never" not in status.stdout and "access token expires: 20" in status.stdout

    wrong = oauth2_command(
        "passwd", box.user, "--config", str(config), "--old-device-password-file", str(password_file(tmp_path, "wrong password", "old")),
        "--device-password-file", str(password_file(tmp_path, "the new device password", "new")),
    )
    assert wrong.returncode == 1 and "wrong current device password" in wrong.stderr
    changed = oauth2_command(
        "passwd", box.user, "--config", str(config), "--old-device-password-file", str(password_file(tmp_path, DEVICE_PASSWORD, "old")),
        "--device-password-file", str(password_file(tmp_path, "the new device password", "new")),
    )
    assert changed.returncode == 0, changed.stderr
    assert not _pop3_login_works(bridge, box.user, DEVICE_PASSWORD)
    assert _pop3_login_works(bridge, box.user, "the new device password")

    oauth2_provider.revoke_user(box.user)
    oauth2_provider.expire_access_tokens()
    assert not _pop3_login_works(bridge, box.user, "the new device password")
    status = oauth2_command("status", box.user, "--config", str(config))
    assert status.returncode == 3 and "needs re-enrolment (invalid_grant" in status.stdout
    assert "needs re-enrolment" in oauth2_command("list", "--config", str(config)).stdout

    removed = oauth2_command("remove", box.user, "--config", str(config))
    assert removed.returncode == 0
    assert oauth2_command("status", box.user, "--config", str(config)).returncode == 1
    assert oauth2_command("remove", box.user, "--config", str(config)).returncode == 1


@pytest.mark.parametrize("command", ["enrol", "add", "list", "status", "passwd", "remove"])
def test_every_command_has_help(command: str) -> None:
    result = oauth2_command(command, "--help")
    assert result.returncode == 0 and "--config" in result.stdout
