"""The client side of the two SASL mechanisms that carry an OAuth2 bearer token (pure).

- XOAUTH2 (Google's and Microsoft's): `user=U ^A auth=Bearer T ^A ^A`. After a failure the
  server sends an error challenge (base64 JSON); the client answers with an empty line and
  the server then ends the exchange with NO.
- OAUTHBEARER (RFC 7628): a GS2 header `n,a=U,` (`,` and `=` in U escaped as `=2C` and
  `=3D`, RFC 5801) then `host=H ^A port=P ^A auth=Bearer T ^A ^A`. After an error challenge
  the client MUST send a single %x01 (section 3.2.3), i.e. `AQ==`.

`BearerExchange` answers the server's continuation requests of one AUTHENTICATE: the initial
response when the server asks for it (no SASL-IR), the mechanism's answer to one error
challenge, and `*` (cancel, RFC 3501 6.2.2) to anything beyond, so a server that keeps
challenging cannot hold the exchange open.
"""

from __future__ import annotations

import base64

XOAUTH2 = "XOAUTH2"
OAUTHBEARER = "OAUTHBEARER"


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def escape_authzid(user: str) -> str:
    """RFC 5801's saslname: `=` and `,` escaped (`=` first, or `,`'s escape would be escaped)."""
    return user.replace("=", "=3D").replace(",", "=2C")


def xoauth2_response(user: str, token: str) -> bytes:
    """The XOAUTH2 initial client response, base64-encoded."""
    return _b64(f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8", "surrogateescape"))


def oauthbearer_response(user: str, token: str, host: str, port: int) -> bytes:
    """The OAUTHBEARER initial client response (RFC 7628 3.1), base64-encoded."""
    message = f"n,a={escape_authzid(user)},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return _b64(message.encode("utf-8", "surrogateescape"))


def error_answer(mechanism: str) -> bytes:
    """What the client sends after an error challenge: nothing (XOAUTH2) or %x01 (OAUTHBEARER)."""
    return _b64(b"\x01") if mechanism == OAUTHBEARER else b""


def choose_mechanism(configured: str, capabilities: frozenset[str]) -> str:
    """oauth2.mechanism against what the server advertises: "auto" takes OAUTHBEARER when it
    is offered, else XOAUTH2; a configured one is used as it is."""
    if configured == "oauthbearer":
        return OAUTHBEARER
    if configured == "xoauth2":
        return XOAUTH2
    return OAUTHBEARER if f"AUTH={OAUTHBEARER}" in capabilities else XOAUTH2


class BearerExchange:
    """The client's lines for one AUTHENTICATE exchange, one per continuation request."""

    def __init__(self, mechanism: str, initial: bytes, *, initial_sent: bool) -> None:
        self.mechanism = mechanism
        self._initial = initial
        self._initial_sent = initial_sent
        # The server's error challenges (base64 text, kept for the log: never acted upon;
        # providers put different JSON there and Dovecot's scope is not Gmail's).
        self.challenges: list[bytes] = []
        self._answered_error = False

    def respond(self, challenge: bytes) -> bytes:
        """The line to send for the server's `+ <challenge>`."""
        if not self._initial_sent:
            self._initial_sent = True
            return self._initial
        self.challenges.append(challenge)
        if self._answered_error:
            return b"*"
        self._answered_error = True
        return error_answer(self.mechanism)
