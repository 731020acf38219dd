"""The SASL mechanisms the POP3 core speaks for AUTH (RFC 5034): PLAIN and LOGIN.

Both carry a user name and a password in the clear (base64 is an encoding, not
a cipher), which is why the core offers them only where plaintext logins are
allowed.  An exchange is a small object: ``step`` takes one decoded client
response and returns either the next challenge to send or the credentials.
Everything the client can get wrong raises `SaslFailure` with our reply text;
the client's bytes are never echoed back.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

__all__ = [
    "MAX_RESPONSE_LINE",
    "SUPPORTED_MECHANISMS",
    "Credentials",
    "LoginExchange",
    "PlainExchange",
    "SaslExchange",
    "SaslFailure",
    "decode_response",
    "start_exchange",
]

SUPPORTED_MECHANISMS = ("PLAIN", "LOGIN")

# RFC 5034 keeps the AUTH command line itself within RFC 2449's 255 octets (a
# longer initial response must go in a continuation), but a continuation line
# may be longer: long passwords and tokens need the room.  This bound keeps a
# client from making us hold more than this for one response line.
MAX_RESPONSE_LINE = 8192

# Bytes that could end or split a command upstream (IMAP LOGIN, logs) and that
# USER/PASS lines cannot carry either.
_FORBIDDEN = (b"\0", b"\r", b"\n")


class SaslFailure(Exception):
    """The exchange failed; ``str(exc)`` is the text of our -ERR reply."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def decode_response(text: bytes) -> bytes:
    """A client response line (or initial response) to bytes; "=" is the empty response."""
    if text == b"=":
        return b""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SaslFailure("invalid base64 in authentication response") from None


def _text(value: bytes, what: str) -> str:
    if not value:
        raise SaslFailure(f"empty {what}")
    if any(bad in value for bad in _FORBIDDEN):
        raise SaslFailure(f"invalid character in {what}")
    # surrogateescape, as for USER/PASS: upstream gets the client's exact bytes.
    return value.decode("utf-8", errors="surrogateescape")


class PlainExchange:
    """RFC 4616: one response, ``authzid NUL authcid NUL passwd``."""

    name = "PLAIN"
    first_challenge = b""

    def step(self, response: bytes) -> bytes | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SaslFailure("malformed PLAIN response")
        authzid, authcid, password = parts
        username = _text(authcid, "user name")
        # Acting as another user (an authorization identity) is not something
        # the upstream login can express, so only "none" or "myself" is taken.
        if authzid and authzid != authcid:
            raise SaslFailure("authorization identity not supported")
        return Credentials(username, _text(password, "password"))


class LoginExchange:
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""

    name = "LOGIN"
    first_challenge = b"Username:"

    def __init__(self) -> None:
        self._username: str | None = None

    def step(self, response: bytes) -> bytes | Credentials:
        if self._username is None:
            self._username = _text(response, "user name")
            return b"Password:"
        return Credentials(self._username, _text(response, "password"))


SaslExchange = PlainExchange | LoginExchange


def start_exchange(mechanism: str) -> SaslExchange:
    if mechanism == "PLAIN":
        return PlainExchange()
    if mechanism == "LOGIN":
        return LoginExchange()
    raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
