"""The static routes of one configuration: which back end serves an account.

`RouteTable` is built once per configuration (a reload builds a new one): the `[[routes]]` in
order, then `[upstream]` itself as the back end "default". `Backend` is what a session (and
the pool) gets: the back end's name (the metrics label), the complete upstream settings it is
opened with, and the upstream login for this account.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from bridge.config import BridgeSettings, UpstreamSettings, account_key
from bridge.config.routing import DEFAULT_BACKEND, merged_upstream, route_names, upstream_login


@dataclass(frozen=True)
class Backend:
    """Where and as whom one account's connection is opened.

    `name`: the back end (a route's name, "default" for [upstream], `host:port` for a server a
    lookup named); `route`: the static route it is based on (the same as `name` unless a
    lookup answer moved the account); `login`: the upstream login, made by the route's login
    form `form`."""

    name: str
    upstream: UpstreamSettings
    login: str
    route: str = DEFAULT_BACKEND
    form: str = "{account}"
    # Moved by a lookup answer (its server, TLS mode, login or maildrop may differ from the route's).
    looked_up: bool = False

    @property
    def address(self) -> str:
        return f"{self.upstream.host}:{self.upstream.port}"


@dataclass(frozen=True)
class Route:
    name: str
    patterns: tuple[str, ...]  # lower-cased globs
    upstream: UpstreamSettings
    login: str  # the login form: {account}, {local}, {domain}

    def matches(self, account: str) -> bool:
        key = account_key(account)
        return any(fnmatchcase(key, pattern) for pattern in self.patterns)

    def backend(self, account: str) -> Backend:
        return Backend(self.name, self.upstream, upstream_login(self.login, account), self.name, self.login)


class RouteTable:
    """The routes of `settings`, first match first, then [upstream] as "default"."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.default = Route(DEFAULT_BACKEND, ("*",), settings.upstream, "{account}")
        self.routes = [
            Route(name, tuple(p.lower() for p in route.patterns), merged_upstream(settings.upstream, route.upstream_overrides()), route.login)
            for route, name in zip(settings.routes, route_names(settings.routes), strict=True)
        ]
        self._by_name = {route.name: route for route in [*self.routes, self.default]}

    def route_for(self, account: str) -> Route:
        for route in self.routes:
            if route.matches(account):
                return route
        return self.default

    def backend_for(self, account: str) -> Backend:
        return self.route_for(account).backend(account)

    def by_name(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def configured(self) -> list[Route]:
        """The back ends this configuration names: every route, and [upstream] unless a route
        matching every account ("*") leaves it nothing to serve."""
        catch_all = any("*" in route.patterns for route in self.routes)
        return self.routes if catch_all else [*self.routes, self.default]

    def engines(self) -> set[str]:
        """Every engine a back end uses (their runtimes are opened at start)."""
        return {route.upstream.engine for route in [*self.routes, self.default]}
