"""An OAuth2 provider on loopback, and a Dovecot that logs users in with its bearer tokens.

`OAuth2Provider` is a real HTTP server (the standard library's, in a thread) playing the
identity provider a bridge talks to, with every endpoint the bridge and its enrolment
commands use:

- `POST /token`: grants `refresh_token` (rotation `none` as Google, `keep-old` as Microsoft:
  a new refresh token and the old one still valid, `strict`: the old one dies),
  `authorization_code` (PKCE S256 checked, one use), `urn:ietf:params:oauth:grant-type:
  device_code` (`authorization_pending` until approved), `client_credentials` (the client
  secret checked) and `urn:ietf:params:oauth:grant-type:jwt-bearer` (the assertion's RS256
  signature, issuer, audience and expiry checked with PyJWT);
- `POST /devicecode` (RFC 8628) and `GET /device/approve?user_code=..&user=..`, the user's
  approval in a browser;
- `GET /authorize`: consents at once (as `consent_user`) and redirects with a code;
- `POST /introspect` (RFC 7662), which Dovecot's oauth2 passdb asks: active or not;
- `POST /revoke`: a refresh token and the access tokens it gave.

Tests change its state directly (`revoke_user`, `expire_access_tokens`, `outage`) and read
what was asked of it (`calls`). An outage is `"http503"` (the endpoint answers 503) or
`"hang"` (it answers nothing until the outage ends); `stop()` closes the port.

`OAuth2Dovecot` is the sandbox Dovecot with Dovecot's `oauth2` passdb in introspection mode
(`post`) in front of that provider for XOAUTH2 and OAUTHBEARER, and the usual passwd-file
passdb for PLAIN and LOGIN (so tests seed and observe mailboxes with passwords as usual).
Dovecot's introspection request names only the token (its auth process panics when
`introspection_url` holds a `%u`, verified on 2.3.19), so an application's token (client
credentials) introspects as `app_mailbox`, the one mailbox tests give the application.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from sandbox.dovecot import DovecotSandbox

DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class _Grant:
    """What one consent (or one application) was given: the user it acts for (None: an
    application's own token)."""

    user: str | None
    refresh_tokens: set[str] = field(default_factory=set)
    revoked: bool = False


@dataclass
class _Access:
    grant: _Grant
    expires_at: float
    active: bool = True


class OAuth2Provider:
    """``with OAuth2Provider() as provider:`` the provider on ``provider.url``."""

    def __init__(
        self, *, client_id: str = "bridge-test-client", client_secret: str = "",
        access_lifetime: float = 3600.0, rotation: str = "none",
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret  # "" = a public client (no secret checked)
        self.access_lifetime = access_lifetime
        self.rotation = rotation
        self.consent_user = ""  # who consents at /authorize
        self.app_mailbox = ""  # the mailbox client_credentials tokens open (see above)
        self.jwt_issuers: dict[str, Any] = {}  # service account e-mail -> RSA public key
        self.outage: str | None = None
        self.calls: Counter[str] = Counter()  # "token:<grant>", "introspect", "devicecode", ...
        self._lock = threading.Lock()
        self._outage_over = threading.Event()
        self._released = threading.Event()  # cleared: /token requests wait (hold_tokens)
        self._released.set()
        self._refresh: dict[str, _Grant] = {}
        self._access: dict[str, _Access] = {}
        self._codes: dict[str, tuple[str, str, str]] = {}  # code -> (user, challenge, redirect_uri)
        self._devices: dict[str, dict[str, Any]] = {}  # device_code -> user_code, user
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                provider._handle(self, "POST")

            def do_GET(self) -> None:
                provider._handle(self, "GET")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="oauth2-provider", daemon=True)

    def __enter__(self) -> OAuth2Provider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the port (a token endpoint that is down: connections are refused)."""
        self._outage_over.set()
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    # -- what tests do ---------------------------------------------------------------------------

    def consent(self, user: str) -> str:
        """A refresh token for `user`, as if the user had consented (no enrolment flow)."""
        with self._lock:
            grant = _Grant(user)
            token = self._new_refresh(grant)
        return token

    def set_outage(self, kind: str | None) -> None:
        """"http503", "hang", or None (over: hung requests are answered 503 now)."""
        with self._lock:
            self.outage = kind
            if kind is None:
                self._outage_over.set()
            else:
                self._outage_over.clear()

    def hold_tokens(self) -> None:
        """Token requests wait from now on (counted as they arrive) until release_tokens()."""
        self._released.clear()

    def release_tokens(self) -> None:
        self._released.set()

    def revoke_user(self, user: str) -> None:
        """Every grant of `user` dies (a password change at the provider, an admin's revocation)."""
        with self._lock:
            for grant in self._refresh.values():
                if grant.user == user:
                    grant.revoked = True
            for access in self._access.values():
                if access.grant.user == user:
                    access.active = False

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working (their hour has passed)."""
        with self._lock:
            for access in self._access.values():
                access.active = False

    def token_calls(self, grant: str | None = None) -> int:
        with self._lock:
            if grant is not None:
                return self.calls[f"token:{grant}"]
            return sum(count for name, count in self.calls.items() if name.startswith("token:"))

    def valid_refresh_tokens(self, user: str) -> list[str]:
        with self._lock:
            return [t for t, g in self._refresh.items() if g.user == user and not g.revoked]

    def approve_device(self, user_code: str, user: str) -> None:
        with self._lock:
            for device in self._devices.values():
                if device["user_code"] == user_code:
                    device["user"] = user

    # -- the endpoints -----------------------------------------------------------------------------

    def _new_refresh(self, grant: _Grant) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        grant.refresh_tokens.add(token)
        self._refresh[token] = grant
        return token

    def _issue(self, grant: _Grant, *, refresh: bool, old_refresh: str | None = None) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(24)
        self._access[access] = _Access(grant, time.time() + self.access_lifetime)
        answer: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": int(self.access_lifetime)}
        if refresh:
            if old_refresh is None or self.rotation != "none":
                answer["refresh_token"] = self._new_refresh(grant)
            if old_refresh is not None and self.rotation == "strict":
                del self._refresh[old_refresh]
        return answer

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        form: dict[str, str] = {}
        if method == "POST":
            length = int(request.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(request.rfile.read(length).decode()).items()}
        route = (method, parts.path)
        if route == ("POST", "/token"):
            with self._lock:
                self.calls["token:" + form.get("grant_type", "?")] += 1
            self._released.wait(120)
            if self.outage == "hang":
                self._outage_over.wait(120)
            if self.outage is not None:
                return _send(request, 503, {"error": "temporarily_unavailable"})
            with self._lock:
                status, answer = self._token(form)
            return _send(request, status, answer)
        with self._lock:
            self.calls[parts.path.strip("/").split("/")[0]] += 1
            if route == ("POST", "/introspect"):
                return _send(request, 200, self._introspect(form.get("token", "")))
            if route == ("POST", "/devicecode"):
                if form.get("client_id") != self.client_id:
                    return _send(request, 401, {"error": "invalid_client"})
                device_code, user_code = secrets.token_urlsafe(16), secrets.token_hex(4).upper()
                self._devices[device_code] = {"user_code": user_code, "user": None, "expires": time.time() + 600}
                return _send(request, 200, {
                    "device_code": device_code, "user_code": user_code, "verification_uri": f"{self.url}/device",
                    "expires_in": 600, "interval": 1,
                })
            if route == ("GET", "/device/approve"):
                for device in self._devices.values():
                    if device["user_code"] == query.get("user_code"):
                        device["user"] = query.get("user")
                        return _send(request, 200, {"approved": True})
                return _send(request, 404, {"error": "unknown user_code"})
            if route == ("GET", "/authorize"):
                return self._authorize(request, query)
            if route == ("POST", "/revoke"):
                grant = self._refresh.get(form.get("token", ""))
                if grant is not None:
                    grant.revoked = True
                return _send(request, 200, {})
        return _send(request, 404, {"error": "not_found"})

    def _client_ok(self, form: dict[str, str]) -> bool:
        return form.get("client_id") == self.client_id and (not self.client_secret or form.get("client_secret") == self.client_secret)

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant_type = form.get("grant_type")
        if grant_type == JWT_BEARER:
            return self._jwt_bearer(form.get("assertion", ""))
        if not self._client_ok(form):
            return 401, {"error": "invalid_client"}
        if grant_type == "refresh_token":
            token = form.get("refresh_token", "")
            grant = self._refresh.get(token)
            if grant is None or grant.revoked:
                return 400, {"error": "invalid_grant", "error_description": "refresh token revoked or unknown"}
            return 200, self._issue(grant, refresh=True, old_refresh=token)
        if grant_type == "authorization_code":
            found = self._codes.pop(form.get("code", ""), None)
            if found is None:
                return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
            user, challenge, redirect_uri = found
            verifier = form.get("code_verifier", "")
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if computed != challenge or form.get("redirect_uri") != redirect_uri:
                return 400, {"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}
            return 200, self._issue(_Grant(user), refresh=True)
        if grant_type == DEVICE_CODE:
            device = self._devices.get(form.get("device_code", ""))
            if device is None or device["expires"] < time.time():
                return 400, {"error": "expired_token"}
            if device["user"] is None:
                return 400, {"error": "authorization_pending"}
            del self._devices[form["device_code"]]
            return 200, self._issue(_Grant(device["user"]), refresh=True)
        if grant_type == "client_credentials":
            if not self.client_secret:
                return 401, {"error": "invalid_client", "error_description": "a confidential client is needed"}
            return 200, self._issue(_Grant(None), refresh=False)
        return 400, {"error": "unsupported_grant_type"}

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any]]:
        import jwt

        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False})["iss"]
            key = self.jwt_issuers[issuer]
            claims = jwt.decode(assertion, key, algorithms=["RS256"], audience=f"{self.url}/token", options={"require": ["exp", "iat", "sub"]})
        except (jwt.PyJWTError, KeyError):
            return 400, {"error": "invalid_grant", "error_description": "assertion not valid"}
        return 200, self._issue(_Grant(claims["sub"]), refresh=False)

    def _authorize(self, request: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        if query.get("client_id") != self.client_id or query.get("code_challenge_method") != "S256" or not self.consent_user:
            return _send(request, 400, {"error": "invalid_request"})
        code = secrets.token_urlsafe(16)
        self._codes[code] = (self.consent_user, query.get("code_challenge", ""), query.get("redirect_uri", ""))
        location = query.get("redirect_uri", "") + "?" + urlencode({"code": code, "state": query.get("state", "")})
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    def _introspect(self, token: str) -> dict[str, Any]:
        access = self._access.get(token)
        if access is None or not access.active or access.grant.revoked or access.expires_at < time.time():
            return {"active": False}
        owner = access.grant.user or self.app_mailbox
        if not owner:
            return {"active": False}
        return {"active": True, "username": owner, "exp": int(access.expires_at), "scope": "mail"}


def _send(request: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


class OAuth2Dovecot(DovecotSandbox):
    """A sandbox Dovecot whose XOAUTH2 and OAUTHBEARER logins ask `provider` (introspection)."""

    def __init__(self, workdir: str | Path, provider_url: str, **kwargs: Any) -> None:
        self._provider_url = provider_url
        super().__init__(workdir, **kwargs)

    def _auth_config(self) -> str:
        w = self.workdir
        (w / "dovecot-oauth2.conf.ext").write_text(
            f"introspection_mode = post\n"
            f"introspection_url = {self._provider_url}/introspect\n"
            "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            "force_introspection = yes\ntimeout_msecs = 5000\n"
        )
        return f"""\
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {w}/dovecot-oauth2.conf.ext
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {w}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {w}/users/%u
}}
"""
