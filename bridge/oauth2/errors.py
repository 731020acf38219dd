"""What can go wrong with an OAuth2 login, as the POP3 side tells it apart (bridge.session.login):

- `DeviceLoginRefused` (wrong device password, or an account nobody enrolled): `-ERR [AUTH]`,
  counted by the failed-login limiter like any wrong password;
- `ReauthorisationNeeded` (the refresh token is dead: `invalid_grant`): `-ERR [AUTH]
  re-authorisation needed`, after the device password was found right;
- `TokenEndpointUnavailable`, `StoreUnavailable` (down, slow, broken): `-ERR [SYS/TEMP]`;
- `TokenRequestRefused` (the endpoint refused the bridge's own request: client, secret, scope,
  consent): `-ERR [SYS/TEMP]` and a warning for the operator, never `[AUTH]`.
"""

from __future__ import annotations

from bridge.imap.errors import AuthenticationFailed, UpstreamError, UpstreamUnavailable


class DeviceLoginRefused(AuthenticationFailed):
    """The device password is wrong, or the account is not enrolled (`reason` says which,
    for the log only: the device hears the same answer either way)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"device login refused: {reason}")
        self.reason = reason


class ReauthorisationNeeded(UpstreamError):
    """The account's grant is no longer valid (revoked, expired, password changed at the
    provider): someone must run `pop3-imap-bridge oauth2 enrol` for it again."""


class TokenEndpointUnavailable(UpstreamUnavailable):
    """The token endpoint could not be reached, did not answer in time, or failed (5xx, 429)."""


class StoreUnavailable(UpstreamUnavailable):
    """The token store (its directory, or Redis) could not be read or written."""


class TokenRequestRefused(UpstreamError):
    """The token endpoint answered a request with an OAuth2 error (RFC 6749 5.2), `error`."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"token endpoint refused the request: {error}" + (f" ({description})" if description else ""))
        self.error = error
        self.description = description


class InvalidGrant(TokenRequestRefused):
    """`invalid_grant`: the refresh token (or code, or assertion) is not valid any more."""

    def __init__(self, description: str = "") -> None:
        super().__init__("invalid_grant", description)
