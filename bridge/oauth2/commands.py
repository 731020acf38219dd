"""`pop3-imap-bridge oauth2 enrol|add|list|status|passwd|remove`: managing the accounts of
`upstream.auth = "oauth2"` from a shell (headless, scriptable; docs/oauth2.md).

Every command reads the same configuration as `serve` and writes the same token store, under
the account's store lock; a running bridge reads the store at each login, so what a command
did applies from the account's next login, without a restart or a reload.

The device password comes from `--device-password-file` (its first line), else from the
terminal, asked twice; without a terminal and without a file the command fails at once and
says so (it never waits for input that cannot come). Exit status: 0 done, 1 refused or not
possible (not enrolled, wrong password, the provider said no), 2 bad usage or configuration,
3 (status) the account needs re-enrolment.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

import trio

from bridge.config import BridgeSettings, ConfigError, load_settings
from bridge.config.oauth2 import check_oauth2
from bridge.imap.errors import AuthenticationFailed, UpstreamError
from bridge.oauth2.client import TokenAnswer, TokenEndpoint
from bridge.oauth2.errors import StoreUnavailable, TokenEndpointUnavailable, TokenRequestRefused
from bridge.oauth2.flows import FlowFailed, browser_flow, device_flow
from bridge.oauth2.records import (
    MIN_DEVICE_PASSWORD_LENGTH,
    AccountRecord,
    Kdf,
    RecordDamaged,
    Tokens,
    WrongPassword,
    derive_keys,
)
from bridge.oauth2.store import TokenStore
from bridge.oauth2.tokens import open_store

_APP_ONLY = ("client_credentials", "jwt_bearer")
_FLOW_SECONDS = 900.0


class CommandFailed(Exception):
    """Ends the command with a message and an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- the device password ----------------------------------------------------------------------------


def _check_password(password: str) -> str:
    if len(password) < MIN_DEVICE_PASSWORD_LENGTH:
        raise CommandFailed(f"the device password must have at least {MIN_DEVICE_PASSWORD_LENGTH} characters", 2)
    if any(c in password for c in "\r\n\0"):
        raise CommandFailed("the device password must be one line", 2)
    return password


def _from_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandFailed(f"{path}: cannot read the device password ({exc})", 2) from None
    return text.splitlines()[0] if text else ""


def _terminal_available() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def read_password(path: Path | None, *, what: str = "device password", confirm: bool = True, option: str = "--device-password-file") -> str:
    """From `path`, else asked on the terminal (twice when `confirm`)."""
    if path is not None:
        return _check_password(_from_file(path))
    if not _terminal_available():
        raise CommandFailed(f"no terminal to ask for the {what}: give it in a file with {option} FILE", 2)
    first = getpass.getpass(f"The {what}: ")
    if confirm and getpass.getpass(f"The {what} again: ") != first:
        raise CommandFailed(f"the two {what}s differ", 2)
    return _check_password(first)


# -- the commands ------------------------------------------------------------------------------------


class _Context:
    def __init__(self, args: argparse.Namespace) -> None:
        try:
            self.settings: BridgeSettings = load_settings(args.config)
            check_oauth2(self.settings.oauth2)
        except ConfigError as exc:
            raise CommandFailed(f"bad configuration:\n{exc}", 2) from None
        if self.settings.upstream.auth != "oauth2":
            print('note: upstream.auth is not "oauth2" in this configuration: the bridge will not use these accounts', file=sys.stderr)
        self.timeout = self.settings.upstream.timeout_seconds
        self.store: TokenStore = open_store(self.settings.oauth2, self.timeout)
        self.endpoint = TokenEndpoint(self.settings.oauth2, self.timeout)

    async def record(self, account: str) -> AccountRecord:
        data = await self.store.load(account)
        if data is None:
            raise CommandFailed(f"{account} is not enrolled")
        try:
            return AccountRecord.loads(data)
        except RecordDamaged as exc:
            raise CommandFailed(f"{account}: the stored record is damaged ({exc}); remove it and enrol again") from None

    async def save(self, account: str, record: AccountRecord) -> None:
        async with self.store.lock(account, self.timeout):
            await self.store.save(account, record.dumps())

    async def check_upstream(self, account: str, token: str) -> None:
        """Log in to the IMAP server with the new token before anything is saved: a consent
        given as another user (or an application without the mailbox's permission) is
        refused now rather than at the device's next poll."""
        from bridge.imap.engines import engine_runtime, open_mailbox

        class _Token:
            mechanism = self.settings.oauth2.mechanism

            async def access_token(self, rejected: str | None = None) -> str:
                if rejected is not None:
                    raise AuthenticationFailed("the new token was refused")
                return token

        try:
            async with engine_runtime(self.settings.upstream.engine):
                mailbox = await open_mailbox(self.settings.upstream, account, _Token())
                await mailbox.aclose()
        except AuthenticationFailed:
            raise CommandFailed(
                f"the mail server refused the new token for {account}: was the consent given as {account}? "
                "(for an application: does it have access to this mailbox?) Nothing was saved."
            ) from None
        except UpstreamError as exc:
            print(f"warning: could not check the token against the mail server ({exc}); saved anyway", file=sys.stderr)


def _tokens(answer: TokenAnswer, refresh_token: str | None) -> Tokens:
    return Tokens(refresh_token, answer.access_token, time.time() + answer.expires_in, answer.expires_in)


async def _enrol(args: argparse.Namespace) -> int:
    context = _Context(args)
    oauth2 = context.settings.oauth2
    if oauth2.grant in _APP_ONLY:
        raise CommandFailed(f'grant = "{oauth2.grant}" needs no consent per account: use "oauth2 add {args.account}"', 2)
    needed = "device_authorization_url" if args.flow == "device" else "authorization_url"
    if not oauth2.endpoint(needed):
        raise CommandFailed(f'--flow {args.flow} needs oauth2.{needed} (provider "custom")', 2)
    password = read_password(args.device_password_file)
    if args.flow == "device":
        answer = await device_flow(context.endpoint, args.account, sys.stdout, _FLOW_SECONDS)
    else:
        answer = await browser_flow(context.endpoint, args.account, sys.stdout, _FLOW_SECONDS)
    if answer.refresh_token is None:
        raise CommandFailed(
            "the provider gave no refresh token (Microsoft: the scope needs offline_access; "
            "Google: revoke the app's access in the account and enrol again)"
        )
    await context.check_upstream(args.account, answer.access_token)
    await _store_new(context, args.account, password, _tokens(answer, answer.refresh_token))
    print(f"{args.account} is enrolled: the device logs in as {args.account} with its device password.")
    return 0


async def _store_new(context: _Context, account: str, password: str, tokens: Tokens) -> None:
    kdf = Kdf.fresh()
    keys = await trio.to_thread.run_sync(derive_keys, password, kdf)
    record = AccountRecord.create(account, context.settings.oauth2.grant, keys, kdf, tokens)
    record.last_refresh = time.time() if tokens.access_token else None
    await context.save(account, record)


async def _add(args: argparse.Namespace) -> int:
    context = _Context(args)
    grant = context.settings.oauth2.grant
    if grant not in _APP_ONLY:
        raise CommandFailed(f'grant = "{grant}": each account\'s owner consents with "oauth2 enrol {args.account}"', 2)
    password = read_password(args.device_password_file)
    endpoint = context.endpoint
    answer = await (endpoint.client_credentials() if grant == "client_credentials" else endpoint.jwt_bearer(args.account))
    await context.check_upstream(args.account, answer.access_token)
    await _store_new(context, args.account, password, _tokens(answer, None))
    print(f"{args.account} is added: the device logs in as {args.account} with its device password.")
    return 0


def _when(epoch: float | None) -> str:
    if not epoch:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _state(record: AccountRecord) -> str:
    if record.reenrolment is not None:
        return f"needs re-enrolment ({record.reenrolment.get('reason')}, since {_when(record.reenrolment.get('since'))})"
    return "enrolled"


async def _list(args: argparse.Namespace) -> int:
    context = _Context(args)
    for data in await context.store.accounts():
        try:
            record = AccountRecord.loads(data)
        except RecordDamaged:
            continue
        print(f"{record.account}\t{record.grant}\t{_state(record)}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    record = await _Context(args).record(args.account)
    print(f"account: {record.account}")
    print(f"grant: {record.grant}")
    print(f"state: {_state(record)}")
    print(f"enrolled: {_when(record.enrolled_at)}")
    print(f"access token expires: {_when(record.expires_at)}")
    print(f"last refresh: {_when(record.last_refresh)}")
    return 3 if record.reenrolment is not None else 0


async def _passwd(args: argparse.Namespace) -> int:
    context = _Context(args)
    record = await context.record(args.account)
    tokens = Tokens()
    if record.grant not in _APP_ONLY:
        # The refresh token is sealed with the old password's key: it is needed to move it.
        old = read_password(args.old_device_password_file, what="current device password", confirm=False, option="--old-device-password-file")
        keys = await trio.to_thread.run_sync(derive_keys, old, record.kdf)
        try:
            tokens = record.unseal(keys)
        except WrongPassword:
            raise CommandFailed("wrong current device password (if it is lost, enrol the account again)") from None
    new = read_password(args.device_password_file, what="new device password")
    kdf = Kdf.fresh()
    keys = await trio.to_thread.run_sync(derive_keys, new, kdf)
    replacement = AccountRecord.create(record.account, record.grant, keys, kdf, tokens)
    replacement.enrolled_at, replacement.last_refresh, replacement.reenrolment = record.enrolled_at, record.last_refresh, record.reenrolment
    await context.save(args.account, replacement)
    print(f"the device password of {args.account} is changed (from the next login; parked connections of the old one are not reused)")
    return 0


async def _remove(args: argparse.Namespace) -> int:
    context = _Context(args)
    async with context.store.lock(args.account, context.timeout):
        removed = await context.store.delete(args.account)
    if not removed:
        raise CommandFailed(f"{args.account} is not enrolled")
    print(f"{args.account} is removed: its device can no longer log in (the grant stays valid at the provider until revoked there)")
    return 0


# -- the command line ----------------------------------------------------------------------------------

_HANDLERS = {"enrol": _enrol, "add": _add, "list": _list, "status": _status, "passwd": _passwd, "remove": _remove}


def run(args: argparse.Namespace) -> int:
    """Run the `oauth2` subcommand `args` names (parsed by bridge.oauth2.command_line)."""
    try:
        return int(trio.run(_HANDLERS[args.oauth2_command], args))
    except CommandFailed as exc:
        print(f"pop3-imap-bridge oauth2 {args.oauth2_command}: {exc}", file=sys.stderr)
        return exc.status
    except (FlowFailed, TokenRequestRefused, TokenEndpointUnavailable, StoreUnavailable) as exc:
        print(f"pop3-imap-bridge oauth2 {args.oauth2_command}: {exc}", file=sys.stderr)
        return 1
