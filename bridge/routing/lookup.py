"""Asking the lookup service where an account lives: nginx's `auth_http` protocol.

The request is a GET of `routing.lookup_url` with nginx mail's headers: `Auth-Method`,
`Auth-User` (the account, URL-escaped as nginx does), `Auth-Pass` only with
`routing.send_password`, `Auth-Protocol: pop3`, `Auth-Login-Attempt` (the attempt on this
connection), `Client-IP` (the real client), `Auth-SSL: on` for an encrypted client connection,
and behind a PROXY-protocol balancer `Proxy-Protocol-Addr`, `-Port`, `-Server-Addr` and
`-Server-Port`; plus the shared secret in `routing.auth_header`.

The answer is read from its headers:
- `Auth-Status: OK` with `Auth-Server` and `Auth-Port`: the account's IMAP server; with our
  extensions `Auth-TLS` (none, starttls, implicit), `Auth-User` (the upstream login, as nginx
  uses it) and `Auth-Mailbox` (the maildrop folder, URL-escaped UTF-8);
- any other `Auth-Status`: the text the client is refused with (`-ERR [AUTH] <text>`),
  after `Auth-Wait` seconds if given.
Anything else (no answer within `routing.timeout_seconds`, a connection error, an HTTP status
other than 200, a missing or malformed header) means the lookup is unavailable:
`-ERR [SYS/TEMP]`.

The service is trusted to route, never to reach the client unfiltered: the error text is
cut to printable ASCII and 200 characters, `Auth-Wait` is capped at `MAX_WAIT_SECONDS`.

Answers with `Auth-Status: OK` are cached per account for `routing.cache_seconds` (at most
`MAX_CACHED_ACCOUNTS` accounts, least recently used dropped first). Refusals are not: they
may depend on the password, the attempt or the client's address.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

import httpx
import trio

from bridge.config import account_key
from bridge.config.routing import RoutingSettings
from bridge.ops import metrics
from bridge.ops.logs import get_logger

_log = get_logger(component="routing")

MAX_WAIT_SECONDS = 30.0
MAX_CACHED_ACCOUNTS = 100_000
_MAX_TEXT = 200
# Printable ASCII but space and "%": what nginx leaves unescaped in Auth-User and Auth-Pass.
_UNESCAPED = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in "%")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
TlsMode = Literal["none", "starttls", "implicit"]


class LookupRefused(Exception):
    """The service refused the login: `text` for the client, after `wait` seconds."""

    def __init__(self, text: str, wait: float) -> None:
        super().__init__(text)
        self.text = text
        self.wait = wait


class LookupUnavailable(Exception):
    """No usable answer (timeout, outage, a malformed answer); the message says which."""


@dataclass(frozen=True)
class LookupRequest:
    """What the service is told about one login (headers of nginx's request)."""

    account: str
    password: str | None = None
    attempt: int = 1
    client_ip: str | None = None
    client_tls: bool = False
    proxy_source: tuple[str, int] | None = None
    proxy_destination: tuple[str, int] | None = None
    method: str = "plain"  # "none" for an administrator's lookup (no password involved)


@dataclass(frozen=True)
class LookupAnswer:
    host: str
    port: int
    tls: TlsMode | None = None
    login: str | None = None
    mailbox: str | None = None


def _escaped(text: str) -> str:
    return quote(text, safe=_UNESCAPED)


def request_headers(request: LookupRequest, settings: RoutingSettings) -> dict[str, str]:
    headers = {
        "Auth-Method": request.method,
        "Auth-User": _escaped(request.account),
        "Auth-Protocol": "pop3",
        "Auth-Login-Attempt": str(request.attempt),
    }
    if settings.send_password and request.password is not None:
        headers["Auth-Pass"] = _escaped(request.password)
    if request.client_ip:
        headers["Client-IP"] = request.client_ip
    if request.client_tls:
        headers["Auth-SSL"] = "on"
    if request.proxy_source is not None:
        headers["Proxy-Protocol-Addr"] = request.proxy_source[0]
        headers["Proxy-Protocol-Port"] = str(request.proxy_source[1])
    if request.proxy_destination is not None:
        headers["Proxy-Protocol-Server-Addr"] = request.proxy_destination[0]
        headers["Proxy-Protocol-Server-Port"] = str(request.proxy_destination[1])
    if settings.secret_value:
        headers[settings.auth_header] = settings.secret_value
    return headers


def _printable(text: str) -> str:
    cleaned = "".join(char if " " <= char <= "~" else " " for char in text).strip()
    return cleaned[:_MAX_TEXT] or "login refused"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOST.fullmatch(host) is not None


def parse_answer(response: httpx.Response) -> LookupAnswer:
    """The answer's route; raises LookupRefused or LookupUnavailable."""
    if response.status_code != 200:
        raise LookupUnavailable(f"lookup answered HTTP {response.status_code}")
    headers = response.headers
    status = headers.get("Auth-Status")
    if status is None:
        raise LookupUnavailable("lookup answered without Auth-Status")
    if status.strip() != "OK":
        wait = 0.0
        if "Auth-Wait" in headers:
            try:
                wait = min(max(float(headers["Auth-Wait"]), 0.0), MAX_WAIT_SECONDS)
            except ValueError:
                wait = 0.0
        raise LookupRefused(_printable(status), wait)
    host = headers.get("Auth-Server", "").strip().strip("[]")
    if not _valid_host(host):
        raise LookupUnavailable("lookup answered OK without a valid Auth-Server")
    try:
        port = int(headers.get("Auth-Port", ""))
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise LookupUnavailable("lookup answered OK without a valid Auth-Port")
    tls = headers.get("Auth-TLS")
    if tls is not None and tls.strip().lower() not in ("none", "starttls", "implicit"):
        raise LookupUnavailable("lookup answered an Auth-TLS other than none, starttls or implicit")
    login = headers.get("Auth-User")
    if login is not None and (not login.strip() or not login.isprintable() or len(login) > 255):
        raise LookupUnavailable("lookup answered an unusable Auth-User")
    mailbox = headers.get("Auth-Mailbox")
    if mailbox is not None:
        mailbox = unquote(mailbox, errors="strict") if mailbox.strip() else ""
        if not mailbox or not mailbox.isprintable():
            raise LookupUnavailable("lookup answered an unusable Auth-Mailbox")
    return LookupAnswer(
        host, port, tls.strip().lower() if tls is not None else None,  # type: ignore[arg-type]
        login.strip() if login is not None else None, mailbox,
    )


class LookupClient:
    """One configuration's lookup service: its HTTP client and its cache of answers."""

    def __init__(self, settings: RoutingSettings) -> None:
        self.settings = settings
        self._cache: OrderedDict[str, tuple[float, LookupAnswer]] = OrderedDict()
        # The environment's proxy variables must not redirect a request carrying passwords.
        self._client = httpx.AsyncClient(
            timeout=settings.timeout_seconds, follow_redirects=False, trust_env=False,
            headers={"User-Agent": "pop3-imap-bridge"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def cached(self, account: str) -> LookupAnswer | None:
        key = account_key(account)
        found = self._cache.get(key)
        if found is None:
            return None
        expires, answer = found
        if trio.current_time() >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    async def _ask(self, request: LookupRequest) -> LookupAnswer:
        settings = self.settings
        try:
            with trio.fail_after(settings.timeout_seconds):
                response = await self._client.get(settings.lookup_url, headers=request_headers(request, settings))
        except (trio.TooSlowError, httpx.TimeoutException):
            raise LookupUnavailable(f"lookup: no answer within {settings.timeout_seconds:g} s") from None
        except (httpx.HTTPError, OSError) as exc:
            raise LookupUnavailable(f"lookup: {type(exc).__name__}") from None
        try:
            return parse_answer(response)
        except UnicodeDecodeError:
            raise LookupUnavailable("lookup answered an unusable Auth-Mailbox") from None

    async def ask(self, request: LookupRequest) -> LookupAnswer:
        """The account's route: cached, or from the service. Raises LookupRefused or
        LookupUnavailable."""
        answer = self.cached(request.account)
        if answer is not None:
            metrics.LOOKUPS.labels("cached").inc()
            return answer
        settings = self.settings
        try:
            answer = await self._ask(request)
        except LookupRefused:
            metrics.LOOKUPS.labels("refused").inc()
            raise
        except LookupUnavailable as exc:
            metrics.LOOKUPS.labels("unavailable").inc()
            _log.warning("lookup_failed", error=str(exc))
            raise
        metrics.LOOKUPS.labels("ok").inc()
        if settings.cache_seconds > 0:
            key = account_key(request.account)
            self._cache[key] = (trio.current_time() + settings.cache_seconds, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED_ACCOUNTS:
                self._cache.popitem(last=False)
        return answer
