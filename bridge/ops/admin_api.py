"""The admin API on the admin listener (bridge.ops.admin), with `admin.api = true`:

| request | answer (JSON) |
| --- | --- |
| `GET /admin/sessions[?account=GLOB]` | the live sessions (account, device, client, back end, since, state, bytes sent) |
| `POST /admin/kick?account=A[&device=D]` | ends those sessions without their pending deletions |
| `GET /admin/devices?account=A` | the devices in the account's state folder (last seen, how many hidden) |
| `POST /admin/device-reset?account=A&device=D[&from_now_on=1]` | rewrites the device's record |

Every request needs `Authorization: Bearer <admin token>` (compared in constant time). Without
a token configured every request is refused (403); a missing or wrong one is 401. Each request
is logged (`admin_request`: action, account, device, status, the client's address), never the
token. What the actions do is in bridge.ops.helpdesk.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from bridge.config import BridgeSettings
from bridge.ops.helpdesk import AdminError, Helpdesk
from bridge.ops.logs import get_logger

_log = get_logger(component="admin")
PREFIX = b"/admin/"
JSON = "application/json"
# Action -> the HTTP method it takes.
_ACTIONS = {"sessions": b"GET", "kick": b"POST", "devices": b"GET", "device-reset": b"POST"}
_MAX_PARAMETER = 512


class AdminApi:
    """Answers /admin/... requests. `token`: the configured bearer token, or None for an API
    that needs none (a worker's private socket, reached only by its supervisor)."""

    def __init__(self, helpdesk: Helpdesk, token: Callable[[], str | None]) -> None:
        self._helpdesk = helpdesk
        self._token = token

    @classmethod
    def for_settings(cls, helpdesk: Helpdesk, settings: Callable[[], BridgeSettings]) -> AdminApi:
        return cls(helpdesk, lambda: settings().admin.api_token)

    async def handle(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], client: str
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, JSON body, extra headers) for one request."""
        path, _, query = target.partition(b"?")
        action = path[len(PREFIX):].decode("ascii", "replace")
        params: dict[str, str] = {}
        fields: dict[str, Any] = {"action": action, "client": client}
        try:
            self._authorize(headers)
            wanted = _ACTIONS.get(action)
            if wanted is None:
                raise AdminError(404, f"no admin action {action!r}; try sessions, kick, devices or device-reset")
            if method != wanted:
                raise AdminError(405, f"{action} takes {wanted.decode()}")
            params = _parameters(query)
            fields.update(account=params.get("account"), device=params.get("device"))
            result = await self._dispatch(action, params)
        except AdminError as exc:
            _log.log(30 if exc.status in (401, 403) else 20, "admin_request", status=exc.status, error=exc.text, **fields)
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            if exc.status == 405:
                extra.append((b"allow", _ACTIONS[action]))
            return exc.status, _json({"error": exc.text}), extra
        _log.info("admin_request", status=200, **fields)
        return 200, _json(result), []

    def _authorize(self, headers: list[tuple[bytes, bytes]]) -> None:
        token = self._token()
        if token is None:
            return
        if not token:
            raise AdminError(403, "the admin API has no token configured (admin.token_file or BRIDGE_ADMIN__TOKEN)")
        given = b""
        for name, value in headers:
            if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if not given or not hmac.compare_digest(given, token.encode("utf-8")):
            raise AdminError(401, "a valid admin token is needed (Authorization: Bearer ...)")

    async def _dispatch(self, action: str, params: dict[str, str]) -> Any:
        helpdesk = self._helpdesk
        if action == "sessions":
            return {"sessions": await helpdesk.sessions(params.get("account"))}
        account = _required(params, "account")
        if action == "kick":
            return await helpdesk.kick(account, params.get("device"))
        if action == "devices":
            return await helpdesk.devices(account)
        from_now_on = params.get("from_now_on", "0").lower() in ("1", "true", "yes")
        return await helpdesk.device_reset(account, _required(params, "device"), from_now_on)


def _parameters(query: bytes) -> dict[str, str]:
    try:
        parsed = parse_qs(query.decode("utf-8"), keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise AdminError(400, "the query string is not UTF-8") from None
    params = {}
    for name, values in parsed.items():
        if len(values) != 1 or len(values[0]) > _MAX_PARAMETER or not values[0].isprintable():
            raise AdminError(400, f"parameter {name!r} must be given once, printable, at most {_MAX_PARAMETER} characters")
        params[name] = values[0]
    return params


def _required(params: dict[str, str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise AdminError(400, f"parameter {name!r} is required")
    return value


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
