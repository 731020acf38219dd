"""[delete]: what DELE + QUIT does upstream, per account, and the per-device state's key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from bridge.config.base import ConfigError, Section, readable_file

DeletePolicy = Literal["expunge", "move", "keep", "per-client"]
FirstLogin = Literal["all", "from-now-on"]
# What part of the maildrop a device sees: all of it, the last N days (by the server's arrival
# date), or the last N messages.
_WINDOW = re.compile(r"all|last-([1-9][0-9]{0,5})-(days|messages)")
DEVICE_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_DEVICE_NAME = re.compile(DEVICE_NAME_PATTERN)
# Per-client state records are signed with this key (bridge.policy.device_state); shorter keys are
# refused. 32 characters: e.g. `openssl rand -hex 32` gives 64.
MIN_STATE_KEY_LENGTH = 32


def is_device_name(name: str) -> bool:
    return _DEVICE_NAME.fullmatch(name) is not None


def account_key(account: str) -> str:
    """What account names are compared by: lower case, as Dovecot's default
    auth_username_format (%Lu) folds logins, so `Alice@example.com` and `alice@example.com`
    are one mailbox upstream and one account here (policy, locks, login limits, parked
    connections, state records). The upstream login itself stays as the user typed it."""
    return account.lower()


def _device_name(value: str | None) -> str | None:
    if value is not None and not is_device_name(value):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def parse_window(value: str) -> tuple[str, int]:
    """("all", 0), ("days", N) or ("messages", N) of a checked window setting."""
    match = _WINDOW.fullmatch(value)
    if match is None:
        raise ValueError('must be "all", "last-N-days" or "last-N-messages" (N from 1 to 999999)')
    return ("all", 0) if value == "all" else (match.group(2), int(match.group(1)))


def _window(value: str | None) -> str | None:
    if value is not None:
        parse_window(value)
    return value


def _state_key_from_file(path: str) -> bytes:
    # Surrounding whitespace (the newline an editor or `echo` adds) is not part of the key.
    return Path(path).read_bytes().strip()


class DeviceView(Section):
    """What one device of an account sees ([delete.accounts."a@b".devices.NAME])."""

    window: str | None = None
    first_login: FirstLogin | None = None

    _valid_window = field_validator("window")(_window)


class AccountSettings(Section):
    """Overrides for one upstream account (the login without its device suffix)."""

    policy: DeletePolicy | None = None
    folder: str | None = Field(default=None, min_length=1)
    default_device: str | None = None
    window: str | None = None
    first_login: FirstLogin | None = None
    devices: dict[str, DeviceView] = Field(default_factory=dict)

    _valid_device = field_validator("default_device")(_device_name)
    _valid_window = field_validator("window")(_window)

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: dict[str, DeviceView]) -> dict[str, DeviceView]:
        for name in value:
            _device_name(name)
        return value


class DeleteSettings(Section):
    policy: DeletePolicy = "expunge"
    folder: str = Field(default="POP Downloaded", min_length=1)
    state_folder: str = Field(default="POP3 Bridge State", min_length=1)
    # The server key that signs per-client state records (docs/design.md, "Signed records"):
    # secret, the same on every bridge host serving the same mailboxes.
    state_key: str = ""
    state_key_file: str = ""
    accept_unsigned_state: bool = False
    device_separator: str = Field(default="#", min_length=1, max_length=1)
    default_device: str = "default"
    expire_after_days: int = Field(default=0, ge=0, le=36500)
    expire_action: Literal["expunge", "move"] = "expunge"
    window: str = "all"
    first_login: FirstLogin = "all"
    logins: dict[str, str] = Field(default_factory=dict)
    accounts: dict[str, AccountSettings] = Field(default_factory=dict)

    # Read once per (re)load: the key's bytes, and the tables keyed by folded names.
    _signing_key: bytes = PrivateAttr(b"")
    _accounts_by_key: dict[str, AccountSettings] = PrivateAttr(default_factory=dict)
    _logins_by_key: dict[str, str] = PrivateAttr(default_factory=dict)

    _valid_device = field_validator("default_device")(_device_name)
    _valid_window = field_validator("window")(_window)

    @field_validator("state_key")
    @classmethod
    def _key_long_enough(cls, value: str) -> str:
        if value and len(value.strip().encode("utf-8")) < MIN_STATE_KEY_LENGTH:
            raise ValueError(f"must be at least {MIN_STATE_KEY_LENGTH} characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("state_key_file")
    @classmethod
    def _key_file(cls, value: str) -> str:
        readable_file(value)
        if value:
            try:
                length = len(_state_key_from_file(value))
            except OSError as exc:
                raise ValueError(f"{value!r} cannot be read: {exc.strerror}") from None
            if length < MIN_STATE_KEY_LENGTH:
                raise ValueError(f"must hold at least {MIN_STATE_KEY_LENGTH} characters; {value!r} holds {length}")
        return value

    @field_validator("device_separator")
    @classmethod
    def _separator_is_punctuation(cls, value: str) -> str:
        if value.isalnum() or value.isspace() or not value.isprintable():
            raise ValueError("must be one printable punctuation character, e.g. '#' or '+'")
        return value

    def model_post_init(self, context: Any) -> None:
        if self.state_key:
            self._signing_key = self.state_key.strip().encode("utf-8")
        elif self.state_key_file:
            self._signing_key = _state_key_from_file(self.state_key_file)
        self._accounts_by_key = {account_key(name): value for name, value in self.accounts.items()}
        self._logins_by_key = {account_key(name): value for name, value in self.logins.items()}

    @property
    def signing_key(self) -> bytes:
        """The key of delete.state_key or delete.state_key_file (b"" when neither is set)."""
        return self._signing_key

    def account_settings(self, account: str) -> AccountSettings | None:
        """The [delete.accounts] entry of `account`, its case ignored."""
        return self._accounts_by_key.get(account_key(account))

    def mapped_login(self, login: str) -> str | None:
        """The [delete.logins] mapping of `login`, its case ignored (as the upstream ignores
        it: a mapped login in another case must not become another account's device)."""
        return self._logins_by_key.get(account_key(login))

    @property
    def uses_per_client(self) -> bool:
        return self.policy == "per-client" or any(a.policy == "per-client" for a in self.accounts.values())

    @property
    def uses_from_now_on(self) -> bool:
        """Some device's first login starts "from now on" (recorded in its device state)."""
        return (
            self.first_login == "from-now-on"
            or any(a.first_login == "from-now-on" for a in self.accounts.values())
            or any(d.first_login == "from-now-on" for a in self.accounts.values() for d in a.devices.values())
        )



def _same_folder(a: str, b: str) -> bool:
    # IMAP4rev1: INBOX is case-insensitive, every other name is not.
    return a == b or a.upper() == b.upper() == "INBOX"


def check_delete_folders(delete: DeleteSettings, maildrop: str) -> None:
    """The maildrop, the state folder and the move folders must differ: a state folder that
    is the maildrop would show devices each other's state records, a move folder that is
    the maildrop would hand every downloaded message back as new."""
    folders = [("delete.folder", delete.folder)] + [
        (f"delete.accounts.{name}.folder", account.folder)
        for name, account in delete.accounts.items()
        if account.folder
    ]
    for key, folder in [("delete.state_folder", delete.state_folder), *folders]:
        if _same_folder(folder, maildrop):
            raise ConfigError(f"{key}: must not be the maildrop folder (upstream.mailbox = {maildrop!r})")
    for key, folder in folders:
        if _same_folder(folder, delete.state_folder):
            raise ConfigError(f"{key}: must not be the state folder (delete.state_folder)")


def check_delete_names(delete: DeleteSettings) -> None:
    """Account names and fixed logins are compared case-insensitively (account_key): two
    entries differing only in case would silently shadow one another."""
    for table, names in (("accounts", delete.accounts), ("logins", delete.logins)):
        seen: dict[str, str] = {}
        for name in names:
            other = seen.setdefault(account_key(name), name)
            if other != name:
                raise ConfigError(
                    f"delete.{table}: {other!r} and {name!r} differ only in case; account names and "
                    "logins are compared case-insensitively"
                )


def check_state_key(delete: DeleteSettings, uidl_records: bool = False) -> None:
    """The key that signs state records is there when records are used: per-device state
    (`per-client`) or UIDL records (`uidl_records`: [uidl] imported, reuse_x_uidl,
    keep_across_uidvalidity)."""
    if delete.state_key and delete.state_key_file:
        raise ConfigError("delete.state_key: give delete.state_key or delete.state_key_file, not both")
    if delete.signing_key:
        return
    if delete.uses_per_client:
        why = 'a delete policy is "per-client": the secret key that signs the device state records'
    elif delete.uses_from_now_on:
        why = 'a first_login is "from-now-on": the secret key that signs the device state records'
    elif uidl_records:
        why = (
            "uidl.imported, uidl.reuse_x_uidl or uidl.keep_across_uidvalidity is on: the secret key that "
            "signs the UIDL records in the state folder"
        )
    else:
        return
    raise ConfigError(
        f"delete.state_key: required when {why} (at least {MIN_STATE_KEY_LENGTH} characters, the same on "
        "every bridge host serving these mailboxes), or delete.state_key_file naming a file that holds it"
    )


