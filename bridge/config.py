"""Typed, validated configuration: `bridge.toml`, overridden by `BRIDGE_<SECTION>__<KEY>` variables.

Every key has a default here and is documented, with that default, in the example `bridge.toml`
at the top of the repository. A bad value is reported as `section.key: reason` so an operator
knows exactly what to fix.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bridge.net.addresses import ListenAddress, is_loopback_host, parse_listen_address


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


ENV_PREFIX = "BRIDGE_"
# Values of keys whose name says they are secret are never shown (check-config, errors, logs);
# delete.state_key by name: "key" alone would also mask paths such as pop3.tls_key.
SECRET_KEY_PATTERN = re.compile(r"password|passphrase|secret|token|^state_key$", re.IGNORECASE)
MASK = "********"




class _Section(BaseModel):
    # A misspelt key must be an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _readable_file(value: str) -> str:
    if value and not Path(value).is_file():
        raise ValueError(f"{value!r} is not a readable file")
    return value


class Pop3Settings(_Section):
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:1110"], min_length=1)
    autologout_seconds: float = Field(default=600.0, ge=600.0)
    max_line_length: int = Field(default=255, ge=64, le=65536)
    max_connections: int = Field(default=1000, ge=1)
    implementation: str = "pop3-imap-bridge"
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Security (README, "Security"). A validator may only look at fields above its own.
    tls_cert: str = ""
    tls_key: str = ""
    minimum_tls_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    tls_listen: list[str] = Field(default_factory=list)
    stls: bool = False
    allow_plaintext_auth: Literal["loopback", "always", "never"] = "loopback"
    proxy_trusted: list[str] = Field(default_factory=list)
    proxy_protocol: list[str] = Field(default_factory=list)
    max_connections_per_address: int = Field(default=100, ge=1)
    session_timeout_seconds: float = Field(default=7200.0, ge=0)
    send_timeout_seconds: float = Field(default=120.0, gt=0)
    handshake_timeout_seconds: float = Field(default=30.0, gt=0)
    login_timeout_seconds: float = Field(default=60.0, gt=0)

    @field_validator("listen", "tls_listen")
    @classmethod
    def _valid_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_listen_address(item)
        return value

    @field_validator("tls_cert")
    @classmethod
    def _cert_file(cls, value: str) -> str:
        return _readable_file(value)

    @field_validator("tls_key")
    @classmethod
    def _key_matches_cert(cls, value: str, info: ValidationInfo) -> str:
        _readable_file(value)
        if "tls_cert" not in info.data:
            return value  # the certificate itself was refused; that error is reported
        cert = info.data["tls_cert"]
        if bool(value) != bool(cert):
            raise ValueError("tls_cert and tls_key must be given together")
        if value:
            from bridge.net.tls import TlsConfigError, load_server_context

            try:
                load_server_context(cert, value, "TLSv1.2")
            except TlsConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("tls_listen", "stls")
    @classmethod
    def _needs_certificate(cls, value: list[str] | bool, info: ValidationInfo) -> list[str] | bool:
        if value and not (info.data.get("tls_cert") and info.data.get("tls_key")):
            raise ValueError("needs pop3.tls_cert and pop3.tls_key")
        return value

    @field_validator("proxy_trusted")
    @classmethod
    def _trusted_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value

    @field_validator("proxy_protocol")
    @classmethod
    def _proxied_listeners(cls, value: list[str], info: ValidationInfo) -> list[str]:
        configured = {*info.data.get("listen", []), *info.data.get("tls_listen", [])}
        for item in value:
            if item not in configured:
                raise ValueError(f"{item!r} is not one of the addresses in listen or tls_listen")
        if value and not info.data.get("proxy_trusted"):
            raise ValueError("needs pop3.proxy_trusted: the balancers allowed to send PROXY headers")
        return value

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [parse_listen_address(item) for item in self.listen]


class UpstreamSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=143, ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    ca_file: str = ""
    verify: bool = True
    mailbox: str = Field(default="INBOX", min_length=1)
    fetch_chunk: int = Field(default=1048576, ge=4096, le=64 * 1048576)
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    ignore_capabilities: list[str] = Field(default_factory=list)
    engine: Literal["trio", "aioimaplib"] = "trio"
    reconnect_initial_seconds: float = Field(default=0.2, gt=0, le=60)
    reconnect_max_seconds: float = Field(default=5.0, gt=0, le=300)

    @property
    def ignore_capabilities_set(self) -> frozenset[str]:
        return frozenset(name.upper() for name in self.ignore_capabilities)

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: str) -> str:
        _readable_file(value)
        if value:
            from bridge.net.tls import TlsConfigError, load_client_context

            try:
                load_client_context(value, verify=True)
            except TlsConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class PoolSettings(_Section):
    """Parking a finished session's IMAP connection for that account's next session."""

    park_seconds: float = Field(default=1200.0, ge=0, le=86400)
    # From the connection's upstream LOGIN, never refreshed: the longest an old password keeps
    # working on a parked connection after it changed upstream (bridge/upstream/pool.py).
    max_age_seconds: float = Field(default=300.0, gt=0, le=86400)
    max_connections: int = Field(default=500, ge=0)
    max_per_account: int = Field(default=2, ge=1, le=64)
    # RFC 2177: re-issue IDLE at least every 29 minutes; many servers and NATs drop sooner.
    keepalive_seconds: float = Field(default=600.0, ge=1, le=1740)


DeletePolicy = Literal["expunge", "move", "keep", "per-client"]
# The whole name must match (re.fullmatch): with "$", "phone\n" would pass as "phone".
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


def _state_key_from_file(path: str) -> bytes:
    # Surrounding whitespace (the newline an editor or `echo` adds) is not part of the key.
    return Path(path).read_bytes().strip()


class AccountSettings(_Section):
    """Overrides for one upstream account (the login without its device suffix)."""

    policy: DeletePolicy | None = None
    folder: str | None = Field(default=None, min_length=1)
    default_device: str | None = None

    _valid_device = field_validator("default_device")(_device_name)


class DeleteSettings(_Section):
    policy: DeletePolicy = "expunge"
    folder: str = Field(default="POP Downloaded", min_length=1)
    state_folder: str = Field(default="POP3 Bridge State", min_length=1)
    # The server key that signs per-client state records (README, "The state folder"):
    # secret, the same on every bridge host serving the same mailboxes.
    state_key: str = ""
    state_key_file: str = ""
    accept_unsigned_state: bool = False
    device_separator: str = Field(default="#", min_length=1, max_length=1)
    default_device: str = "default"
    expire_after_days: int = Field(default=0, ge=0, le=36500)
    expire_action: Literal["expunge", "move"] = "expunge"
    logins: dict[str, str] = Field(default_factory=dict)
    accounts: dict[str, AccountSettings] = Field(default_factory=dict)

    # Read once per (re)load: the key's bytes, and the tables keyed by folded names.
    _signing_key: bytes = PrivateAttr(b"")
    _accounts_by_key: dict[str, AccountSettings] = PrivateAttr(default_factory=dict)
    _logins_by_key: dict[str, str] = PrivateAttr(default_factory=dict)

    _valid_device = field_validator("default_device")(_device_name)

    @field_validator("state_key")
    @classmethod
    def _key_long_enough(cls, value: str) -> str:
        if value and len(value.strip().encode("utf-8")) < MIN_STATE_KEY_LENGTH:
            raise ValueError(f"must be at least {MIN_STATE_KEY_LENGTH} characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("state_key_file")
    @classmethod
    def _key_file(cls, value: str) -> str:
        _readable_file(value)
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


class LoginLimitSettings(_Section):
    """Failed-login slow-down and blocking (bridge/login_limiter.py explains the design)."""

    failure_delay_seconds: float = Field(default=1.0, ge=0, le=60)
    max_delay_seconds: float = Field(default=15.0, ge=0, le=60)
    address_block_after: int = Field(default=30, ge=0)
    account_block_after: int = Field(default=10, ge=0)
    block_seconds: float = Field(default=300.0, ge=0)
    forget_after_seconds: float = Field(default=900.0, gt=0)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AdminSettings(_Section):
    # Empty: no admin listener (metrics and probes are opt-in; they reveal traffic figures).
    listen: str = ""
    readiness_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    max_connections: int = Field(default=64, ge=1)

    @field_validator("listen")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        if value:
            parse_listen_address(value)
        return value

    @property
    def listen_address(self) -> ListenAddress | None:
        return parse_listen_address(self.listen) if self.listen else None


class ServerSettings(_Section):
    workers: int = Field(default=1, ge=1, le=256)


class _EnvSource(EnvSettingsSource):
    """Environment values of lists and tables may be JSON or TOML (`["a", "b"]`, `['a']`,
    `{ printer = "alice#printer" }`); anything else names the variable instead of a traceback."""

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        try:
            return json.loads(value)
        except ValueError:
            pass
        try:
            return tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            pass
        suffix = f"__{field_name}".lower()
        names = [name.upper() for name, text in self.env_vars.items() if text == value and name.endswith(suffix)]
        where = names[0] if names else f"the variable for {field_name}"
        key = names[0].removeprefix("BRIDGE_").replace("__", ".").lower() if names else field_name
        # Not a ValueError: pydantic-settings would replace it with a message naming only the section.
        raise ConfigError(f"{key}: environment variable {where} is neither a JSON nor a TOML value")


class BridgeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    pop3: Pop3Settings = Field(default_factory=Pop3Settings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    delete: DeleteSettings = Field(default_factory=DeleteSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    login_limits: LoginLimitSettings = Field(default_factory=LoginLimitSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, so a container can adjust one key without a file.
        return (_EnvSource(settings_cls), init_settings)


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The BRIDGE_* variables of the environment, by name as given (pydantic-settings reads
    them case-insensitively)."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if name.upper().startswith(ENV_PREFIX)}


def _setting_of(variable: str) -> tuple[str, ...]:
    """BRIDGE_UPSTREAM__HOST -> ("upstream", "host"); BRIDGE_POP3 -> ("pop3",)."""
    return tuple(part.lower() for part in variable[len(ENV_PREFIX) :].split("__"))


def _check_environment_names(environ: Mapping[str, str]) -> None:
    """A misspelt variable must be an error, as a misspelt key in the file is: silently
    ignoring BRIDGE_UPSTREM__PORT would leave the operator believing it applied."""
    sections = BridgeSettings.model_fields
    known = [f"{ENV_PREFIX}{section}__{key}".upper() for section, field in sections.items() for key in _section_keys(field)]
    problems = []
    for name in sorted(environ):
        parts = _setting_of(name)
        section_field = sections.get(parts[0])
        if section_field is not None and (len(parts) == 1 or parts[1] in _section_keys(section_field)):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"{'.'.join(parts)}: environment variable {name} names no setting{hint}")
    if problems:
        raise ConfigError("\n".join(problems))


def _section_keys(field: FieldInfo) -> set[str]:
    model = field.annotation
    return set(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else set()


def _shown_value(key: str, value: Any) -> str:
    if SECRET_KEY_PATTERN.search(key.rsplit(".", 1)[-1]):
        return MASK
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(error: ValidationError, path: Path | None, environ: Mapping[str, str]) -> str:
    by_setting = {_setting_of(name): name for name in environ}
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        key = ".".join(loc) or "(top level)"
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown key"
        variable = by_setting.get(loc[:2]) or by_setting.get(loc[:1])
        if variable is not None:
            source = f"from environment variable {variable}"
        elif path is not None:
            source = f"from {path}"
        else:
            source = "as given"
        got = f"got {_shown_value(key, item['input'])}, " if "input" in item and item["type"] != "missing" else ""
        lines.append(f"{key}: {reason} ({got}{source})")
    return "\n".join(lines)


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> BridgeSettings:
    """Read a TOML file (if given), apply `overrides`, then the BRIDGE_* environment
    variables, and validate. Raises ConfigError naming the key, the value and its source."""
    variables = environment_overrides()
    _check_environment_names(variables)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if overrides:
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
    try:
        settings = BridgeSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, variables)) from None
    _check_delete_folders(settings)
    _check_delete_names(settings.delete)
    _check_state_key(settings.delete)
    return settings


def _same_folder(a: str, b: str) -> bool:
    # IMAP4rev1: INBOX is case-insensitive, every other name is not.
    return a == b or a.upper() == b.upper() == "INBOX"


def _check_delete_folders(settings: BridgeSettings) -> None:
    """The maildrop, the state folder and the move folders must differ: a state folder that
    is the maildrop would show devices each other's state records, a move folder that is
    the maildrop would hand every downloaded message back as new."""
    maildrop, delete = settings.upstream.mailbox, settings.delete
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


def _check_delete_names(delete: DeleteSettings) -> None:
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


def _check_state_key(delete: DeleteSettings) -> None:
    if delete.state_key and delete.state_key_file:
        raise ConfigError("delete.state_key: give delete.state_key or delete.state_key_file, not both")
    if delete.uses_per_client and not delete.signing_key:
        raise ConfigError(
            'delete.state_key: required when a delete policy is "per-client": the secret key that '
            f"signs the device state records (at least {MIN_STATE_KEY_LENGTH} characters, the same on "
            "every bridge host serving these mailboxes), or delete.state_key_file naming a file that holds it"
        )


def weakened_settings(settings: BridgeSettings) -> list[tuple[str, dict[str, str]]]:
    """Every security default the configuration switches off, as (log event, its fields):
    logged as warnings at start-up."""
    pop3, upstream = settings.pop3, settings.upstream
    found: list[tuple[str, dict[str, str]]] = []
    if upstream.tls == "none" and not is_loopback_host(upstream.host):
        found.append(("upstream_tls_disabled", {"host": upstream.host, "note": "passwords go to the mail server unencrypted"}))
    if upstream.tls != "none" and not upstream.verify:
        found.append(("upstream_tls_unverified", {"host": upstream.host, "note": "any certificate is accepted"}))
    if pop3.allow_plaintext_auth == "always":
        found.append(("plaintext_auth_allowed", {"note": "clients may send passwords over unencrypted connections"}))
    if settings.delete.accept_unsigned_state:
        found.append((
            "unsigned_state_accepted",
            {"note": "unsigned per-client state records are read; turn delete.accept_unsigned_state off once every device has polled"},
        ))
    return found
