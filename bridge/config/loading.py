"""Loading the configuration: bridge.toml, then the BRIDGE_<SECTION>__<KEY> environment
variables (which win, so a container can adjust one key without a file), validated as a whole.
Every error names the key, the bad value (never a secret's) and where it came from."""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bridge.config.base import ConfigError
from bridge.config.deletion import (
    DeleteSettings,
    check_delete_folders,
    check_delete_names,
    check_state_key,
)
from bridge.config.oauth2 import OAuth2Settings, check_oauth2
from bridge.config.routing import (
    RouteSettings,
    RoutingSettings,
    admin_login_problems,
    check_routes,
    merged_upstream,
    route_names,
)
from bridge.config.sections import (
    AdminSettings,
    CacheSettings,
    LoggingSettings,
    LoginLimitSettings,
    PoolSettings,
    Pop3Settings,
    ServerSettings,
    UpstreamSettings,
)
from bridge.config.uidl import UidlSettings
from bridge.net.addresses import is_loopback_host
from bridge.ops.secrets import MASK, is_secret_name

ENV_PREFIX = "BRIDGE_"


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
    cache: CacheSettings = Field(default_factory=CacheSettings)
    delete: DeleteSettings = Field(default_factory=DeleteSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    login_limits: LoginLimitSettings = Field(default_factory=LoginLimitSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    # [[routes]]: the first whose `match` fits an account decides its back end.
    routes: list[RouteSettings] = Field(default_factory=list)  # type: ignore[valid-type]
    oauth2: OAuth2Settings = Field(default_factory=OAuth2Settings)
    uidl: UidlSettings = Field(default_factory=UidlSettings)

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
    if is_secret_name(key.rsplit(".", 1)[-1]):
        return MASK
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key_of(loc: tuple[str, ...], data: Mapping[str, Any]) -> str:
    """`upstream.port`; a route's key as `routes[1] (legacy).port`, naming the route."""
    if len(loc) >= 2 and loc[0] == "routes" and loc[1].isdigit():
        routes = data.get("routes")
        index = int(loc[1])
        name = ""
        if isinstance(routes, list) and index < len(routes) and isinstance(routes[index], dict):
            name = str(routes[index].get("name") or "")
        return f"routes[{index}]" + (f" ({name})" if name else "") + "".join(f".{part}" for part in loc[2:])
    return ".".join(loc) or "(top level)"


def _describe(
    error: ValidationError, path: Path | None, environ: Mapping[str, str], data: Mapping[str, Any] | None = None
) -> str:
    by_setting = {_setting_of(name): name for name in environ}
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        key = _key_of(loc, data or {})
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
            if isinstance(values, list):  # [[routes]]: replaced as a whole
                data[section] = values
            else:
                data.setdefault(section, {}).update(values)
    try:
        settings = BridgeSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, variables, data)) from None
    check_delete_folders(settings.delete, settings.upstream.mailbox)
    check_routes(
        settings.routes, settings.upstream, settings.routing,
        lambda maildrop: check_delete_folders(settings.delete, maildrop),
    )
    check_admin(settings)
    check_delete_names(settings.delete)
    check_state_key(settings.delete, uidl_records=settings.uidl.uses_records)
    if settings.upstream.auth == "oauth2":
        check_oauth2(settings.oauth2)
    return settings


def check_admin(settings: BridgeSettings) -> None:
    """The admin API answers only requests with the token; on a listener other machines can
    reach, a configuration without one is refused rather than started."""
    admin = settings.admin
    problems = [f"upstream.{problem}" for problem in admin_login_problems(settings.upstream)]
    if admin.token and admin.token_file:
        problems.append("admin.token: give admin.token or admin.token_file, not both")
    address = admin.listen_address
    if admin.api and not admin.api_token and address is not None and not is_loopback_host(address.host):
        problems.append(
            f"admin.api: on a listener other machines can reach ({admin.listen}) the admin API needs "
            "a token: admin.token_file, or the environment variable BRIDGE_ADMIN__TOKEN"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def weakened_settings(settings: BridgeSettings) -> list[tuple[str, dict[str, str]]]:
    """Every security default the configuration switches off, as (log event, its fields):
    logged as warnings at start-up."""
    pop3 = settings.pop3
    found: list[tuple[str, dict[str, str]]] = []
    backends = [("default", settings.upstream)] + [
        (name, merged_upstream(settings.upstream, route.upstream_overrides()))
        for route, name in zip(settings.routes, route_names(settings.routes), strict=True)
    ]
    for name, upstream in backends:
        where = {"host": upstream.host} if name == "default" else {"host": upstream.host, "backend": name}
        if upstream.tls == "none" and not is_loopback_host(upstream.host):
            found.append(("upstream_tls_disabled", {**where, "note": "passwords go to the mail server unencrypted"}))
        if upstream.tls != "none" and not upstream.verify:
            found.append(("upstream_tls_unverified", {**where, "note": "any certificate is accepted"}))
    if pop3.allow_plaintext_auth == "always":
        found.append(("plaintext_auth_allowed", {"note": "clients may send passwords over unencrypted connections"}))
    if settings.delete.accept_unsigned_state:
        found.append((
            "unsigned_state_accepted",
            {"note": "unsigned per-client state records are read; turn delete.accept_unsigned_state off once every device has polled"},
        ))
    return found
