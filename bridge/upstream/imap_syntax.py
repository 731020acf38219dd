"""IMAP wire syntax we write and read, independent of any client library (RFC 3501)."""

from __future__ import annotations

import base64
import re

_QUOTED_SPECIALS = re.compile(r'(["\\])')


def quote_string(text: str) -> str:
    """An IMAP quoted string. CR, LF and NUL cannot be quoted (nor sent in a literal-free line)."""
    if any(ch in text for ch in "\r\n\0"):
        raise ValueError("CR, LF and NUL cannot appear in an IMAP quoted string")
    return '"' + _QUOTED_SPECIALS.sub(r"\\\1", text) + '"'


def encode_mailbox_name(name: str) -> str:
    """Modified UTF-7 (RFC 3501 section 5.1.3), so non-ASCII folder names work on any server."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_EXISTS = re.compile(rb"^(\d+) EXISTS\b", re.IGNORECASE)
_CAPABILITY = re.compile(rb"^CAPABILITY (.*)$|\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_RESPONSE_CODE = re.compile(rb"^\[([A-Z-]+)", re.IGNORECASE)
_FETCH_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)", re.IGNORECASE)
_FETCH_START = re.compile(rb"^\d+ FETCH \(", re.IGNORECASE)
_BODY_LITERAL = re.compile(rb"BODY\[\]<\d+> \{(\d+)\}$", re.IGNORECASE)
_BODY_EMPTY = re.compile(rb'BODY\[\]<\d+> (""|NIL)', re.IGNORECASE)


def find_uidvalidity(lines: list[bytes]) -> int | None:
    for line in lines:
        match = _UIDVALIDITY.search(line)
        if match:
            return int(match.group(1))
    return None


def find_exists(lines: list[bytes]) -> int | None:
    for line in lines:
        match = _EXISTS.match(line)
        if match:
            return int(match.group(1))
    return None


def find_capabilities(lines: list[bytes]) -> frozenset[str] | None:
    """Capabilities from an untagged CAPABILITY response (without its "* ") or a
    `[CAPABILITY ...]` response code, if the server sent either."""
    for line in lines:
        match = _CAPABILITY.search(line)
        if match:
            text = match.group(1) or match.group(2)
            return frozenset(text.decode("ascii", "replace").upper().split())
    return None


def response_code(text: bytes) -> str | None:
    """The RFC 5530 response code at the start of a tagged response text, e.g. UNAVAILABLE."""
    match = _RESPONSE_CODE.match(text.lstrip())
    return match.group(1).decode("ascii").upper() if match else None


def parse_listing_line(line: bytes) -> tuple[int, int, frozenset[str]] | None:
    """(uid, size, flags) from one `n FETCH (UID .. RFC822.SIZE .. FLAGS (..))` line."""
    if not _FETCH_START.match(line):
        return None
    uid = _FETCH_UID.search(line)
    size = _FETCH_SIZE.search(line)
    if uid is None or size is None:
        return None
    flags = _FETCH_FLAGS.search(line)
    flag_set = frozenset(flags.group(1).decode("ascii", "replace").lower().split()) if flags else frozenset()
    return int(uid.group(1)), int(size.group(1)), flag_set


_FETCH_LITERAL = re.compile(rb"\{(\d+)\}$")
_SEARCH = re.compile(rb"^SEARCH\b(.*)$", re.IGNORECASE)


def iter_fetch_literals(lines: list[bytes | bytearray]) -> list[tuple[int | None, bytes, bytes]]:
    """(uid, announcing line, literal data) for every literal in a FETCH response.

    Literals arrive as separate entries right after the line that announced them; the UID may
    stand in that line or in the line after the literal (servers order items freely).
    """
    found: list[tuple[int | None, bytes, bytes]] = []
    current_start: bytes | None = None
    for index, line in enumerate(lines):
        if isinstance(line, bytearray):
            continue
        if _FETCH_START.match(line):
            current_start = line
        literal = _FETCH_LITERAL.search(line)
        if literal is None or index + 1 >= len(lines):
            continue
        data = lines[index + 1]
        if not isinstance(data, bytearray) or len(data) != int(literal.group(1)):
            continue
        tail = lines[index + 2] if index + 2 < len(lines) else b""
        found_uid = (
            _FETCH_UID.search(line)
            or (_FETCH_UID.search(current_start) if current_start else None)
            or (_FETCH_UID.search(tail) if isinstance(tail, bytes) else None)
        )
        found.append((int(found_uid.group(1)) if found_uid else None, line, bytes(data)))
    return found


def extract_body_section(lines: list[bytes | bytearray], uid: int) -> bytes | None:
    """The BODY[]<offset> data for `uid` from a UID FETCH response, or None if absent.

    Other FETCH responses (unsolicited flag updates) may be mixed in; only one carrying BODY[]
    and our UID counts.
    """
    for found_uid, line, data in iter_fetch_literals(lines):
        if _BODY_LITERAL.search(line) and found_uid in (None, uid):
            return data
    for line in lines:
        if isinstance(line, bytearray) or not _FETCH_START.match(line):
            continue
        empty = _BODY_EMPTY.search(line)
        if empty is not None:
            found_uid = _FETCH_UID.search(line)
            if found_uid is None or int(found_uid.group(1)) == uid:
                return b"" if empty.group(1) == b'""' else None
    return None


def parse_search(lines: list[bytes | bytearray]) -> list[int]:
    """UIDs (or numbers) from a SEARCH response: every line but the last (the tagged text),
    each either `SEARCH n n ...` or, as aioimaplib hands them over, just `n n ...`."""
    found: list[int] = []
    for line in lines[:-1]:
        if isinstance(line, bytearray):
            continue
        match = _SEARCH.match(line)
        tokens = (match.group(1) if match else line).split()
        if all(token.isdigit() for token in tokens):
            found.extend(int(token) for token in tokens)
    return found
