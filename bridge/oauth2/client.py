"""The token endpoint (RFC 6749) and the device authorization endpoint (RFC 8628), over
httpx's AsyncClient (which runs on Trio). Every grant the bridge and its enrolment commands
use: refresh_token, authorization_code (PKCE), device_code, client_credentials, and
jwt_bearer (RFC 7523, the assertion signed by PyJWT with the service account's RSA key).

The client authenticates with client_secret_post (the secret in the form, as Google and
Microsoft accept); a public client sends its client_id alone. Answers are read as hostile
input: at most `_MAX_ANSWER_BYTES`, JSON objects only. What fails is told apart the way a
POP3 client must hear it (bridge.oauth2.errors): unreachable, slow, 5xx or 429 is
TokenEndpointUnavailable; an OAuth2 error is TokenRequestRefused (InvalidGrant for
`invalid_grant`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from bridge.config import OAuth2Settings
from bridge.oauth2.errors import InvalidGrant, TokenEndpointUnavailable, TokenRequestRefused

_MAX_ANSWER_BYTES = 256 * 1024
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
# How long a jwt_bearer assertion is valid (Google's maximum is an hour).
_ASSERTION_SECONDS = 3600
# An access token without expires_in: assume an hour (RFC 6749 leaves it to the server).
_DEFAULT_EXPIRES_IN = 3600.0


@dataclass(frozen=True)
class TokenAnswer:
    access_token: str
    expires_in: float
    refresh_token: str | None  # None: the server kept the old one (no rotation)
    scope: str


class TokenEndpoint:
    """Requests to the endpoints `oauth2` names, each within `timeout_seconds`."""

    def __init__(self, oauth2: OAuth2Settings, timeout_seconds: float) -> None:
        self.settings = oauth2
        self.timeout = timeout_seconds

    def _client_form(self) -> dict[str, str]:
        form = {"client_id": self.settings.client_id} if self.settings.client_id else {}
        if self.settings.secret:
            form["client_secret"] = self.settings.secret
        return form

    # -- grants ---------------------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenAnswer:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **self._client_form()}
        if self.settings.effective_scope:
            form["scope"] = self.settings.effective_scope
        return _token_answer(await self.post("token_url", form))

    async def client_credentials(self) -> TokenAnswer:
        form = {"grant_type": "client_credentials", "scope": self.settings.effective_scope, **self._client_form()}
        return _token_answer(await self.post("token_url", form))

    async def jwt_bearer(self, subject: str) -> TokenAnswer:
        """A token for `subject` (the mailbox's address) from the service account, which
        must be allowed to act for the domain's users (Google: domain-wide delegation)."""
        import jwt

        key = self.settings.service_account
        assert key is not None, "check_oauth2 requires the key file for jwt_bearer"
        now = int(time.time())
        claims = {
            "iss": key.client_email, "sub": subject, "aud": self.settings.endpoint("token_url"),
            "scope": self.settings.effective_scope, "iat": now, "exp": now + _ASSERTION_SECONDS,
        }
        headers = {"kid": key.private_key_id} if key.private_key_id else None
        assertion = jwt.encode(claims, key.private_key, algorithm="RS256", headers=headers)
        return _token_answer(await self.post("token_url", {"grant_type": JWT_BEARER, "assertion": assertion}))

    async def authorization_code(self, code: str, redirect_uri: str, verifier: str) -> TokenAnswer:
        form = {
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier, **self._client_form(),
        }
        return _token_answer(await self.post("token_url", form))

    async def device_authorization(self) -> dict[str, Any]:
        """RFC 8628 3.1-3.2: device_code, user_code, verification_uri, interval, expires_in."""
        form = {"scope": self.settings.effective_scope, **self._client_form()}
        answer = await self.post("device_authorization_url", form)
        # Microsoft's v2 endpoint says verification_uri; some older ones verification_url.
        if "verification_uri" not in answer and isinstance(answer.get("verification_url"), str):
            answer["verification_uri"] = answer["verification_url"]
        for name in ("device_code", "user_code", "verification_uri"):
            if not isinstance(answer.get(name), str) or not answer[name]:
                raise TokenRequestRefused("invalid_response", f"the device authorization answer has no {name}")
        return answer

    async def device_code(self, device_code: str) -> TokenAnswer:
        form = {"grant_type": DEVICE_CODE, "device_code": device_code, **self._client_form()}
        return _token_answer(await self.post("token_url", form))

    # -- the request ------------------------------------------------------------------------------

    async def post(self, endpoint: str, form: dict[str, str]) -> dict[str, Any]:
        import httpx

        url = self.settings.endpoint(endpoint)
        if not url:
            raise TokenRequestRefused("not_configured", f"oauth2.{endpoint} is not set for this provider")
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                async with client.stream("POST", url, data=form, headers={"Accept": "application/json"}) as response:
                    body = b""
                    async for piece in response.aiter_bytes():
                        body += piece
                        if len(body) > _MAX_ANSWER_BYTES:
                            raise TokenEndpointUnavailable(f"{endpoint}: answer larger than {_MAX_ANSWER_BYTES} bytes")
                    status = response.status_code
        except httpx.TimeoutException:
            raise TokenEndpointUnavailable(f"{endpoint}: no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise TokenEndpointUnavailable(f"{endpoint}: {type(exc).__name__}") from None
        if status >= 500 or status == 429:
            raise TokenEndpointUnavailable(f"{endpoint}: HTTP {status}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if status >= 400:
                raise TokenRequestRefused(f"http_{status}", "no OAuth2 error in the answer")
            raise TokenEndpointUnavailable(f"{endpoint}: HTTP {status} without a JSON object")
        error = answer.get("error")
        if status >= 400 or error is not None:
            code = str(error or f"http_{status}")[:64]
            description = str(answer.get("error_description") or "")[:300]
            if code == "invalid_grant":
                raise InvalidGrant(description)
            raise TokenRequestRefused(code, description)
        return answer


def _token_answer(answer: dict[str, Any]) -> TokenAnswer:
    token = answer.get("access_token")
    if not isinstance(token, str) or not token or not token.isprintable():
        raise TokenRequestRefused("invalid_response", "no access_token in the answer")
    try:
        expires_in = float(answer.get("expires_in", _DEFAULT_EXPIRES_IN))
    except (TypeError, ValueError):
        expires_in = _DEFAULT_EXPIRES_IN
    refresh = answer.get("refresh_token")
    scope = answer.get("scope")
    return TokenAnswer(
        token, max(0.0, min(expires_in, 86400.0 * 366)), refresh if isinstance(refresh, str) and refresh else None,
        scope if isinstance(scope, str) else "",
    )
