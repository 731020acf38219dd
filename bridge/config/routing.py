"""[[routes]] and [routing]: which IMAP server (back end) serves an account.

A route names accounts by glob (`match`, after the `#device` split, compared as the upstream
compares accounts: case-insensitively) and may set any `[upstream]` key; the keys it leaves
out come from `[upstream]`. The first route that matches wins; an account no route matches is
served by `[upstream]` itself (the back end "default"). `login` forms the upstream login from
the account: `{account}` (the default), `{local}`, `{domain}`, or any fixed text around them.

A route's keys are typed like `[upstream]`'s (the fields are made from `UpstreamSettings`, so
a key added there can be set per route at once); the merged settings are validated as a whole
by `check_routes`, whose errors name the route and the key.

`[routing] lookup_url` asks an HTTP service (nginx's `auth_http` protocol, bridge.routing.lookup)
instead; what it answers overrides the host, port, TLS mode, upstream login and maildrop of the
route the account matches statically.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, ValidationError, create_model, field_validator

from bridge.config.base import ConfigError, Section, readable_file
from bridge.config.sections import UpstreamSettings

# The back end that [upstream] itself is, for accounts no route matches.
DEFAULT_BACKEND = "default"
ROUTE_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_ROUTE_NAME = re.compile(ROUTE_NAME_PATTERN)
LOGIN_FIELDS = ("account", "local", "domain")
# An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


def check_login_template(value: str) -> str:
    """`{account}`, `{local}` and `{domain}`, with fixed text around them (or none at all)."""
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"not a login form ({exc}); use {{account}}, {{local}} or {{domain}}") from None
    for _text, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in LOGIN_FIELDS or spec or conversion:
            raise ValueError(f"unknown placeholder {{{field}}}; use {{account}}, {{local}} or {{domain}}")
    if not value:
        raise ValueError("must not be empty")
    return value


def upstream_login(template: str, account: str) -> str:
    """The upstream login `template` forms for `account` (`alice@example.com`: local `alice`,
    domain `example.com`; an account without `@` has an empty domain)."""
    local, _at, domain = account.rpartition("@") if "@" in account else (account, "", "")
    return template.format(account=account, local=local, domain=domain)


def _route_upstream_fields() -> dict[str, Any]:
    """Every [upstream] key, optional (None: taken from [upstream]), with its constraints."""
    fields: dict[str, Any] = {}
    for key, info in UpstreamSettings.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[key] = (Optional[annotation], None)  # noqa: UP045 - built at run time
    return fields


class _RouteBase(Section):
    # The back end's name: the metrics label and what /readyz, logs and `admin who` show.
    name: str = ""
    match: str | list[str]
    login: str = "{account}"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not _ROUTE_NAME.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        if value == DEFAULT_BACKEND:
            raise ValueError(f'"{DEFAULT_BACKEND}" is the name of [upstream] itself')
        return value

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: str | list[str]) -> str | list[str]:
        patterns = [value] if isinstance(value, str) else value
        if not patterns or any(not pattern.strip() for pattern in patterns):
            raise ValueError("needs at least one non-empty glob, e.g. \"*@example.com\"")
        return value

    @field_validator("login")
    @classmethod
    def _login(cls, value: str) -> str:
        return check_login_template(value)

    @property
    def patterns(self) -> tuple[str, ...]:
        return (self.match,) if isinstance(self.match, str) else tuple(self.match)

    def upstream_overrides(self) -> dict[str, Any]:
        """The [upstream] keys this route sets."""
        return {key: getattr(self, key) for key in UpstreamSettings.model_fields if getattr(self, key) is not None}


RouteSettings = create_model("RouteSettings", __base__=_RouteBase, **_route_upstream_fields())
RouteSettings.__doc__ = "One [[routes]] entry: which accounts, and the [upstream] keys that differ for them."


class RoutingSettings(Section):
    """[routing]: the lookup service (nginx auth_http style) that routes accounts."""

    # Empty: static [[routes]] only.
    lookup_url: str = ""
    # Send the POP3 password to the lookup service (Auth-Pass); off, it never leaves for it.
    send_password: bool = False
    # An answer of "Auth-Status: OK" is reused for the account this long (0: ask every login).
    cache_seconds: float = Field(default=60.0, ge=0, le=86400)
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # A shared secret sent in `auth_header`, so the service knows the bridge is asking.
    secret: str = ""
    secret_file: str = ""
    auth_header: str = "X-Auth-Key"
    _secret_value: str = PrivateAttr("")

    @field_validator("lookup_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("secret_file")
    @classmethod
    def _secret_file(cls, value: str) -> str:
        return readable_file(value)

    @field_validator("auth_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError("must be an HTTP header name")
        return value

    def model_post_init(self, context: Any) -> None:
        if self.secret:
            self._secret_value = self.secret.strip()
        elif self.secret_file:
            self._secret_value = Path(self.secret_file).read_text().strip()

    @property
    def secret_value(self) -> str:
        """The shared secret of `secret` or `secret_file` ("" when neither is set)."""
        return self._secret_value


def route_label(index: int, route: Any) -> str:
    """How errors name a route: `routes[2]` and its name, if it has one."""
    return f"routes[{index}]" + (f" ({route.name})" if route.name else "")


def route_names(routes: list[Any]) -> list[str]:
    """Each route's back-end name: its `name`, else `route<N>` (1-based)."""
    return [route.name or f"route{index + 1}" for index, route in enumerate(routes)]


def merged_upstream(base: UpstreamSettings, overrides: dict[str, Any]) -> UpstreamSettings:
    """[upstream] with a route's (or a lookup answer's) keys on top, validated as a whole."""
    if not overrides:
        return base
    return UpstreamSettings.model_validate({**base.model_dump(), **overrides})


def check_routes(
    routes: list[Any], upstream: UpstreamSettings, routing: RoutingSettings, check_maildrop: Callable[[str], None]
) -> None:
    """What pydantic cannot see route by route: the merged [upstream] keys, unique names, the
    maildrop against the state and move folders (`check_maildrop` raises ConfigError), the
    lookup's secret. Every problem names the route and the key."""
    problems: list[str] = []
    names = route_names(routes)
    seen: dict[str, int] = {}
    for index, (route, name) in enumerate(zip(routes, names, strict=True)):
        label = route_label(index, route)
        if name in seen:
            problems.append(f"{label}.name: {name!r} is already the name of routes[{seen[name]}]")
        seen.setdefault(name, index)
        try:
            merged = merged_upstream(upstream, route.upstream_overrides())
        except ValidationError as exc:
            for error in exc.errors():
                key = ".".join(str(part) for part in error["loc"]) or "(route)"
                problems.append(f"{label}.{key}: {error['msg'].removeprefix('Value error, ')}")
            continue
        problems += [f"{label}.{problem}" for problem in admin_login_problems(merged)]
        if merged.mailbox != upstream.mailbox:
            try:
                check_maildrop(merged.mailbox)
            except ConfigError as exc:
                problems.append(f"{label}.mailbox: {exc}")
    if routing.secret and routing.secret_file:
        problems.append("routing.secret: give routing.secret or routing.secret_file, not both")
    if problems:
        raise ConfigError("\n".join(problems))


def admin_login_problems(upstream: UpstreamSettings) -> list[str]:
    """The admin login (master user) needs its password file, and the file its login."""
    if bool(upstream.admin_login) != bool(upstream.admin_password_file):
        return ["admin_login: admin_login and admin_password_file must be given together"]
    return []
