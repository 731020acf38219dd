"""The state record format: one small RFC 5322 message per device, a JSON body.

Only the pure parts (rendering and parsing); storing, merging and concurrency are proven
against a real Dovecot in tests/integration/test_policy_state.py.
"""

from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime

import pytest

from bridge.device_state import STATE_FORMAT, STATE_HEADER, parse_state, render_state
from bridge.uid_ranges import UidRanges

MOMENT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def render(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "device": "phone",
        "mailbox": "INBOX",
        "uidvalidity": 1700000000,
        "hidden": UidRanges.parse("1:500,502"),
        "now": MOMENT,
    }
    args.update(overrides)
    return render_state(**args)  # type: ignore[arg-type]


def body_of(record: bytes) -> bytes:
    return record.split(b"\r\n\r\n", 1)[1]


def test_record_is_a_plain_ascii_message_with_crlf_lines() -> None:
    record = render()
    record.decode("ascii")
    assert record.endswith(b"\r\n")
    assert b"\n" not in record.replace(b"\r\n", b"")
    message = email.message_from_bytes(record, policy=email.policy.default)
    assert message[STATE_HEADER] == "phone"
    assert message["Subject"] == "POP3 device state: phone"
    assert message.get_content_type() == "application/json"
    assert message.get_content_charset() == "us-ascii"
    assert message["Message-ID"]
    assert message["Date"]


def test_body_holds_the_documented_fields() -> None:
    data = json.loads(body_of(render()))
    assert data == {
        "format": STATE_FORMAT,
        "device": "phone",
        "mailbox": "INBOX",
        "uidvalidity": 1700000000,
        "hidden": "1:500,502",
        "last_seen": "2025-03-04T05:06:07+00:00",
    }


def test_parse_reads_back_what_render_wrote() -> None:
    data = parse_state(body_of(render(device="laptop", hidden=UidRanges.of(range(1, 1001)))))
    assert data is not None
    assert data["device"] == "laptop"
    assert UidRanges.parse(str(data["hidden"])) == UidRanges([(1, 1000)])
    assert datetime.fromisoformat(str(data["last_seen"])) == MOMENT


def test_non_ascii_folder_names_stay_ascii_on_the_wire() -> None:
    record = render(mailbox="Entwürfe/Posteingang")
    record.decode("ascii")
    data = parse_state(body_of(record))
    assert data is not None and data["mailbox"] == "Entwürfe/Posteingang"


def test_each_version_is_a_distinct_message() -> None:
    # Two versions written in the same instant must not look like duplicates to a server
    # or client that deduplicates by Message-ID.
    first = email.message_from_bytes(render())
    second = email.message_from_bytes(render())
    assert first["Message-ID"] != second["Message-ID"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"format": 2, "device": "phone"}',
        b'{"device": "phone"}',
        "{\"format\": 1, \"device\": \"t\u00e9l\u00e9\"}".encode(),
        b"\xff\xfe",
    ],
)
def test_unreadable_or_foreign_bodies_are_ignored(body: bytes) -> None:
    assert parse_state(body) is None
