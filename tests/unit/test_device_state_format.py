"""The state record format: one small RFC 5322 message per device, a signed JSON body.

Only the pure parts (rendering, signing, reading and every reason a record is not trusted);
storing, merging and concurrency are proven against a real Dovecot in
tests/integration/test_policy_state.py and test_policy_state_trust.py.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from bridge.policy.device_state import (
    MAX_RANGES_PER_RECORD,
    MAX_RECORD_TEXT,
    STATE_FORMAT,
    STATE_HEADER,
    RecordIgnored,
    StateSigner,
    read_record,
    render_state,
    render_versions,
)
from bridge.policy.uid_ranges import UidRanges

MOMENT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
KEY = b"unit-test state key, 32 bytes or more"
ALICE = StateSigner(KEY, "alice@example.com")


def render(signer: StateSigner = ALICE, **overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "device": "phone",
        "mailbox": "INBOX",
        "uidvalidity": 1700000000,
        "hidden": UidRanges.parse("1:500,502"),
        "now": MOMENT,
    }
    args.update(overrides)
    return render_state(signer, **args)


def body_of(record: bytes) -> bytes:
    return record.split(b"\r\n\r\n", 1)[1]


def fields_of(record: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body_of(record))
    return data


def encode(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\r\n"


def reason(text: bytes, signer: StateSigner = ALICE) -> str:
    with pytest.raises(RecordIgnored) as caught:
        read_record(text, signer)
    return caught.value.reason


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


def test_body_holds_the_documented_fields_and_their_mac() -> None:
    data = fields_of(render())
    mac = data.pop("mac")
    assert data == {
        "format": STATE_FORMAT,
        "device": "phone",
        "mailbox": "INBOX",
        "uidvalidity": 1700000000,
        "hidden": "1:500,502",
        "last_seen": "2025-03-04T05:06:07+00:00",
    }
    # The documented canonical encoding: HMAC-SHA256 under the server key over a JSON array
    # of a fixed label, the format, the account (lower-cased), the maildrop folder,
    # UIDVALIDITY, the device, both UID sets and last_seen.
    signed = json.dumps(
        ["pop3-imap-bridge device state", 1, "alice@example.com", "INBOX", 1700000000, "phone", "1:500,502", "",
         "2025-03-04T05:06:07+00:00"],
        separators=(",", ":"),
    ).encode()
    assert mac == hmac.new(KEY, signed, hashlib.sha256).hexdigest()


def test_read_returns_what_render_wrote() -> None:
    record = read_record(body_of(render(device="laptop", hidden=UidRanges.of(range(1, 1001)))), ALICE)
    assert (record.device, record.mailbox, record.uidvalidity) == ("laptop", "INBOX", 1700000000)
    assert record.hidden == UidRanges([(1, 1000)])
    assert record.hidden_unsigned == UidRanges()
    assert record.last_seen == MOMENT
    assert record.signed


def test_the_account_is_compared_case_insensitively() -> None:
    record = body_of(render())
    assert read_record(record, StateSigner(KEY, "Alice@Example.COM")).hidden == UidRanges.parse("1:500,502")


def test_a_record_signed_for_another_account_is_not_trusted() -> None:
    # A tenant copying its own, validly signed record into a victim's state folder.
    bobs = body_of(render(StateSigner(KEY, "bob@example.com"), hidden=UidRanges.parse("1:4294967295")))
    assert reason(bobs) == "bad_mac"


def test_a_record_signed_with_another_key_is_not_trusted() -> None:
    other = body_of(render(StateSigner(b"another key, also 32 bytes or more!", "alice@example.com")))
    assert reason(other) == "bad_mac"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", "laptop"),
        ("mailbox", "Archive"),
        ("uidvalidity", 1700000001),
        ("hidden", "1:4294967295"),
        ("hidden_unsigned", "1:4294967295"),
        ("last_seen", "2099-03-04T05:06:07+00:00"),
    ],
)
def test_changing_any_signed_field_breaks_the_mac(field: str, value: object) -> None:
    data = fields_of(render())
    data[field] = value
    assert reason(encode(data)) == "bad_mac"


def test_unsigned_records_are_ignored_unless_accepted_for_migration() -> None:
    data = fields_of(render())
    del data["mac"]
    assert reason(encode(data)) == "unsigned"
    migrating = StateSigner(KEY, "alice@example.com", accept_unsigned=True)
    record = read_record(encode(data), migrating)
    # Read, but what it hides never counts for expiry: it is kept apart.
    assert not record.signed
    assert record.hidden == UidRanges()
    assert record.hidden_unsigned == UidRanges.parse("1:500,502")
    # A wrong MAC is not "unsigned": migration never accepts it.
    data["mac"] = "0" * 64
    assert reason(encode(data), migrating) == "bad_mac"


def test_hidden_unsigned_is_signed_and_read_back() -> None:
    body = body_of(render(hidden=UidRanges.of([1]), hidden_unsigned=UidRanges.parse("2:9")))
    assert fields_of(b"\r\n\r\n" + body)["hidden_unsigned"] == "2:9"
    record = read_record(body, ALICE)
    assert (str(record.hidden), str(record.hidden_unsigned)) == ("1", "2:9")


def _signed(**changes: Any) -> bytes:
    """A record with `changes` applied to its fields and a valid MAC over them."""
    data = fields_of(render())
    data.update(changes)
    data["mac"] = ALICE.mac(data)
    return encode(data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"", "not_json"),
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[" * 30000 + b"]" * 30000, "not_json"),  # RecursionError in the parser
        (b'{"a":' * 10000 + b"1" + b"}" * 10000, "not_json"),
        (b'{"uidvalidity": 1' + b"0" * 5000 + b"}", "not_json"),  # int() digit limit
        (b"[1, 2]", "bad_format"),
        (b'{"format": 2, "device": "phone"}', "bad_format"),
        (b'{"device": "phone"}', "bad_format"),
        ("{\"format\": 1, \"device\": \"t\u00e9l\u00e9\"}".encode(), "not_json"),
        (b" " * MAX_RECORD_TEXT, "too_large"),
    ],
)
def test_unreadable_or_foreign_bodies_are_ignored(text: bytes, expected: str) -> None:
    assert reason(text) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"format": True},
        {"format": 1.0},
        {"device": "phone\n"},
        {"device": "my phone"},
        {"device": 7},
        {"mailbox": ["INBOX"]},
        {"uidvalidity": "1700000000"},
        {"uidvalidity": True},
        {"uidvalidity": 0},
        {"uidvalidity": 2**32},
        {"hidden": 5},
        {"hidden_unsigned": None},
        {"last_seen": 0},
        {"mac": 5},
    ],
)
def test_fields_of_the_wrong_type_or_shape_are_refused(changes: dict[str, Any]) -> None:
    data = fields_of(render())
    data.update(changes)
    assert reason(encode(data)) == "bad_format"


@pytest.mark.parametrize("mac", ["", "0" * 64, "ABCDEF" * 10 + "abcd", "\u00e9" * 64])
def test_a_wrong_mac_is_refused(mac: str) -> None:
    data = fields_of(render())
    data["mac"] = mac
    assert reason(encode(data)) == "bad_mac"


def test_bounds_apply_to_signed_records_too() -> None:
    too_many = ",".join(str(uid) for uid in range(1, 2 * MAX_RANGES_PER_RECORD + 2, 2))
    assert reason(_signed(hidden=too_many)) == "too_many_ranges"
    assert reason(_signed(hidden_unsigned=too_many)) == "too_many_ranges"
    assert reason(_signed(hidden="1:4294967296")) == "bad_ranges"
    assert reason(_signed(hidden="5:3")) == "bad_ranges"
    assert reason(_signed(hidden="1,,2")) == "bad_ranges"
    assert reason(_signed(last_seen="2025-03-04T05:06:07")) == "bad_timestamp"  # naive
    assert reason(_signed(last_seen="yesterday")) == "bad_timestamp"
    # Within the bounds: read.
    at_limit = ",".join(str(uid) for uid in range(1, 2 * MAX_RANGES_PER_RECORD, 2))
    assert read_record(_signed(hidden=at_limit), ALICE).hidden.range_count == MAX_RANGES_PER_RECORD


def test_timestamps_in_any_zone_are_read_as_aware() -> None:
    record = read_record(_signed(last_seen="2025-03-04T07:06:07+02:00"), ALICE)
    assert record.last_seen == MOMENT
    assert record.last_seen.utcoffset() == timedelta(hours=2)
    assert record.last_seen.tzinfo == timezone(timedelta(hours=2))


def test_non_ascii_folder_names_stay_ascii_on_the_wire() -> None:
    record = render(mailbox="Entwürfe/Posteingang")
    record.decode("ascii")
    assert read_record(body_of(record), ALICE).mailbox == "Entwürfe/Posteingang"


def test_each_version_is_a_distinct_message() -> None:
    # Two versions written in the same instant must not look like duplicates to a server
    # or client that deduplicates by Message-ID.
    first = email.message_from_bytes(render())
    second = email.message_from_bytes(render())
    assert first["Message-ID"] != second["Message-ID"]


def test_a_state_too_big_for_one_record_is_written_as_several() -> None:
    # Every other UID of 60,000 messages: far more than one record may hold. Each part is a
    # complete record within the bounds; their union is the whole state.
    hidden = UidRanges.of(range(1, 60001, 2))
    unsigned = UidRanges.of(range(100000, 130000, 3))
    parts = render_versions(ALICE, "phone", "INBOX", 1700000000, hidden, unsigned, MOMENT)
    assert len(parts) > 2
    records = [read_record(body_of(part), ALICE) for part in parts]
    for part in parts:
        assert len(body_of(part)) < MAX_RECORD_TEXT
    assert UidRanges().union(*(r.hidden for r in records)) == hidden
    assert UidRanges().union(*(r.hidden_unsigned for r in records)) == unsigned
    assert all(r.last_seen == MOMENT and r.device == "phone" for r in records)
    # A small state stays one record; an empty one too.
    assert len(render_versions(ALICE, "phone", "INBOX", 1, UidRanges.parse("1:9"), UidRanges(), MOMENT)) == 1
    [empty] = render_versions(ALICE, "phone", "INBOX", 1, UidRanges(), UidRanges(), MOMENT)
    assert read_record(body_of(empty), ALICE).hidden == UidRanges()
