"""Helpers for the OAuth2 tests: the [oauth2] section of a bridge in front of the sandbox's
OAuth2 provider and Dovecot, enrolling an account straight into a store (the enrolment
commands themselves are tested end to end in tests/integration/test_oauth2_cli.py), and
running the `pop3-imap-bridge oauth2` command as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from bridge.config import load_settings
from bridge.oauth2.records import AccountRecord, Kdf, Tokens, derive_keys
from bridge.oauth2.tokens import open_store
from sandbox.oauth2 import OAuth2Provider

CLIENT_SECRET = "tests-only client secret"
_T = TypeVar("_T")
DEVICE_PASSWORD = "device password 1"


def oauth2_section(provider: OAuth2Provider, store: str, **overrides: Any) -> dict[str, Any]:
    return {
        "provider": "custom",
        "token_url": f"{provider.url}/token",
        "device_authorization_url": f"{provider.url}/devicecode",
        "authorization_url": f"{provider.url}/authorize",
        "client_id": provider.client_id,
        "client_secret": provider.client_secret,
        "scope": "mail",
        "store": store,
        **overrides,
    }


def oauth2_toml(provider: OAuth2Provider, store: str, **overrides: Any) -> str:
    """The [oauth2] section as TOML, `upstream.auth` set by the caller's [upstream]."""
    lines = ["[oauth2]"] + [f"{key} = {_toml(value)}" for key, value in oauth2_section(provider, store, **overrides).items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def _run(function: Callable[[], Awaitable[_T]]) -> _T:
    """`trio.run(function)` in a thread of its own: usable from a Trio test too."""
    result: list[_T] = []
    thread = threading.Thread(target=lambda: result.append(trio.run(function)))
    thread.start()
    thread.join()
    assert result, "the store helper failed (its traceback is above)"
    return result[0]


def enrol(store: str, account: str, refresh_token: str | None, password: str = DEVICE_PASSWORD, grant: str = "refresh_token") -> None:
    """Write an account's record as `oauth2 enrol` would, with no access token cached yet."""

    async def write() -> None:
        settings = load_settings(None, {"oauth2": {"store": store}})
        kdf = Kdf.fresh()
        keys = derive_keys(password, kdf)
        record = AccountRecord.create(account, grant, keys, kdf, Tokens(refresh_token=refresh_token))
        target = open_store(settings.oauth2, 10)
        try:
            await target.save(account, record.dumps())
        finally:
            target.close()

    _run(write)


def stored_record(store: str, account: str) -> AccountRecord | None:
    async def read() -> bytes | None:
        target = open_store(load_settings(None, {"oauth2": {"store": store}}).oauth2, 10)
        try:
            return await target.load(account)
        finally:
            target.close()

    data = _run(read)
    return None if data is None else AccountRecord.loads(data)


def stored_tokens(store: str, account: str, password: str = DEVICE_PASSWORD) -> Tokens:
    record = stored_record(store, account)
    assert record is not None, f"{account} is not in the store"
    return record.unseal(derive_keys(password, record.kdf))


def write_config(workdir: Path, imap_port: int, provider: OAuth2Provider, store: str, **overrides: Any) -> Path:
    path = workdir / "bridge.toml"
    path.write_text(
        f'[upstream]\nhost = "127.0.0.1"\nport = {imap_port}\ntls = "none"\nauth = "oauth2"\ntimeout_seconds = 10\n'
        + oauth2_toml(provider, store, **overrides)
    )
    return path


def password_file(workdir: Path, password: str = DEVICE_PASSWORD, name: str = "device-password") -> Path:
    path = workdir / name
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def oauth2_command(*args: str, stdin: str = "", timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`pop3-imap-bridge oauth2 ARGS` in a new session (no controlling terminal, as in a
    container or a script), its standard input given."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", "oauth2", *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, start_new_session=True, env={**os.environ, **(env or {})},
    )


def start_oauth2_command(*args: str) -> subprocess.Popen[str]:
    """The command running, for a test that plays the user while it waits (its stdout read
    line by line, its stdin written)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "oauth2", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True, bufsize=1,
    )


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 30) -> str:
    """The command's output up to and including the first line containing `marker`."""
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"the command never printed {marker!r}; it printed:\n{''.join(seen)}")
