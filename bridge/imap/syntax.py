"""IMAP syntax the bridge writes and reads (RFC 3501), independent of any engine: strings and
folder names as commands need them, UID sets, and what the answers to our own commands
carry (over `bridge.imap.wire.Response`, which every engine produces)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator, Sequence

from bridge.imap.wire import Response

_QUOTED_SPECIALS = re.compile(r'(["\\])')
_RESPONSE_CODE = re.compile(rb"^\[([A-Z-]+)", re.IGNORECASE)
_CAPABILITY = re.compile(rb"^\* CAPABILITY (.*)$|\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_UID_RANGE = re.compile(rb"(\d+)(?::(\d+))?")

# FETCH items (their values; the names are case-insensitive).
FETCH_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)", re.IGNORECASE)
FETCH_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)", re.IGNORECASE)
# RFC 8474: EMAILID (objectid), 1-255 of A-Z a-z 0-9 _ -.
FETCH_EMAILID = re.compile(rb"\bEMAILID \(([A-Za-z0-9_-]{1,255})\)", re.IGNORECASE)
_APPENDUID = re.compile(rb"\[APPENDUID (\d{1,10}) (\d{1,10})\]", re.IGNORECASE)
_STATUS_ITEMS = re.compile(rb"\(((?:[A-Z-]+ \d{1,20} ?)*)\)\s*$", re.IGNORECASE)
BODY_LITERAL = re.compile(rb"BODY\[[^\]]*\](?:<\d+>)? \{(\d+)\}", re.IGNORECASE)
_BODY_EMPTY = re.compile(rb'BODY\[[^\]]*\](?:<\d+>)? (""|NIL)', re.IGNORECASE)
_LITERAL_MARKER = re.compile(rb"\{\d+\}")
UNTAGGED_NUMBER = re.compile(rb"(\d+) (EXISTS|EXPUNGE|FETCH|RECENT)\b", re.IGNORECASE)


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


def folder_argument(folder: str) -> bytes:
    """A folder name as a command argument: modified UTF-7, quoted."""
    return quote_string(encode_mailbox_name(folder)).encode("ascii")


def format_uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into an IMAP sequence set of ranges: 1:3,7,9:10."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("an IMAP UID set cannot be empty")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)


def chunked_uid_sets(uids: Iterable[int], max_length: int = 2000) -> list[bytes]:
    """Split a UID set so no command line grows past what servers accept (Dovecot: 64 KiB,
    others far less); each piece stays a valid, exact set."""
    text = format_uid_set(uids)
    pieces: list[bytes] = []
    while len(text) > max_length:
        cut = text.rfind(",", 0, max_length)
        pieces.append(text[:cut].encode("ascii"))
        text = text[cut + 1 :]
    pieces.append(text.encode("ascii"))
    return pieces


def uid_set_ranges(uid_set: bytes) -> Iterator[tuple[int, int]]:
    """(low, high) of each item of an IMAP UID set such as b"3:1,7", one at a time (a range
    is never spelt out: `1:4294967295` is one pair)."""
    for match in _UID_RANGE.finditer(uid_set):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        yield min(first, last), max(first, last)


def response_code(text: bytes) -> str | None:
    """The RFC 5530 response code at the start of a status text, e.g. UNAVAILABLE."""
    match = _RESPONSE_CODE.match(text.lstrip())
    return match.group(1).decode("ascii").upper() if match else None


def capabilities_in(text: bytes) -> frozenset[str] | None:
    """Capabilities from an untagged `* CAPABILITY ...` or a `[CAPABILITY ...]` response code."""
    match = _CAPABILITY.search(text)
    if match is None:
        return None
    found = match.group(1) if match.group(1) is not None else match.group(2)
    return frozenset(found.decode("ascii", "replace").upper().split())


def body_literal_index(text: bytes) -> int | None:
    """Which of a FETCH response's literals holds its BODY[...] section (a FETCH may carry
    other literals before it), or None."""
    match = BODY_LITERAL.search(text)
    if match is None:
        return None
    return len(_LITERAL_MARKER.findall(text, 0, match.start()))


def body_section(responses: Sequence[Response], uid: int) -> bytes | None:
    """The BODY[...] data for `uid` out of a UID FETCH's untagged responses, skipping
    unsolicited FETCH responses of other messages mixed in; None if there is none."""
    for response in responses:
        text = response.text
        if UNTAGGED_NUMBER.match(text, 2) is None:
            continue
        found_uid = FETCH_UID.search(text)
        if found_uid is not None and int(found_uid.group(1)) != uid:
            continue
        index = body_literal_index(text)
        if index is not None and index < len(response.literals):
            return response.literals[index]
        empty = _BODY_EMPTY.search(text)
        if empty is not None:
            return b"" if empty.group(1) == b'""' else None
    return None


def bodies_by_uid(responses: Iterable[Response]) -> Iterator[tuple[int, bytes]]:
    """(uid, BODY[...] data) of every FETCH response that carries both."""
    for response in responses:
        text = response.text
        uid = FETCH_UID.search(text)
        index = body_literal_index(text)
        if uid is not None and index is not None and index < len(response.literals):
            yield int(uid.group(1)), response.literals[index]


def search_results(responses: Iterable[Response]) -> list[int]:
    """UIDs from the `* SEARCH n n ...` responses of a UID SEARCH."""
    found: list[int] = []
    for response in responses:
        if response.text[2:9].upper() == b"SEARCH ":
            found.extend(int(token) for token in response.text[9:].split() if token.isdigit())
    return found


def appended_uid(status_text: bytes) -> tuple[int, int] | None:
    """(UIDVALIDITY, UID) from an APPEND's `[APPENDUID v u]` (RFC 4315), or None."""
    match = _APPENDUID.search(status_text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def status_items(responses: Iterable[Response]) -> dict[str, int]:
    """The items of a `* STATUS folder (NAME n ...)` answer, names upper-cased."""
    for response in responses:
        if response.text[2:9].upper() != b"STATUS ":
            continue
        match = _STATUS_ITEMS.search(response.text)
        if match is not None:
            words = match.group(1).split()
            return {words[i].decode("ascii").upper(): int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
    return {}


def emailids_by_uid(responses: Iterable[Response]) -> Iterator[tuple[int, str]]:
    """(uid, EMAILID) of every FETCH response that carries both."""
    for response in responses:
        uid = FETCH_UID.search(response.text)
        emailid = FETCH_EMAILID.search(response.text)
        if uid is not None and emailid is not None:
            yield int(uid.group(1)), emailid.group(1).decode("ascii")
