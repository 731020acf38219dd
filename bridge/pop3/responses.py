"""Formatting of POP3 status lines and multi-line responses.

Status texts are always written by us.  They are still checked, because a
stray CR or LF in one would end the line early and the client would read the
rest as a second response; a check that raises turns that into a loud bug
instead of a desynchronised session.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable

__all__ = ["CRLF", "ResponseCode", "continuation", "err", "multiline", "ok"]

CRLF = b"\r\n"


class ResponseCode(enum.Enum):
    """Extended response codes (RFC 2449 section 8, RFC 3206)."""

    AUTH = "AUTH"  # RFC 3206: the credentials were wrong, retrying as-is won't help
    SYS_TEMP = "SYS/TEMP"  # RFC 3206: our side failed, trying later may work
    SYS_PERM = "SYS/PERM"  # RFC 3206: our side failed, no point retrying
    IN_USE = "IN-USE"  # RFC 2449: the maildrop is locked by another session
    LOGIN_DELAY = "LOGIN-DELAY"  # RFC 2449: logged in too recently


def _encode(text: str) -> bytes:
    if not text.isascii() or not text.isprintable():
        raise ValueError("response text must be printable ASCII on one line")
    return text.encode("ascii")


def ok(text: str = "") -> bytes:
    """``+OK text`` with its CRLF (``+OK`` alone when text is empty)."""
    return b"+OK " + _encode(text) + CRLF if text else b"+OK" + CRLF


def err(text: str, code: ResponseCode | None = None) -> bytes:
    """``-ERR [CODE] text`` with its CRLF."""
    line = b"-ERR [" + code.value.encode("ascii") + b"]" if code else b"-ERR"
    return line + b" " + _encode(text) + CRLF if text else line + CRLF


def continuation(challenge: bytes = b"") -> bytes:
    """A SASL server challenge (RFC 5034 section 4): ``+`` SP base64 CRLF."""
    return b"+ " + base64.b64encode(challenge) + CRLF


def multiline(text: str, lines: Iterable[str]) -> bytes:
    """``+OK text``, one line per item, then the terminating ``.`` line."""
    items = list(lines)
    if not items:
        return ok(text) + b"." + CRLF
    # Checked and encoded as one string, not line by line: a 5,000-message LIST or UIDL
    # is built on every poll.
    body = "\n".join(items)
    if body.count("\n") != len(items) - 1:
        raise ValueError("a listing line must not contain a line break")
    if not body.isascii() or not body.replace("\n", " ").isprintable():
        raise ValueError("response text must be printable ASCII on one line")
    data = body.encode("ascii")
    # Listing lines follow the same byte-stuffing rule as message bodies.
    data = data.replace(b"\n.", b"\n..")
    if data[:1] == b".":
        data = b"." + data
    return ok(text) + data.replace(b"\n", CRLF) + CRLF + b"." + CRLF


