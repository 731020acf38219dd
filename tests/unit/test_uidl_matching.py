"""The matcher of `uidl import` and of a UIDVALIDITY re-match, on the awkward cases real
migrations produce: duplicates, header folding changes, a missing end-of-header line, line
ends changed on the way, fields a server adds or drops, and messages on only one side."""

from __future__ import annotations

from bridge.imap import MailboxSnapshot
from bridge.uidl.headers import header_digest, header_length, x_uidl
from bridge.uidl.importer import imap_candidates, old_candidates
from bridge.uidl.matching import Candidate, pair, pair_in_stages
from bridge.uidl.old_server import OldMessage

HEADER = (
    b"Received: from mx.example.org by old.example.org; Mon, 3 Mar 2025 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: a subject long enough to be folded somewhere in the middle of it\r\n"
    b"Date: Mon, 3 Mar 2025 10:00:00 +0000\r\n"
    b"Message-ID: <one@example.org>\r\n"
    b"\r\n"
)


def test_the_same_header_as_servers_disagree_about_it_gives_one_digest() -> None:
    plain = header_digest(HEADER)
    variants = {
        "LF line ends": HEADER.replace(b"\r\n", b"\n"),
        "refolded": HEADER.replace(b"folded somewhere ", b"folded\r\n somewhere "),
        "folded with a tab": HEADER.replace(b"folded somewhere ", b"folded\r\n\tsomewhere "),
        "trailing whitespace": HEADER.replace(b"bob@example.org\r\n", b"bob@example.org  \r\n"),
        "no end-of-header line": HEADER[:-2],
        "body after it": HEADER + b"the body\r\n.\r\n",
        "Return-Path added": b"Return-Path: <alice@example.org>\r\n" + HEADER,
        "mbox status fields": HEADER.replace(b"\r\n\r\n", b"\r\nStatus: RO\r\nX-Status: A\r\nX-UID: 17\r\nX-Keywords: $x\r\n\r\n"),
        "X-UIDL and Content-Length": HEADER.replace(b"\r\n\r\n", b"\r\nX-UIDL: abc\r\nContent-Length: 12\r\nLines: 2\r\n\r\n"),
        "a line that is no field": HEADER.replace(b"To:", b"garbage without colon\r\nTo:"),
        "whitespace-only continuation": HEADER.replace(b"To: bob@example.org\r\n", b"To: bob@example.org\r\n \r\n"),
        "space before the colon": HEADER.replace(b"To:", b"To :"),
        "field name case": HEADER.replace(b"Message-ID:", b"Message-Id:"),
        "CR CR LF ends the header": HEADER[:-2] + b"\r\r\nX-After: the cut\r\n\r\n",
    }
    for what, variant in variants.items():
        assert header_digest(variant) == plain, what


def test_eight_bit_text_that_a_server_replaced_with_question_marks_still_matches() -> None:
    utf8 = HEADER.replace(b"Subject: a", b"Subject: gr\xc3\xbc\xc3\x9fe a")
    mangled = HEADER.replace(b"Subject: a", b"Subject: gr??e a")
    single = HEADER.replace(b"Subject: a", b"Subject: gr?e a")
    assert header_digest(utf8) == header_digest(mangled) == header_digest(single)


def test_what_tells_messages_apart_changes_the_digest() -> None:
    plain = header_digest(HEADER)
    for changed in (
        HEADER.replace(b"<one@", b"<two@"),
        HEADER.replace(b"10:00:00 +0000\r\nMessage", b"10:00:01 +0000\r\nMessage"),
        HEADER.replace(b"Received: from mx", b"Received: from other-mx"),
        b"Received: by migration.example.org\r\n" + HEADER,
    ):
        assert header_digest(changed) != plain
    # A migration that delivered the messages anew (adding a Received) can leave it out.
    skipped = {"received", "return-path"}
    assert header_digest(b"Received: by migration.example.org\r\n" + HEADER, skipped) == header_digest(HEADER, skipped)


def test_the_body_size_ignores_line_ends_and_the_end_of_header_line() -> None:
    assert header_length(HEADER) == len(HEADER)
    assert header_length(HEADER.replace(b"\r\n", b"\n")) == len(HEADER)
    assert header_length(HEADER[:-2]) == len(HEADER)


def test_x_uidl_is_read_from_the_header() -> None:
    assert x_uidl(HEADER) is None
    assert x_uidl(HEADER.replace(b"\r\n\r\n", b"\r\nX-UIDL:  3f1a2b \r\n\r\n")) == b"3f1a2b"
    assert x_uidl(HEADER.replace(b"\r\n\r\n", b"\r\nx-uidl: a\r\n b\r\n\r\n")) == b"a b"
    assert x_uidl(HEADER + b"X-UIDL: in the body\r\n") is None


def old_message(number: int, header: bytes, body: bytes = b"body\r\n", uidl: bytes | None = None) -> OldMessage:
    return OldMessage(number, uidl or b"old-%d" % number, len(header) + len(body), header)


def header_of(n: int, **changes: bytes) -> bytes:
    header = HEADER.replace(b"<one@", b"<%d@" % n)
    for old, new in changes.items():
        header = header.replace(old.encode(), new)
    return header


def imap_side(messages: list[tuple[int, bytes, bytes]]) -> tuple[MailboxSnapshot, dict[int, bytes]]:
    # A snapshot lists its messages in UID order, whatever order they were copied in.
    messages = sorted(messages)
    snapshot = MailboxSnapshot(7, [uid for uid, _h, _b in messages], [len(h) + len(b) for _u, h, b in messages])
    return snapshot, {uid: header for uid, header, _body in messages}


def match(old: list[OldMessage], new: list[tuple[int, bytes, bytes]]) -> tuple[dict[int, int], object]:
    snapshot, headers = imap_side(new)
    skipped = frozenset({"return-path", "status", "x-uidl", "content-length"})
    result = pair(old_candidates(old, skipped), imap_candidates(snapshot, headers, skipped))
    return {a.ident: b.ident for a, b in result.pairs}, result


def test_a_migration_that_changed_line_ends_and_added_a_field_matches_every_message() -> None:
    old = [old_message(n, header_of(n)) for n in range(1, 6)]
    # Copied in another order, with LF line ends and a Return-Path (sizes differ).
    new = [(10 + n, b"Return-Path: <x@y>\n" + header_of(n).replace(b"\r\n", b"\n"), b"body\n") for n in (5, 3, 1, 2, 4)]
    pairs, result = match(old, new)
    assert pairs == {5: 15, 3: 13, 1: 11, 2: 12, 4: 14}
    assert [a.ident for a, _b in result.pairs] == [1, 2, 3, 4, 5]  # the old server's order
    assert result.unmatched_old == result.unmatched_new == [] and result.ambiguous == 0


def test_messages_on_only_one_side_stay_unmatched() -> None:
    old = [old_message(n, header_of(n)) for n in (1, 2, 3)]
    new = [(21, header_of(1), b"body\r\n"), (23, header_of(3), b"body\r\n"), (24, header_of(4), b"body\r\n")]
    pairs, result = match(old, new)
    assert pairs == {1: 21, 3: 23}
    assert [c.ident for c in result.unmatched_old] == [2]
    assert [c.ident for c in result.unmatched_new] == [24]


def test_identical_copies_are_paired_in_order_and_counted_as_ambiguous() -> None:
    copy = header_of(9)
    old = [old_message(1, copy), old_message(2, header_of(1)), old_message(3, copy), old_message(4, copy)]
    new = [(31, copy, b"body\r\n"), (32, header_of(1), b"body\r\n"), (33, copy, b"body\r\n"), (34, copy, b"body\r\n")]
    pairs, result = match(old, new)
    assert pairs == {1: 31, 2: 32, 3: 33, 4: 34}
    assert result.ambiguous == 3
    # The same input always gives the same pairs.
    assert match(old, new)[0] == pairs


def test_same_headers_with_different_bodies_are_paired_by_body_size() -> None:
    head = header_of(5)
    old = [old_message(1, head, b"short\r\n"), old_message(2, head, b"a much longer body\r\n")]
    # On the IMAP side the longer one came first, and both got a Return-Path (sizes shift).
    new = [
        (41, b"Return-Path: <a@b>\r\n" + head, b"a much longer body\r\n"),
        (42, b"Return-Path: <a@b>\r\n" + head, b"short\r\n"),
    ]
    pairs, result = match(old, new)
    assert pairs == {1: 42, 2: 41}
    assert result.ambiguous == 2 and result.size_differs == 0


def test_more_copies_on_one_side_leave_the_extra_ones_unmatched() -> None:
    copy = header_of(3)
    old = [old_message(1, copy), old_message(2, copy), old_message(3, copy)]
    new = [(51, copy, b"body\r\n"), (52, copy, b"body\r\n")]
    pairs, result = match(old, new)
    assert pairs == {1: 51, 2: 52}
    assert [c.ident for c in result.unmatched_old] == [3]


def test_a_header_only_message_without_end_of_header_line_matches() -> None:
    header = header_of(6)[:-2]  # no empty line, no body: TOP n 0 and BODY[HEADER] differ here
    old = [OldMessage(1, b"u1", len(header), header + b"\r\n")]
    new = [(61, header, b"")]
    assert match(old, new)[0] == {1: 61}


def test_rematch_pairs_by_emailid_first_then_by_digest() -> None:
    # Candidates keyed by (emailid, digest); the stages re-key them.
    def rekey(index: int):  # noqa: ANN202 - a small test helper
        return lambda c: Candidate(c.ident, c.key[index] if isinstance(c.key, tuple) else None, c.size)

    old = [Candidate(1, ("E1", b"d1"), 10), Candidate(2, (None, b"d2"), 20), Candidate(3, ("E3", b"d3"), 30)]
    # Message 1 kept its EMAILID though its header digest changed; 3 lost its EMAILID.
    new = [Candidate(7, ("E1", b"changed"), 10), Candidate(8, (None, b"d2"), 20), Candidate(9, ("E9", b"d3"), 30)]
    result = pair_in_stages(old, new, [rekey(0), rekey(1)])
    assert {a.ident: b.ident for a, b in result.pairs} == {1: 7, 2: 8, 3: 9}
