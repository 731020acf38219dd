"""Typed, validated configuration: `bridge.toml`, overridden by `BRIDGE_<SECTION>__<KEY>` variables.

Every key has a default here and is documented, with that default, in the example `bridge.toml`
at the top of the repository. A bad value is reported as `section.key: reason` so an operator
knows exactly what to fix.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


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


class Pop3Settings(_Section):
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:1110"], min_length=1)
    autologout_seconds: float = Field(default=600.0, ge=600.0)
    max_line_length: int = Field(default=255, ge=64, le=65536)
    max_connections: int = Field(default=1000, ge=1)
    implementation: str = "pop3-imap-bridge"

    @field_validator("listen")
    @classmethod
    def _valid_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_listen_address(item)
        return value

    @property
    def listen_addresses(self) -> list[ListenAddress]:
        return [parse_listen_address(item) for item in self.listen]


class UpstreamSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=143, ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "none"
    mailbox: str = Field(default="INBOX", min_length=1)
    fetch_chunk: int = Field(default=1048576, ge=4096, le=64 * 1048576)
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    ignore_capabilities: list[str] = Field(default_factory=list)

    @property
    def ignore_capabilities_set(self) -> frozenset[str]:
        return frozenset(name.upper() for name in self.ignore_capabilities)

    @field_validator("tls")
    @classmethod
    def _tls_available(cls, value: str) -> str:
        if value != "none":
            raise ValueError("upstream TLS is not implemented yet; only 'none' works in this version")
        return value


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


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class BridgeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    pop3: Pop3Settings = Field(default_factory=Pop3Settings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    delete: DeleteSettings = Field(default_factory=DeleteSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

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
        return (env_settings, init_settings)


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
        return BridgeSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
