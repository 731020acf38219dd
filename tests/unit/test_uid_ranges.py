"""UidRanges: the compact UID sets a device's state record is made of ("1:500,502")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.policy.uid_ranges import UidRanges

uid_sets = st.sets(st.integers(min_value=1, max_value=300), max_size=60)


def test_a_thousand_uids_downloaded_in_order_are_one_range() -> None:
    hidden = UidRanges()
    for uid in range(1, 1001):
        hidden = hidden.union(UidRanges.of([uid]))
    assert str(hidden) == "1:1000"
    assert hidden.range_count == 1
    assert len(hidden) == 1000


def test_text_form_is_imap_like_ranges() -> None:
    ranges = UidRanges.of([7, 1, 2, 3, 9, 10])
    assert str(ranges) == "1:3,7,9:10"
    assert UidRanges.parse("1:3,7,9:10") == ranges
    assert str(UidRanges()) == ""
    assert UidRanges.parse("") == UidRanges()


def test_overlapping_and_adjacent_ranges_merge() -> None:
    assert str(UidRanges([(5, 9), (1, 3), (4, 4), (8, 12)])) == "1:12"
    assert str(UidRanges([(1, 2), (4, 5)])) == "1:2,4:5"


@pytest.mark.parametrize("text", ["0", "3:1", "a", "1:b", "1,,2", "-4", "1:2:3"])
def test_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        UidRanges.parse(text)


def test_membership() -> None:
    ranges = UidRanges.parse("2:4,10")
    assert [uid for uid in range(0, 13) if uid in ranges] == [2, 3, 4, 10]
    assert "3" not in ranges
    assert not UidRanges()
    assert ranges


@given(uid_sets)
def test_round_trips_through_text(uids: set[int]) -> None:
    ranges = UidRanges.of(uids)
    assert set(ranges) == uids
    assert len(ranges) == len(uids)
    assert UidRanges.parse(str(ranges)) == ranges


@given(uid_sets)
def test_range_count_is_the_number_of_runs(uids: set[int]) -> None:
    runs = sum(1 for uid in uids if uid - 1 not in uids)
    assert UidRanges.of(uids).range_count == runs


@given(uid_sets, uid_sets)
def test_union_and_intersection_are_the_set_operations(a: set[int], b: set[int]) -> None:
    ra, rb = UidRanges.of(a), UidRanges.of(b)
    assert set(ra.union(rb)) == a | b
    assert set(ra.intersection(rb)) == a & b
    assert ra.union(rb) == rb.union(ra)
    assert ra.intersection(rb) == rb.intersection(ra)


@given(uid_sets, uid_sets)
def test_restricted_to_keeps_only_existing_uids(hidden: set[int], existing: set[int]) -> None:
    kept = UidRanges.of(hidden).restricted_to(existing)
    assert set(kept) == hidden & existing


def test_restricting_a_range_over_every_uid_keeps_only_the_snapshot() -> None:
    # A state record claiming "1:4294967295" must not hide mail that arrives later.
    everything = UidRanges.parse("1:4294967295")
    assert len(everything) == 4294967295  # counted, not enumerated
    kept = everything.restricted_to([3, 4, 5, 9])
    assert str(kept) == "3:5,9"
    assert 10 not in kept


@pytest.mark.parametrize(
    "text",
    ["4294967296", "1:4294967296", " 1", "1 ", "+1", "1_000", "\u0661", "1:", ":1", "1" * 4000],
)
def test_only_plain_uid32_numbers_are_accepted(text: str) -> None:
    with pytest.raises(ValueError):
        UidRanges.parse(text)


def test_the_largest_uid_is_accepted() -> None:
    assert str(UidRanges.parse("4294967295")) == "4294967295"
    assert str(UidRanges.parse("1:4294967295")) == "1:4294967295"
