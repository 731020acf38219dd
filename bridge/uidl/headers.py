"""A message's header as servers disagree about it, reduced to what they agree on.

The same message read from an old POP3 server (`TOP n 0`) and from the IMAP store it was
copied to (`BODY.PEEK[HEADER]`) differs in ways that say nothing about which message it is:

- fields servers add, rewrite or drop on their own (SKIPPED_FIELDS: mbox status fields,
  Dovecot's, UW's and qpopper's bookkeeping, Return-Path that a delivery or an IMAP server
  adds, Content-Length and Lines);
- line ends (CRLF, LF, a stray CR) and folding: a migration may refold long fields;
- whitespace at the ends of lines (some servers strip it);
- 8-bit and control characters (some servers replace them with `?`);
- an end-of-header line that is missing (a message that is all header) or a header that a
  line of CRs cuts short on one server and not on the other;
- lines that are no field at all (no colon), and fields with invalid names, which some
  servers drop from one view and not the other.

`header_digest` hashes what is left: each field's name (lower case) and its value with all
spaces and tabs taken out (unfolding, refolding and trailing whitespace cannot change it) and
every run of control, 8-bit or `?` characters as one `?`, in the order they come. Received
fields stay in: they tell apart copies of one message delivered twice (a migration that
delivers the messages anew adds one; `uidl import --ignore-header Received` is for that).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

from bridge.imap.limits import HEADER_FETCH_LIMIT

# Field names compared case-insensitively.
SKIPPED_FIELDS = frozenset(
    name.lower()
    for name in (
        "Return-Path",
        "Status",
        "X-Status",
        "X-UID",
        "X-UIDL",
        "X-Keywords",
        "X-IMAP",
        "X-IMAPbase",
        "X-Message-Flag",
        "Content-Length",
        "Lines",
        "X-Yahoo-Newman-Property",
    )
)
# Headers longer than this are judged by their first part (servers have their own limits;
# a hostile one must not make the bridge hold more): as much as is fetched from IMAP.
MAX_HEADER_BYTES = HEADER_FETCH_LIMIT
# The digest kept per message in fingerprints: 12 bytes (96 bits) of SHA-256.
FINGERPRINT_BYTES = 12

_LINE_BREAK = re.compile(rb"\r*\n")
_ODD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff?]+")
_VALID_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_X_UIDL = re.compile(rb"x-uidl", re.IGNORECASE)
_DEFAULT_SKIP = frozenset(name.encode("ascii") for name in SKIPPED_FIELDS)
_CONTROL = bytes(range(0x20)) + b"\x7f?"


def _header_text(data: bytes) -> bytes:
    """The header with LF line ends, up to the first empty line (a line of CRs counts: CR CR
    LF ends the header for some servers and not for others, so it ends it for all), or the
    end of `data` (no end-of-header line, or a message that is all header)."""
    text = data[:MAX_HEADER_BYTES].replace(b"\r\n", b"\n")
    if b"\r\n" in text:  # more than one CR before a line feed
        text = _LINE_BREAK.sub(b"\n", text)
    if text.startswith(b"\n"):
        return b""
    end = text.find(b"\n\n")
    return text[:end] if end >= 0 else text.rstrip(b"\n")


def header_lines(data: bytes) -> list[bytes]:
    """The header's lines as they are (folded ones too), without line ends."""
    text = _header_text(data)
    return text.split(b"\n") if text else []


def header_fields(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(lower-case name, unfolded value) of each field. Lines that are no field (no colon,
    or an invalid name) are left out, with their continuation lines; a continuation line of
    only whitespace adds nothing but whitespace."""
    text = _header_text(data)
    if not text:
        return
    for line in text.replace(b"\n ", b" ").replace(b"\n\t", b"\t").split(b"\n"):
        head, colon, value = line.partition(b":")
        if not colon:
            continue
        name = head.rstrip(b" \t")
        if _VALID_NAME.fullmatch(name) is not None:
            yield name.lower(), value


def header_digest(data: bytes, skipped: Iterable[str] = SKIPPED_FIELDS) -> bytes:
    """SHA-256 of the header reduced as the module says (32 bytes)."""
    skip = _DEFAULT_SKIP if skipped is SKIPPED_FIELDS else {name.lower().encode("ascii") for name in skipped}
    parts: list[bytes] = []
    for name, value in header_fields(data):
        if name in skip:
            continue
        value = value.translate(None, b" \t")
        # Most values are plain ASCII: two C-level checks instead of a regex pass.
        if not value.isascii() or len(value.translate(None, _CONTROL)) != len(value):
            value = _ODD.sub(b"?", value)
        parts.append(name + b":" + value + b"\n")
    return hashlib.sha256(b"".join(parts)).digest()


def header_length(data: bytes) -> int:
    """Octets of the header with CRLF line ends and its end-of-header line, as a server that
    counts sizes in CRLF form would count them: what is left of the size is the body."""
    lines = header_lines(data)
    return sum(len(line) + 2 for line in lines) + 2


def x_uidl(data: bytes) -> bytes | None:
    """The value of the first X-UIDL field (whitespace at its ends taken off), or None."""
    if _X_UIDL.search(data[:MAX_HEADER_BYTES]) is None:
        return None  # the common case, without splitting the header into fields
    for name, value in header_fields(data):
        if name == b"x-uidl":
            stripped = b" ".join(value.split())
            return stripped or None
    return None
