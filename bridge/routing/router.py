"""Routing a login: the static routes, then the lookup service if one is configured.

The route the account matches statically gives every upstream setting; a lookup answer
(bridge.routing.lookup) then moves the account to the server it names (host, port), with the
TLS mode, upstream login and maildrop it gives. Such a back end is named `host:port` (the
metrics label) unless it is the static route's own server; at most `MAX_LOOKUP_BACKENDS`
names are made that way per process (further servers share "lookup-other"), so a directory
that names many servers cannot grow the metrics without bound.

`is_current` tells the pool (bridge.imap.pool) whether a connection opened for a back end may
still serve it under the configuration in force: a reload that changes one route retires only
that route's connections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from bridge.config import BridgeSettings, ConfigError
from bridge.config.deletion import check_delete_folders
from bridge.config.routing import merged_upstream
from bridge.net.addresses import ListenAddress
from bridge.routing.lookup import LookupClient, LookupRequest, LookupUnavailable
from bridge.routing.routes import Backend, RouteTable

MAX_LOOKUP_BACKENDS = 64
OTHER_LOOKUP_BACKEND = "lookup-other"
# What a lookup answer may change of the static route's settings.
_LOOKUP_KEYS = ("host", "port", "tls", "mailbox")


class Router:
    def __init__(self, settings: Callable[[], BridgeSettings]) -> None:
        self._settings = settings
        self._table: RouteTable | None = None
        self._lookup: LookupClient | None = None
        self._lookup_names: set[str] = set()

    def table(self) -> RouteTable:
        """The routes of the configuration in force (rebuilt after a reload)."""
        settings = self._settings()
        if self._table is None or self._table.settings is not settings:
            self._table = RouteTable(settings)
        return self._table

    async def _lookup_client(self) -> LookupClient | None:
        routing = self._settings().routing
        if self._lookup is not None and self._lookup.settings != routing:
            # A reload changed [routing]: the old answers and connections go.
            old, self._lookup = self._lookup, None
            await old.aclose()
        if not routing.lookup_url:
            return None
        if self._lookup is None:
            self._lookup = LookupClient(routing)
        return self._lookup

    async def aclose(self) -> None:
        if self._lookup is not None:
            await self._lookup.aclose()
            self._lookup = None

    async def route(self, request: LookupRequest) -> Backend:
        """The back end of `request.account`. Raises LookupRefused or LookupUnavailable when
        a lookup service is configured and refuses or fails."""
        account = request.account
        route = self.table().route_for(account)
        static = route.backend(account)
        client = await self._lookup_client()
        if client is None:
            return static
        answer = await client.ask(request)
        overrides: dict[str, Any] = {"host": answer.host, "port": answer.port}
        if answer.tls is not None:
            overrides["tls"] = answer.tls
        if answer.mailbox is not None:
            overrides["mailbox"] = answer.mailbox
        try:
            upstream = merged_upstream(route.upstream, overrides)
            if upstream.mailbox != route.upstream.mailbox:
                check_delete_folders(self._settings().delete, upstream.mailbox)
        except (ValidationError, ConfigError) as exc:
            raise LookupUnavailable(f"lookup answered settings that cannot be used: {_first_line(exc)}") from None
        same_server = (upstream.host, upstream.port) == (route.upstream.host, route.upstream.port)
        name = route.name if same_server else self._lookup_name(upstream.host, upstream.port)
        return Backend(name, upstream, answer.login or static.login, route.name, route.login, looked_up=True)

    def _lookup_name(self, host: str, port: int) -> str:
        name = str(ListenAddress(host, port))
        if name in self._lookup_names:
            return name
        if len(self._lookup_names) >= MAX_LOOKUP_BACKENDS:
            return OTHER_LOOKUP_BACKEND
        self._lookup_names.add(name)
        return name

    def is_current(self, backend: Backend) -> bool:
        """May a connection opened for `backend` serve it under the configuration in force?"""
        route = self.table().by_name(backend.route)
        if route is None or route.login != backend.form:
            return False
        if not backend.looked_up:
            return route.upstream == backend.upstream
        # Moved by a lookup: the route's settings but what the answer may change.
        answered = {key: getattr(backend.upstream, key) for key in _LOOKUP_KEYS}
        return route.upstream.model_copy(update=answered) == backend.upstream


def _first_line(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        text = f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
    return text.splitlines()[0]
