"""bridge.imap.listing and bridge.imap.untagged: what a reused connection lists, decided from
the server's untagged responses alone. A warm listing must equal what a fresh full listing of
the same mailbox would give, or say that it cannot (`consistent`, `complete`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.imap.errors import UpstreamImplausible
from bridge.imap.listing import MaildropListing
from bridge.imap.syntax import uid_set_ranges
from bridge.imap.untagged import ServerView


def listed(*messages: tuple[int, int]) -> MaildropListing:
    """A listing after a full listing of (uid, size) messages, numbered 1, 2, ..."""
    listing = MaildropListing()
    listing.exists(len(messages))
    for number, (uid, size) in enumerate(messages, 1):
        listing.fetched(number, uid, size, False)
    return listing


def test_a_full_listing_gives_the_snapshot_in_uid_order() -> None:
    listing = listed((3, 30), (7, 70), (9, 90))
    assert listing.complete() and listing.consistent
    snapshot = listing.snapshot(555)
    assert (snapshot.uidvalidity, list(snapshot.uids), list(snapshot.sizes)) == (555, [3, 7, 9], [30, 70, 90])


def test_an_unchanged_listing_hands_out_the_same_snapshot() -> None:
    listing = listed((1, 10), (2, 20))
    assert listing.snapshot(1) is listing.snapshot(1)


def test_new_mail_is_incomplete_until_its_uid_and_size_are_known() -> None:
    listing = listed((1, 10))
    before = listing.snapshot(1)
    listing.exists(2)
    assert not listing.complete() and listing.first_missing() == 2
    listing.fetched(2, 5, 50, False)
    assert listing.complete()
    assert listing.snapshot(1) is not before and list(listing.snapshot(1).uids) == [1, 5]


def test_expunge_renumbers_and_a_flag_change_hides_deleted_messages() -> None:
    listing = listed((1, 10), (2, 20), (3, 30))
    listing.expunge(1)
    assert list(listing.uids) == [2, 3]
    listing.fetched(2, None, None, True)  # * 2 FETCH (FLAGS (\Deleted)): UID 3 now
    assert list(listing.snapshot(9).uids) == [2]
    listing.fetched(2, None, None, False)
    assert list(listing.snapshot(9).uids) == [2, 3]


def test_a_sequence_number_that_names_another_uid_makes_it_inconsistent() -> None:
    listing = listed((1, 10), (2, 20))
    listing.fetched(2, 8, 80, False)
    assert not listing.consistent
    listing = listed((1, 10))
    listing.expunge(5)
    assert not listing.consistent


def test_vanished_ranges_of_any_width_remove_exactly_the_listed_uids() -> None:
    uids = [3, 10, 11, 500, 70_000, 4_000_000_000]
    listing = listed(*((uid, 100) for uid in uids))
    # Narrow and wide ranges, written either way round; most UIDs they span never existed.
    listing.vanish(uid_set_ranges(b"11,20:5,600:69999,4294967295:1000000000"))
    assert list(listing.uids) == [3, 500, 70_000]
    assert list(listing.sizes) == [100, 100, 100]


def test_implausible_numbers_are_refused() -> None:
    listing = MaildropListing()
    with pytest.raises(UpstreamImplausible):
        listing.exists(4_294_967_295)
    with pytest.raises(UpstreamImplausible):
        listing.fetched(4_294_967_295, 1, 1, False)


@given(
    st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30, unique=True),
    st.lists(st.tuples(st.sampled_from(["expunge", "delete", "undelete", "arrive"]), st.integers(0, 40)), max_size=25),
)
def test_a_warm_listing_equals_a_fresh_listing_after_any_changes(initial: list[int], changes: list[tuple[str, int]]) -> None:
    """What the server says of any sequence of expunges, flag changes and arrivals brings
    the warm listing exactly where a fresh listing of the resulting mailbox would be."""
    mailbox = [[uid, False] for uid in sorted(initial)]  # the server's own state, in order
    next_uid = max(initial) + 1
    warm = listed(*((uid, uid * 10) for uid, _ in mailbox))
    for kind, pick in changes:
        if kind == "arrive":
            mailbox.append([next_uid, False])
            warm.exists(len(mailbox))
            warm.fetched(len(mailbox), next_uid, next_uid * 10, False)
            next_uid += 1
            continue
        if not mailbox:
            continue
        number = pick % len(mailbox) + 1
        if kind == "expunge":
            mailbox.pop(number - 1)
            warm.expunge(number)
        else:
            mailbox[number - 1][1] = kind == "delete"
            warm.fetched(number, None, None, kind == "delete")
    fresh = listed(*((uid, uid * 10) for uid, _ in mailbox))
    for number, (uid, deleted) in enumerate(mailbox, 1):
        fresh.fetched(number, uid, None, deleted)
    assert warm.consistent and warm.complete()
    assert warm.snapshot(1) == fresh.snapshot(1)


def test_the_server_view_follows_untagged_responses() -> None:
    view = ServerView()
    view.listing = listed((1, 10), (2, 20))
    view.untagged(b"* 3 EXISTS")
    view.untagged(b"* 3 FETCH (UID 7 RFC822.SIZE 70 FLAGS () MODSEQ (41))")
    view.untagged(b"* 1 EXPUNGE")
    view.untagged(b"* VANISHED 2")
    view.status(b"OK [UIDVALIDITY 99] [HIGHESTMODSEQ 42] done")
    view.untagged(b"* OK [CAPABILITY IMAP4rev1 IDLE] ok")
    assert list(view.listing.snapshot(99).uids) == [7]
    assert view.exists == 1
    assert (view.uidvalidity, view.highest_modseq, view.modseq_seen) == (99, 42, 41)
    assert view.capabilities == frozenset({"IMAP4REV1", "IDLE"})


@pytest.mark.parametrize(
    "response",
    [b"* 4294967295 EXISTS", b"* 4294967295 FETCH (FLAGS ())", b"* VANISHED 1:4294967295"],
)
def test_the_server_view_refuses_implausible_numbers(response: bytes) -> None:
    view = ServerView()
    with pytest.raises(UpstreamImplausible):
        view.untagged(response)


def test_vanished_earlier_of_any_width_is_applied_without_spelling_it_out() -> None:
    view = ServerView()
    view.listing = listed((5, 50), (6, 60))
    view.untagged(b"* VANISHED (EARLIER) 1:4294967295")
    assert list(view.listing.snapshot(1).uids) == []


def test_vanished_while_new_mail_is_not_listed_yet() -> None:
    listing = listed((3, 30), (8, 80), (12, 120))
    listing.exists(5)  # two arrivals, UIDs not known yet
    listing.vanish(uid_set_ranges(b"1:3,10:4294967295"))
    assert list(listing.uids) == [8, 0, 0]
    listing.fetched(2, 20, 200, False)
    listing.fetched(3, 21, 210, False)
    assert listing.complete()
    assert list(listing.snapshot(1).uids) == [8, 20, 21]


@pytest.mark.parametrize(
    "response",
    [
        b"* 1 FETCH (UID 4294967296 RFC822.SIZE 10 FLAGS ())",
        b"* 1 FETCH (UID 0 RFC822.SIZE 10 FLAGS ())",
        b"* 1 FETCH (UID 5 RFC822.SIZE 9223372036854775808 FLAGS ())",
    ],
)
def test_a_listing_refuses_what_is_no_uid_or_size(response: bytes) -> None:
    view = ServerView()
    view.listing = MaildropListing()
    with pytest.raises(UpstreamImplausible):
        view.untagged(response)


def test_a_server_that_lists_out_of_order_or_twice() -> None:
    """Hostile or broken: UIDs out of order are put in order; one UID for two messages is
    refused (the session's login fails with -ERR [SYS/TEMP]) rather than served twice."""
    listing = listed((9, 90), (4, 40), (6, 60))
    snapshot = listing.snapshot(1)
    assert (list(snapshot.uids), list(snapshot.sizes)) == ([4, 6, 9], [40, 60, 90])
    twice = listed((4, 40), (9, 90), (4, 41))
    with pytest.raises(UpstreamImplausible):
        twice.snapshot(1)


def test_a_200000_message_snapshot_fits_in_40_mib() -> None:
    """The issue's bound for a huge maildrop: the warm listing, the snapshot, the message
    list sessions share and its LIST/UIDL lines together (tracemalloc counts what Python
    allocates; the figure is memory, not time)."""
    import tracemalloc

    from bridge.session.uidl import maildrop_from_snapshot

    count = 200_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        view = ServerView()
        view.listing = MaildropListing()
        view.untagged(b"* %d EXISTS" % count)
        for number in range(1, count + 1):
            view.untagged(b"* %d FETCH (UID %d RFC822.SIZE %d FLAGS (\\Seen))" % (number, number * 3, 2000 + number % 5000))
        snapshot = view.listing.snapshot(1234)
        maildrop = maildrop_from_snapshot(snapshot)
        lines = (maildrop.listing_lines(unique_ids=False), maildrop.listing_lines(unique_ids=True))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(snapshot.uids) == count and lines[1].count(b"\r\n") == count
    print(f"200,000-message snapshot: {held / 1048576:.1f} MiB")
    assert held <= 40 * 1024 * 1024, f"{held / 1048576:.1f} MiB"
