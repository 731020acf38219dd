"""Maildrop: the message list, its 1-based numbering and the deletion marks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bridge.pop3 import Maildrop, MaildropEntry, MessageList, Unavailable
from bridge.pop3.commands import HUGE_NUMBER

A = MaildropEntry(size=100, unique_id="uid-a", ref=11)
B = MaildropEntry(size=200, unique_id="uid-b", ref=22)
C = MaildropEntry(size=300, unique_id="uid-c", ref=33)


def drop() -> Maildrop:
    return Maildrop([A, B, C])


def test_numbering_is_one_based() -> None:
    maildrop = drop()
    assert maildrop.lookup(1) is A
    assert maildrop.lookup(2) is B
    assert maildrop.lookup(3) is C


@pytest.mark.parametrize("number", [0, -1, 4, 5, HUGE_NUMBER, 10**1000])
def test_out_of_range(number: int) -> None:
    assert drop().lookup(number) is Unavailable.NO_SUCH_MESSAGE


def test_empty_maildrop() -> None:
    maildrop = Maildrop([])
    assert len(maildrop) == 0
    assert maildrop.stat() == (0, 0)
    assert maildrop.listing_lines(unique_ids=False) == b""
    assert maildrop.listing_lines(unique_ids=True) == b""
    assert maildrop.lookup(1) is Unavailable.NO_SUCH_MESSAGE
    assert maildrop.marked() == ()


def test_listings_before_any_mark() -> None:
    maildrop = drop()
    assert len(maildrop) == 3
    assert maildrop.stat() == (3, 600)
    assert maildrop.listing_lines(unique_ids=False) == b"1 100\r\n2 200\r\n3 300\r\n"
    assert maildrop.listing_lines(unique_ids=True) == b"1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n"


def test_marks_hide_messages_but_keep_numbers() -> None:
    maildrop = drop()
    assert maildrop.mark_deleted(2) is B
    assert maildrop.stat() == (2, 400)
    assert maildrop.listing_lines(unique_ids=False) == b"1 100\r\n3 300\r\n"
    assert maildrop.listing_lines(unique_ids=True) == b"1 uid-a\r\n3 uid-c\r\n"
    assert maildrop.lookup(2) is Unavailable.DELETED
    assert maildrop.lookup(3) is C
    assert len(maildrop) == 3


def test_marking_twice_or_out_of_range() -> None:
    maildrop = drop()
    maildrop.mark_deleted(1)
    assert maildrop.mark_deleted(1) is Unavailable.DELETED
    assert maildrop.mark_deleted(4) is Unavailable.NO_SUCH_MESSAGE
    assert maildrop.mark_deleted(0) is Unavailable.NO_SUCH_MESSAGE
    assert maildrop.marked() == (A,)


def test_marked_entries_come_in_maildrop_order() -> None:
    maildrop = drop()
    maildrop.mark_deleted(3)
    maildrop.mark_deleted(1)
    assert maildrop.marked() == (A, C)


def test_reset_unmarks_everything() -> None:
    maildrop = drop()
    maildrop.mark_deleted(1)
    maildrop.mark_deleted(3)
    maildrop.reset()
    assert maildrop.marked() == ()
    assert maildrop.stat() == (3, 600)
    assert maildrop.lookup(1) is A


def test_maildrop_copies_its_input() -> None:
    entries = [A, B]
    maildrop = Maildrop(entries)
    entries.append(C)
    assert len(maildrop) == 2


@pytest.mark.parametrize(
    "unique_id",
    ["", "x" * 71, "has space", "tab\there", "crlf\r\n", "caf\u00e9", "\x7f", "nul\0"],
)
def test_invalid_unique_ids_are_refused(unique_id: str) -> None:
    with pytest.raises(ValueError):
        MaildropEntry(size=1, unique_id=unique_id, ref=1)


@pytest.mark.parametrize("unique_id", ["!", "~" * 70, "0000000A5F3C21B0", "<a@b>"])
def test_valid_unique_ids(unique_id: str) -> None:
    assert MaildropEntry(size=0, unique_id=unique_id, ref=0).unique_id == unique_id


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError):
        MaildropEntry(size=-1, unique_id="u", ref=1)


def test_duplicate_unique_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        Maildrop([A, MaildropEntry(size=5, unique_id="uid-a", ref=99)])


def test_entries_are_frozen() -> None:
    with pytest.raises(AttributeError):
        A.size = 5  # type: ignore[misc]


# -- MessageList: the columns sessions of an unchanged maildrop share ------------------------


def shared() -> MessageList:
    return MessageList([100, 200, 300], ["uid-a", "uid-b", "uid-c"], [11, 12, 13])


def test_listing_lines_are_the_list_and_uidl_bodies() -> None:
    maildrop = Maildrop(shared())
    assert maildrop.listing_lines(unique_ids=False) == b"1 100\r\n2 200\r\n3 300\r\n"
    assert maildrop.listing_lines(unique_ids=True) == b"1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n"
    assert maildrop.stat() == (3, 600)


def test_marks_of_one_session_do_not_reach_another_sharing_the_messages() -> None:
    messages = shared()
    first, second = Maildrop(messages), Maildrop(messages)
    first.mark_deleted(2)
    assert first.listing_lines(unique_ids=False) == b"1 100\r\n3 300\r\n"
    assert first.listing_lines(unique_ids=True) == b"1 uid-a\r\n3 uid-c\r\n"
    assert first.stat() == (2, 400)
    assert second.listing_lines(unique_ids=False) == b"1 100\r\n2 200\r\n3 300\r\n"
    assert second.stat() == (3, 600)
    first.reset()
    assert first.listing_lines(unique_ids=True) == b"1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n"


def test_entries_made_from_columns_are_the_same_on_every_lookup() -> None:
    maildrop = Maildrop(shared())
    entry = maildrop.lookup(2)
    assert entry == MaildropEntry(size=200, unique_id="uid-b", ref=12)
    assert maildrop.lookup(2) is entry
    assert maildrop.mark_deleted(2) is entry
    assert maildrop.marked() == (entry,)


def test_entries_made_from_columns_are_frozen_and_hash_as_made_by_hand() -> None:
    entry = Maildrop(shared()).lookup(3)
    by_hand = MaildropEntry(size=300, unique_id="uid-c", ref=13)
    assert isinstance(entry, MaildropEntry)
    assert (entry, hash(entry), repr(entry)) == (by_hand, hash(by_hand), repr(by_hand))
    with pytest.raises(AttributeError):
        entry.size = 5  # type: ignore[misc]


@pytest.mark.parametrize("make", [lambda: Maildrop(shared()), drop], ids=["columns", "entries"])
def test_size_and_ref_answer_where_lookup_gives_an_entry(make: Callable[[], Maildrop]) -> None:
    maildrop = make()
    maildrop.mark_deleted(2)
    for number in (0, 1, 2, 3, 4, HUGE_NUMBER):
        found = maildrop.lookup(number)
        expected = (found.size, found.ref) if isinstance(found, MaildropEntry) else None
        assert maildrop.size_and_ref(number) == expected, number
    assert maildrop.size_and_ref(2) is None
    maildrop.reset()
    assert maildrop.size_and_ref(2) is not None


def test_empty_message_list() -> None:
    maildrop = Maildrop(MessageList([], [], []))
    assert maildrop.stat() == (0, 0)
    assert maildrop.listing_lines(unique_ids=True) == b""


@pytest.mark.parametrize(
    ("sizes", "unique_ids", "refs", "reason"),
    [
        ([1, 2], ["a", "b"], [1], "every message needs"),
        ([1, -2], ["a", "b"], [1, 2], "must not be negative"),
        ([1, 2], ["a", "a"], [1, 2], "must differ"),
        ([1, 2], ["a", "b c"], [1, 2], "0x21 to 0x7E"),
        ([1, 2], ["a", ""], [1, 2], "0x21 to 0x7E"),
        ([1], ["x" * 71], [1], "0x21 to 0x7E"),
        ([1, 2], ["a", "b\nc"], [1, 2], "0x21 to 0x7E"),
    ],
)
def test_message_list_refuses_what_would_break_a_listing(
    sizes: list[int], unique_ids: list[str], refs: list[int], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        MessageList(sizes, unique_ids, refs)
