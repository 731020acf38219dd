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

_SPACES = re.compile(rb"[ \t]+")
_ODD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff?]+")
_VALID_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_X_UIDL = re.compile(rb"x-uidl", re.IGNORECASE)


def header_lines(data: bytes) -> list[bytes]:
    """The header's lines (without line ends): up to the first empty line, or a line of CRs
    only, or the end of `data` (no end-of-header line, or a header only)."""
    lines: list[bytes] = []
    # CR CR LF ends the header for some servers and not for others: stop there for all.
    for line in re.split(rb"\r*\n|\r(?!\n|\r)", data[:MAX_HEADER_BYTES]):
        if not line.strip(b"\r"):
            break
        lines.append(line.rstrip(b"\r"))
    return lines


def header_fields(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(lower-case name, raw unfolded value) of each field; lines that are no field (no
    colon, or an invalid name) and continuation lines of only whitespace are left out."""
    name: bytes | None = None
    value: list[bytes] = []
    for line in header_lines(data):
        if line[:1] in (b" ", b"\t"):
            if name is not None and line.strip(b" \t"):
                value.append(line)
            continue
        if name is not None:
            yield name, b"".join(value)
        head, colon, rest = line.partition(b":")
        head = head.rstrip(b" \t")
        if colon and _VALID_NAME.fullmatch(head) is not None:
            name, value = head.lower(), [rest]
        else:
            name, value = None, []
    if name is not None:
        yield name, b"".join(value)


def header_digest(data: bytes, skipped: Iterable[str] = SKIPPED_FIELDS) -> bytes:
    """SHA-256 of the header reduced as the module says (32 bytes)."""
    skip = {name.lower().encode("ascii") for name in skipped}
    digest = hashlib.sha256()
    for name, value in header_fields(data):
        if name in skip:
            continue
        value = _ODD.sub(b"?", _SPACES.sub(b"", value))
        digest.update(name + b":" + value + b"\n")
    return digest.digest()


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
