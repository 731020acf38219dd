"""Typed, validated configuration: `bridge.toml`, overridden by `BRIDGE_<SECTION>__<KEY>` variables.

Every key has a default here and is documented, with that default, in the example `bridge.toml`
at the top of the repository. A bad value is reported as `section.key: reason` so an operator
knows exactly what to fix.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Parse `host:port` or `[v6-address]:port`."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6-address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:1110)")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:1110")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return ListenAddress(host, int(port_text))


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
            from bridge.tls import TlsConfigError, load_server_context

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
    def tls_listen_addresses(self) -> list[ListenAddress]:
        return [parse_listen_address(item) for item in self.tls_listen]

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
            from bridge.tls import TlsConfigError, load_client_context

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
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class AccountSettings(_Section):
    """Overrides for one upstream account (the login without its device suffix)."""

    policy: DeletePolicy | None = None
    folder: str | None = Field(default=None, min_length=1)
    default_device: str | None = Field(default=None, pattern=DEVICE_NAME_PATTERN)


class DeleteSettings(_Section):
    policy: DeletePolicy = "expunge"
    folder: str = Field(default="POP Downloaded", min_length=1)
    state_folder: str = Field(default="POP3 Bridge State", min_length=1)
    device_separator: str = Field(default="#", min_length=1, max_length=1)
    default_device: str = Field(default="default", pattern=DEVICE_NAME_PATTERN)
    expire_after_days: int = Field(default=0, ge=0, le=36500)
    expire_action: Literal["expunge", "move"] = "expunge"
    logins: dict[str, str] = Field(default_factory=dict)
    accounts: dict[str, AccountSettings] = Field(default_factory=dict)

    @field_validator("device_separator")
    @classmethod
    def _separator_is_punctuation(cls, value: str) -> str:
        if value.isalnum() or value.isspace() or not value.isprintable():
            raise ValueError("must be one printable punctuation character, e.g. '#' or '+'")
        return value


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


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        reason = item["msg"]
        if item["type"] == "extra_forbidden":
            reason = "unknown key"
        lines.append(f"{key}: {reason}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> BridgeSettings:
    """Read a TOML file (if given), apply environment overrides, validate."""
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
        raise ConfigError(_describe(exc)) from None
    _check_delete_folders(settings)
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
