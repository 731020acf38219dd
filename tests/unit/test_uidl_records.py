"""UIDL records as written and as read back: signed for one account, checked as hostile input,
split into parts that each fit, and the newest complete table version in force."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bridge.policy.device_state import StateSigner, render_state
from bridge.policy.uid_ranges import UidRanges
from bridge.uidl.memory import winning_table
from bridge.uidl.records import (
    Fact,
    FactsRecord,
    RecordIgnored,
    RecordSigner,
    TableRecord,
    read_record,
    render_facts,
    render_table,
    split_facts,
)

KEY = b"a state key for these tests, 32+ characters"
NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
SIGNER = RecordSigner(KEY, "alice@example.org")


def body(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def test_a_table_reads_back_as_written() -> None:
    entries = [(5, "1796043377.1", None), (3, "old:2", None), (9, "x" * 70, None)]
    [message] = render_table(SIGNER, "INBOX", 77, entries, "import", NOW)
    assert b"X-Pop3-Bridge-Uidl: uidls\r\n" in message
    record = read_record(body(message), SIGNER)
    assert isinstance(record, TableRecord)
    assert record.entries == tuple(entries) and record.uidvalidity == 77 and record.mailbox == "INBOX"
    assert (record.part, record.parts, record.origin) == (1, 1, "import")


def test_facts_read_back_as_written() -> None:
    facts = [Fact(1, 100, b"\x01" * 12), Fact(2, 200, b"\x02" * 12, "M2bc81fb26c94c64cbbdb152a", "3f1a2b")]
    message = render_facts(SIGNER, "INBOX", 77, facts, 2, NOW)
    record = read_record(body(message), SIGNER)
    assert isinstance(record, FactsRecord)
    assert record.facts == tuple(facts) and record.through == 2


def test_many_facts_are_split_into_records_that_each_fit() -> None:
    facts = [Fact(uid, 1000 + uid, uid.to_bytes(12, "big"), f"M{uid:024x}", f"x-uidl-{uid}") for uid in range(1, 5001)]
    runs = split_facts("INBOX", facts)
    assert len(runs) > 1 and [fact for run in runs for fact in run] == facts
    for run in runs:
        record = read_record(body(render_facts(SIGNER, "INBOX", 77, run, 5000, NOW)), SIGNER)
        assert isinstance(record, FactsRecord) and record.facts == tuple(run)


def test_a_big_table_is_split_into_parts_that_each_fit() -> None:
    entries = [(uid, f"{uid:040d}", uid + 100_000) for uid in range(1, 20_001)]
    messages = render_table(SIGNER, "INBOX", 77, entries, "rematch", NOW, from_uidvalidity=76)
    assert len(messages) > 5
    records = [read_record(body(message), SIGNER) for message in messages]
    assert all(isinstance(r, TableRecord) and r.parts == len(messages) for r in records)
    assert [entry for r in records for entry in r.entries] == entries  # type: ignore[union-attr]
    table = winning_table({uid: r for uid, r in enumerate(records, 1)}, 77)  # type: ignore[misc]
    assert table is not None and len(table.uidl_of) == 20_000
    assert table.carry is not None and table.carry.from_uidvalidity == 76
    assert table.carry.translate(UidRanges([(100_001, 100_003)])) == UidRanges([(1, 3)])


def test_the_newest_complete_version_wins_and_a_half_written_one_is_never_used() -> None:
    older = render_table(SIGNER, "INBOX", 77, [(1, "old-a", None)], "import", NOW)
    newer = render_table(
        SIGNER, "INBOX", 77, [(1, f"new-{n:060d}", None) for n in range(3000)], "import", NOW.replace(hour=9)
    )
    assert len(newer) >= 2
    stored = {100: read_record(body(older[0]), SIGNER)}
    # The newer version's last part has not arrived (a crash half-way): the older one holds.
    for uid, message in enumerate(newer[:-1], 200):
        stored[uid] = read_record(body(message), SIGNER)
    table = winning_table(stored, 77)  # type: ignore[arg-type]
    assert table is not None and table.uidl_of == {1: "old-a"}
    stored[300] = read_record(body(newer[-1]), SIGNER)
    table = winning_table(stored, 77)  # type: ignore[arg-type]
    assert table is not None and table.uidl_of[1] == f"new-{0:060d}"
    assert winning_table(stored, 78) is None  # another UIDVALIDITY's table is not this one's


def _tampered(message: bytes, change) -> bytes:  # noqa: ANN001 - a small test helper
    data = json.loads(body(message))
    change(data)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda m: body(m).replace(b'"old:2"', b'"evil"'), "bad_mac"),
        (lambda m: _tampered(m, lambda d: d.pop("mac")), "unsigned"),
        (lambda m: _tampered(m, lambda d: d.update(entries=[[5, "has space"]])), "bad_mac"),
        (lambda m: b"not json", "not_json"),
        (lambda m: b"{" + b" " * 70_000 + b"}", "too_large"),
        (lambda m: _tampered(m, lambda d: d.update(written="2025-03-04T05:06:07")), "bad_timestamp"),
        (lambda m: _tampered(m, lambda d: d.update(format=2)), "bad_format"),
        (lambda m: _tampered(m, lambda d: d.update(uidvalidity=0)), "bad_format"),
    ],
)
def test_records_that_cannot_be_trusted_are_ignored_with_the_reason(make, reason: str) -> None:  # noqa: ANN001
    [message] = render_table(SIGNER, "INBOX", 77, [(5, "u1", None), (3, "old:2", None)], "import", NOW)
    with pytest.raises(RecordIgnored) as caught:
        read_record(make(message), SIGNER)
    assert caught.value.reason == reason


def test_a_record_signed_for_another_account_or_key_is_not_trusted() -> None:
    [message] = render_table(SIGNER, "INBOX", 77, [(1, "u1", None)], "import", NOW)
    for other in (RecordSigner(KEY, "mallory@example.org"), RecordSigner(b"another key, also 32+ characters!!", "alice@example.org")):
        with pytest.raises(RecordIgnored, match="bad_mac"):
            read_record(body(message), other)
    # Account names compare case-insensitively, as the upstream compares them.
    assert read_record(body(message), RecordSigner(KEY, "Alice@Example.org"))


def test_a_device_state_record_never_passes_for_a_uidl_record() -> None:
    state = render_state(StateSigner(KEY, "alice@example.org"), "phone", "INBOX", 77, UidRanges.of([1]), NOW)
    with pytest.raises(RecordIgnored):
        read_record(body(state), SIGNER)


def test_a_signed_record_with_bad_entries_is_ignored() -> None:
    def signed(entries: list[object], kind: str = "uidls") -> bytes:
        fields = {
            "format": 1, "kind": kind, "mailbox": "INBOX", "uidvalidity": 77, "written": NOW.isoformat(),
            "entries": entries,
        }
        if kind == "uidls":
            fields.update(version="v1", part=1, parts=1, origin="import")
        else:
            fields["through"] = 9
        fields["mac"] = SIGNER.mac(fields)
        return json.dumps(fields).encode()

    for entries, kind in [
        ([[0, "u"]], "uidls"),
        ([[1, "x" * 71]], "uidls"),
        ([[1, "two words"]], "uidls"),
        ([[1, "u", 4294967296]], "uidls"),
        ([[1, 10, "short"]], "facts"),
        ([[1, -1, "AAAAAAAAAAAAAAAA"]], "facts"),
        ([[1, 10, "AAAAAAAAAAAAAAAA", "bad id!"]], "facts"),
        ([[1, 10, "AAAAAAAAAAAAAAAA", None, "bad uidl"]], "facts"),
    ]:
        with pytest.raises(RecordIgnored, match="bad_entries"):
            read_record(signed(entries, kind), SIGNER)
    assert read_record(signed([[1, 10, "AAAAAAAAAAAAAAAA", None, "ok"]], "facts"), SIGNER)
