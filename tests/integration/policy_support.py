"""What the delete-policy tests share: POP3 devices polling like real ones, and an IMAP
user's view of the folders (state records included)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.policy.device_state import STATE_HEADER
from bridge.policy.uid_ranges import UidRanges
from sandbox import ImapObserver, Mailbox
from tests.harness import TEST_STATE_KEY, Pop3Client, poplib_payload

# Both IMAP engines (upstream.engine) must implement every policy the same way.
STATE_FOLDER = "POP3 Bridge State"
MOVE_FOLDER = "POP Downloaded"
_SUBJECT = re.compile(rb"^Subject: message (\d+)\r?$", re.MULTILINE)


def message_number(payload: bytes) -> int:
    """The N of a `numbered_messages` message ("Subject: message N")."""
    found = _SUBJECT.search(payload)
    assert found is not None, payload[:200]
    return int(found.group(1))


def poll(port: int, login: str, password: str, *, delete: bool = True) -> list[int]:
    """One poll as a POP3 device makes it: RETR every message, DELE each (unless
    `delete` is false), QUIT. Returns the numbers of the messages downloaded."""
    with Pop3Client(port, login, password) as pop:
        count, _size = pop.stat()
        downloaded = []
        for number in range(1, count + 1):
            _resp, lines, _octets = pop.retr(number)
            downloaded.append(message_number(poplib_payload(lines)))
            if delete:
                pop.dele(number)
        assert pop.quit().startswith(b"+OK")
    return downloaded


def listing(port: int, login: str, password: str) -> list[tuple[int, bytes]]:
    """(message number, UIDL) of every message the device sees, then QUIT without DELE."""
    with Pop3Client(port, login, password) as pop:
        numbers = []
        for line in pop.uidl()[1]:
            _number, uidl = line.split()
            _resp, lines, _octets = pop.top(int(_number), 0)
            numbers.append((message_number(poplib_payload(lines)), uidl))
        assert pop.quit().startswith(b"+OK")
    return numbers


def visible(port: int, login: str, password: str) -> list[int]:
    return [number for number, _uidl in listing(port, login, password)]


def folder_names(box: Mailbox) -> set[str]:
    with ImapObserver(box.host, box.imap_port, box.user, box.password) as observer:
        _typ, data = observer.imap.list()
    names = set()
    for line in data:
        assert isinstance(line, bytes)
        name = line.rsplit(b' "." ', 1)[1].decode()
        names.add(name[1:-1] if name.startswith('"') else name)
    return names


def create_folder(box: Mailbox, name: str) -> None:
    with ImapObserver(box.host, box.imap_port, box.user, box.password) as observer:
        typ, data = observer.imap.create(f'"{name}"')
        assert typ == "OK", data


@dataclass(frozen=True)
class StateRecord:
    uid: int
    header_device: str
    device: str
    mailbox: str
    uidvalidity: int
    hidden: UidRanges
    raw: bytes


def state_records(box: Mailbox, folder: str = STATE_FOLDER) -> list[StateRecord]:
    """Every state record in the state folder, read as any IMAP user could."""
    if folder not in folder_names(box):
        return []
    records = []
    with box.observer(folder) as observer:
        for uid in observer.uids():
            raw = observer.fetch(uid)
            head, _, body = raw.partition(b"\r\n\r\n")
            header = re.search(rb"^" + STATE_HEADER.encode() + rb": (\S+)\r?$", head, re.MULTILINE)
            assert header is not None, head
            data = json.loads(body)
            records.append(
                StateRecord(
                    uid=uid,
                    header_device=header.group(1).decode(),
                    device=data["device"],
                    mailbox=data["mailbox"],
                    uidvalidity=data["uidvalidity"],
                    hidden=UidRanges.parse(data["hidden"]),
                    raw=raw,
                )
            )
    return records


def hidden_for(box: Mailbox, device: str) -> UidRanges:
    """The union of the device's state versions: what the bridge hides from it."""
    return UidRanges().union(*(r.hidden for r in state_records(box) if r.device == device))


def append_dated(box: Mailbox, message: bytes, internal_date: str, folder: str = "INBOX") -> None:
    """APPEND with an explicit internal date (IMAP date-time, e.g. "01-Jan-2020 10:00:00 +0000")."""
    with ImapObserver(box.host, box.imap_port, box.user, box.password) as observer:
        typ, data = observer.imap.append(f'"{folder}"', None, f'"{internal_date}"', message)
        assert typ == "OK", data


# -- state records written by someone else than the bridge ----------------------------------------


def state_message(header_device: str, body: bytes) -> bytes:
    """A message shaped like a state record (the header the bridge searches for), any body."""
    return (
        b"From: someone <someone@example.com>\r\nSubject: POP3 device state\r\n"
        + f"{STATE_HEADER}: {header_device}\r\n".encode()
        + b"Content-Type: application/json\r\n\r\n"
        + body
    )


def state_body(
    device: str, uidvalidity: int, hidden: str, last_seen: datetime | str, *, mailbox: str = "INBOX", **extra: Any
) -> dict[str, Any]:
    """The JSON fields of a record, unsigned."""
    stamp = last_seen if isinstance(last_seen, str) else last_seen.isoformat()
    fields = {"format": 1, "device": device, "mailbox": mailbox, "uidvalidity": uidvalidity, "hidden": hidden}
    return {**fields, **extra, "last_seen": stamp}


def signed(fields: dict[str, Any], account: str, key: str = TEST_STATE_KEY) -> dict[str, Any]:
    """`fields` with the MAC docs/design.md documents, computed here independently of the bridge:
    HMAC-SHA256 under the key over the JSON array [label, format, account lower-cased,
    mailbox, uidvalidity, device, hidden, hidden_unsigned, last_seen]."""
    signed_text = json.dumps(
        [
            "pop3-imap-bridge device state",
            fields["format"],
            account.lower(),
            fields["mailbox"],
            fields["uidvalidity"],
            fields["device"],
            fields["hidden"],
            fields.get("hidden_unsigned", ""),
            fields["last_seen"],
        ],
        separators=(",", ":"),
    ).encode()
    return {**fields, "mac": hmac.new(key.encode(), signed_text, hashlib.sha256).hexdigest()}


def json_body(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\r\n"


def plant_state(box: Mailbox, *messages: bytes) -> list[int]:
    """APPEND messages to the state folder as anyone allowed to write there could."""
    if STATE_FOLDER not in folder_names(box):
        create_folder(box, STATE_FOLDER)
    return box.append(list(messages), mailbox=STATE_FOLDER).uids
