"""UIDL records: what the bridge keeps about a maildrop's UIDLs in the state folder (pure).

Like the per-device state (bridge.policy.device_state), each record is a small message in
`delete.state_folder`, a header `X-Pop3-Bridge-Uidl: <kind>` and a JSON body, signed with an
HMAC-SHA256 under `delete.state_key` over everything it claims and the account, and read as
hostile input: at most MAX_RECORD_TEXT bytes, a bounded number of entries, every UID, size,
UIDL and EMAILID checked, and trusted only with a valid MAC. Two kinds:

- `uidls`, a UIDL table: the UIDL each message of one maildrop (mailbox + UIDVALIDITY) is
  served with instead of the configured format, in the order the maildrop shows them.
  Written by `uidl import` (the old server's UIDLs and order) and after a UIDVALIDITY change
  (the UIDLs the messages had, with their old UIDs, so device state follows them). A table
  too big for one record is several parts of one `version`; the newest complete version
  wins, so a half-written one is never used.
- `facts`: what the bridge learnt of messages it listed, new UIDs only: size, a header
  digest (bridge.uidl.headers), the EMAILID where the server has one, and the X-UIDL value
  where there is one. `through`: every message of the maildrop up to that UID was looked at.
  Facts never change, so records are merged by union, whoever wrote them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from bridge.config import account_key
from bridge.policy.device_state import MAX_RECORD_TEXT, signed_by
from bridge.policy.uid_ranges import MAX_UID
from bridge.uidl.formats import is_valid_uidl
from bridge.uidl.headers import FINGERPRINT_BYTES

RECORD_HEADER = "X-Pop3-Bridge-Uidl"
RECORD_FORMAT = 1
# Entries one record may hold (what the bridge writes stays well below).
MAX_ENTRIES_PER_RECORD = 20_000
# Parts one table version may have (a 2,000,000-message maildrop needs about 1,000).
MAX_PARTS = 4096
_MAC_LABEL = "pop3-imap-bridge uidl record"
_EMAILID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_VERSION = re.compile(r"[0-9A-Za-z.:+_-]{1,64}")
_DIGEST_TEXT = len(base64.b64encode(b"\0" * FINGERPRINT_BYTES))
_MAX_SIZE = 1 << 62
# Room left in a record's body for everything but the entries.
_BODY_OVERHEAD = 2048


class RecordIgnored(Exception):
    """A record the bridge does not use; `reason` is a stable name for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RecordSigner:
    """Signs and checks one account's UIDL records with the server key. Its label differs
    from the device state's, so no record of one kind ever passes for the other."""

    key: bytes
    account: str

    def mac(self, fields: Mapping[str, Any]) -> str:
        claims = {name: value for name, value in fields.items() if name != "mac"}
        signed = json.dumps(
            [_MAC_LABEL, account_key(self.account), claims], ensure_ascii=True, separators=(",", ":"), sort_keys=True
        )
        return hmac.new(self.key, signed.encode("ascii"), hashlib.sha256).hexdigest()

    def verify(self, fields: Mapping[str, Any]) -> bool:
        return signed_by(fields, self.mac)


@dataclass(frozen=True, slots=True)
class Fact:
    """What the bridge learnt of one message: RFC822.SIZE, the header digest
    (FINGERPRINT_BYTES of it), the EMAILID (None: the server has none) and the X-UIDL value
    as a UIDL (bridge.uidl.formats.foreign_uidl; None: no such field)."""

    uid: int
    size: int
    digest: bytes
    emailid: str | None = None
    x_uidl: str | None = None


@dataclass(frozen=True)
class TableRecord:
    mailbox: str
    uidvalidity: int
    version: str
    part: int
    parts: int
    origin: str  # "import" or "rematch"
    # (uid, uidl, the message's UID before the UIDVALIDITY change or None), in maildrop order.
    entries: tuple[tuple[int, str, int | None], ...]
    from_uidvalidity: int | None
    written: datetime


@dataclass(frozen=True)
class FactsRecord:
    mailbox: str
    uidvalidity: int
    through: int
    facts: tuple[Fact, ...]
    written: datetime


Record = TableRecord | FactsRecord


def _is_uid(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_UID


def _common(data: Any) -> tuple[str, int, datetime]:
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or type(data.get("format")) is not int:
        raise RecordIgnored("bad_format")
    mailbox, uidvalidity, written = data.get("mailbox"), data.get("uidvalidity"), data.get("written")
    if not (isinstance(mailbox, str) and _is_uid(uidvalidity) and isinstance(written, str)):
        raise RecordIgnored("bad_format")
    try:
        moment = datetime.fromisoformat(written)
    except ValueError:
        raise RecordIgnored("bad_timestamp") from None
    if moment.utcoffset() is None:
        raise RecordIgnored("bad_timestamp")
    return mailbox, uidvalidity, moment


def read_record(text: bytes, signer: RecordSigner) -> Record:
    """A record's text (its BODY[TEXT]) as trusted, or RecordIgnored with the reason."""
    if len(text) >= MAX_RECORD_TEXT:
        raise RecordIgnored("too_large")
    try:
        data = json.loads(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordIgnored("not_json") from None
    mailbox, uidvalidity, written = _common(data)
    if "mac" not in data:
        raise RecordIgnored("unsigned")
    if not signer.verify(data):
        raise RecordIgnored("bad_mac")
    entries = data.get("entries")
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES_PER_RECORD:
        raise RecordIgnored("bad_entries")
    kind = data.get("kind")
    if kind == "uidls":
        return _table(data, mailbox, uidvalidity, written, entries)
    if kind == "facts":
        return _facts(data, mailbox, uidvalidity, written, entries)
    raise RecordIgnored("bad_format")


def _table(data: dict[str, Any], mailbox: str, uidvalidity: int, written: datetime, entries: list[Any]) -> TableRecord:
    version, part, parts, origin = data.get("version"), data.get("part"), data.get("parts"), data.get("origin")
    source = data.get("from_uidvalidity")
    shaped = (
        isinstance(version, str) and _VERSION.fullmatch(version) is not None
        and type(part) is int and type(parts) is int and 1 <= part <= parts <= MAX_PARTS
        and origin in ("import", "rematch")
        and (source is None or _is_uid(source))
    )
    if not shaped:
        raise RecordIgnored("bad_format")
    checked: list[tuple[int, str, int | None]] = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) in (2, 3) and _is_uid(entry[0])):
            raise RecordIgnored("bad_entries")
        if not (isinstance(entry[1], str) and is_valid_uidl(entry[1])):
            raise RecordIgnored("bad_entries")
        if len(entry) == 3 and not _is_uid(entry[2]):
            raise RecordIgnored("bad_entries")
        checked.append((entry[0], entry[1], entry[2] if len(entry) == 3 else None))
    return TableRecord(mailbox, uidvalidity, version, part, parts, origin, tuple(checked), source, written)


def _facts(data: dict[str, Any], mailbox: str, uidvalidity: int, written: datetime, entries: list[Any]) -> FactsRecord:
    through = data.get("through")
    if not _is_uid(through):
        raise RecordIgnored("bad_format")
    facts: list[Fact] = []
    for entry in entries:
        if not (isinstance(entry, list) and 3 <= len(entry) <= 5 and _is_uid(entry[0])):
            raise RecordIgnored("bad_entries")
        size, digest = entry[1], entry[2]
        if not (type(size) is int and 0 <= size <= _MAX_SIZE and isinstance(digest, str) and len(digest) == _DIGEST_TEXT):
            raise RecordIgnored("bad_entries")
        try:
            raw = base64.b64decode(digest, validate=True)
        except (binascii.Error, ValueError):
            raise RecordIgnored("bad_entries") from None
        emailid = entry[3] if len(entry) >= 4 else None
        if emailid is not None and not (isinstance(emailid, str) and _EMAILID.fullmatch(emailid)):
            raise RecordIgnored("bad_entries")
        x_uidl = entry[4] if len(entry) == 5 else None
        if x_uidl is not None and not (isinstance(x_uidl, str) and is_valid_uidl(x_uidl)):
            raise RecordIgnored("bad_entries")
        facts.append(Fact(entry[0], size, raw, emailid, x_uidl))
    return FactsRecord(mailbox, uidvalidity, through, tuple(facts), written)


def _fact_row(fact: Fact) -> list[Any]:
    row: list[Any] = [fact.uid, fact.size, base64.b64encode(fact.digest[:FINGERPRINT_BYTES]).decode("ascii")]
    if fact.emailid is not None or fact.x_uidl is not None:
        row.append(fact.emailid)
    if fact.x_uidl is not None:
        row.append(fact.x_uidl)
    return row


def _message(signer: RecordSigner, kind: str, fields: dict[str, Any], now: datetime) -> bytes:
    fields["mac"] = signer.mac(fields)
    body = json.dumps(fields, separators=(",", ":"), ensure_ascii=True) + "\r\n"
    if len(body) >= MAX_RECORD_TEXT:
        raise ValueError(f"a UIDL record of {len(body)} bytes could not be read back")
    headers = [
        "From: pop3-imap-bridge <postmaster@localhost>",
        f"Subject: POP3 bridge UIDL record ({kind})",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{secrets.token_hex(12)}@pop3-imap-bridge>",
        f"{RECORD_HEADER}: {kind}",
        "MIME-Version: 1.0",
        "Content-Type: application/json; charset=us-ascii",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("ascii")


def _chunks(entries: Sequence[list[Any]], budget: int) -> Iterator[list[list[Any]]]:
    """Runs of entries whose JSON fits in `budget` characters (at least one run)."""
    chunk: list[list[Any]] = []
    used = 0
    for entry in entries:
        size = len(json.dumps(entry, separators=(",", ":"))) + 1
        if chunk and (used + size > budget or len(chunk) >= MAX_ENTRIES_PER_RECORD):
            yield chunk
            chunk, used = [], 0
        chunk.append(entry)
        used += size
    yield chunk


def _budget(mailbox: str) -> int:
    budget = MAX_RECORD_TEXT - _BODY_OVERHEAD - len(json.dumps(mailbox))
    if budget < 4096:
        raise ValueError("the maildrop folder name leaves no room in a UIDL record")
    return budget


def new_version(now: datetime) -> str:
    """A table version: the time first (newer versions sort higher), then a random part."""
    return f"{now.strftime('%Y%m%dT%H%M%S.%f')}-{secrets.token_hex(4)}"


def render_table(
    signer: RecordSigner, mailbox: str, uidvalidity: int, entries: Sequence[tuple[int, str, int | None]],
    origin: str, now: datetime, from_uidvalidity: int | None = None,
) -> list[bytes]:
    """The records (parts of one new version) that hold a UIDL table."""
    rows = [[uid, uidl] if old is None else [uid, uidl, old] for uid, uidl, old in entries]
    chunks = list(_chunks(rows, _budget(mailbox)))
    version = new_version(now)
    messages = []
    for number, chunk in enumerate(chunks, 1):
        fields: dict[str, Any] = {
            "format": RECORD_FORMAT, "kind": "uidls", "mailbox": mailbox, "uidvalidity": uidvalidity,
            "version": version, "part": number, "parts": len(chunks), "origin": origin,
            "written": now.isoformat(), "entries": chunk,
        }
        if from_uidvalidity is not None:
            fields["from_uidvalidity"] = from_uidvalidity
        messages.append(_message(signer, "uidls", fields, now))
    return messages


def split_facts(mailbox: str, facts: Sequence[Fact]) -> list[list[Fact]]:
    """Facts in runs that each fit one record (at least one run, maybe empty)."""
    ordered = sorted(facts, key=lambda fact: fact.uid)
    rows = [_fact_row(fact) for fact in ordered]
    runs: list[list[Fact]] = []
    taken = 0
    for chunk in _chunks(rows, _budget(mailbox)):
        runs.append(ordered[taken : taken + len(chunk)])
        taken += len(chunk)
    return runs


def render_facts(
    signer: RecordSigner, mailbox: str, uidvalidity: int, facts: Sequence[Fact], through: int, now: datetime
) -> bytes:
    """One record of facts (split_facts says how many fit), saying `through`."""
    fields: dict[str, Any] = {
        "format": RECORD_FORMAT, "kind": "facts", "mailbox": mailbox, "uidvalidity": uidvalidity,
        "through": through, "written": now.isoformat(),
        "entries": [_fact_row(fact) for fact in sorted(facts, key=lambda fact: fact.uid)],
    }
    return _message(signer, "facts", fields, now)
