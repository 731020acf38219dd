"""Getting an account's first tokens, for `pop3-imap-bridge oauth2 enrol` (headless: over SSH,
in a container), by one of the two flows a command line can run:

- `device` (RFC 8628): the command prints a URL and a code, the account's owner opens the URL
  on any device and types the code, the command polls the token endpoint until approved
  (`authorization_pending`, `slow_down` honoured). Microsoft's usual way.
- `browser`: authorization code with PKCE (RFC 7636, S256) and a loopback redirect (RFC 8252
  7.3): the command prints the URL to open and listens on 127.0.0.1 for the redirect. A
  browser on another machine cannot reach that listener; the owner then copies the URL the
  browser was sent to (its address bar shows it, even when the page does not load) and
  pastes it on the command's standard input. Google's usual way.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sys
from collections.abc import Callable
from typing import TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

import h11
import trio

from bridge.oauth2.client import TokenAnswer, TokenEndpoint
from bridge.oauth2.errors import TokenRequestRefused

_PAGE = b"<!doctype html><title>pop3-imap-bridge</title><p>Done: the bridge has the authorisation. You can close this window.</p>"


class FlowFailed(Exception):
    """The flow ended without tokens; the message says why, for the person running it."""


async def device_flow(endpoint: TokenEndpoint, account: str, out: TextIO, timeout_seconds: float) -> TokenAnswer:
    started = await endpoint.device_authorization()
    print(
        f"To let the bridge read the mail of {account}, open\n\n    {started['verification_uri']}\n\n"
        f"in a browser (on any device), sign in as {account}, and enter the code\n\n    {started['user_code']}\n\n"
        "Waiting for the approval...",
        file=out, flush=True,
    )
    interval = _number(started.get("interval"), 5.0, 1.0, 60.0)
    lifetime = _number(started.get("expires_in"), 900.0, 1.0, 3600.0)
    with trio.move_on_after(min(timeout_seconds, lifetime)):
        while True:
            await trio.sleep(interval)
            try:
                return await endpoint.device_code(started["device_code"])
            except TokenRequestRefused as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5  # RFC 8628 3.5
                    continue
                if exc.error == "access_denied":
                    raise FlowFailed("the request was declined in the browser") from None
                if exc.error == "expired_token":
                    raise FlowFailed("the code expired before it was entered; run the command again") from None
                raise
    raise FlowFailed("no approval in time; run the command again")


def _number(value: object, default: float, low: float, high: float) -> float:
    try:
        return min(max(float(value), low), high)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) for S256 (RFC 7636 4.1-4.2)."""
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")
    return verifier, challenge


def authorization_request(endpoint: TokenEndpoint, account: str, redirect_uri: str, challenge: str, state: str) -> str:
    settings = endpoint.settings
    query = {
        "response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
        "scope": settings.effective_scope, "state": state, "code_challenge": challenge,
        "code_challenge_method": "S256", "login_hint": account,
    }
    if settings.provider == "google":
        # Google gives a refresh token only for offline access, and again only on consent.
        query.update(access_type="offline", prompt="consent")
    base = settings.endpoint("authorization_url")
    return base + ("&" if "?" in base else "?") + urlencode(query)


def code_from_redirect(url: str, state: str) -> str:
    """The authorization code of the redirect URL the browser was sent to (FlowFailed if
    it carries an error, another request's state, or no code)."""
    params = {key: values[0] for key, values in parse_qs(urlsplit(url.strip()).query).items()}
    if "error" in params:
        raise FlowFailed(f"the provider answered {params['error']}: {params.get('error_description', '')}".rstrip(": "))
    if params.get("state") != state:
        raise FlowFailed("that URL does not belong to this request (its state differs); paste the URL of this run's redirect")
    if not params.get("code"):
        raise FlowFailed("that URL carries no authorization code")
    return params["code"]


async def browser_flow(
    endpoint: TokenEndpoint, account: str, out: TextIO, timeout_seconds: float,
    read_line: Callable[[], str] = sys.stdin.readline,
) -> TokenAnswer:
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    redirect_uri = f"http://127.0.0.1:{port}/"
    print(
        f"To let the bridge read the mail of {account}, open this URL in a browser and sign in as {account}:\n\n"
        f"    {authorization_request(endpoint, account, redirect_uri, challenge, state)}\n\n"
        f"A browser on this machine comes back to {redirect_uri} by itself. A browser elsewhere cannot:\n"
        "copy the address it ends up on (starting with that URL) and paste it here, then press Enter.",
        file=out, flush=True,
    )
    redirect: list[str] = []
    arrived = trio.Event()

    def take(url: str) -> None:
        if not redirect:
            redirect.append(url)
            arrived.set()

    async def pasted() -> None:
        while True:
            line = await trio.to_thread.run_sync(read_line, abandon_on_cancel=True)
            if not line:
                return  # no standard input: the loopback redirect only
            if line.strip():
                take(line.strip())
                return

    async def handle(stream: trio.SocketStream) -> None:
        target = await _read_request_target(stream)
        if target is not None and ("code=" in target or "error=" in target):
            take(f"{redirect_uri.rstrip('/')}{target}")

    with trio.move_on_after(timeout_seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pasted)
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            await arrived.wait()
            nursery.cancel_scope.cancel()
    if not redirect:
        raise FlowFailed("no redirect arrived and nothing was pasted in time; run the command again")
    code = code_from_redirect(redirect[0], state)
    return await endpoint.authorization_code(code, redirect_uri, verifier)


async def _read_request_target(stream: trio.SocketStream) -> str | None:
    """One HTTP request on the loopback listener: its target, answered with a short page."""
    connection = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(10):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    connection.receive_data(data)
                    if not data:
                        return None
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode("ascii", "replace")
                    headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(_PAGE))), ("Connection", "close")]
                    await stream.send_all(connection.send(h11.Response(status_code=200, headers=headers)) or b"")
                    await stream.send_all(connection.send(h11.Data(data=_PAGE)) or b"")
                    await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
                    return target
                return None
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None
    finally:
        await stream.aclose()
    return None
