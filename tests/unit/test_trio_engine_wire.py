"""The Trio engine's fast path for read-ahead FETCH answers (`_Wire.body_fetch`), fed server
bytes the way a socket delivers them: in arbitrary pieces. What it does not recognise must be
left untouched for the general parser, which the integration tests run against real servers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.upstream.interface import UpstreamImplausible
from bridge.upstream.trio_engine import _Listing, _uid_ranges, _Wire


def answer(number: int, uid: int, body: bytes) -> bytes:
    return b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (number, uid, len(body)) + body + b")\r\n"


async def wire_with(*pieces: bytes) -> tuple[_Wire, trio.testing.MemorySendStream]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    wire = _Wire(receive)
    for piece in pieces:
        await send.send_all(piece)
    return wire, send


async def test_answers_come_out_one_by_one_then_the_tagged_line_is_left() -> None:
    first, second = b"Subject: a\r\n\r\none\r\n", b"Subject: b\r\n\r\n.\r\ntwo\r\n"
    wire, _send = await wire_with(answer(1, 10, first) + answer(2, 11, second) + b"B5 OK done\r\n")
    await wire.fill()
    assert wire.body_fetch() == (1, 10, first)
    assert wire.body_fetch() == (2, 11, second)
    assert wire.body_fetch() is False
    assert (await wire.response()).text == b"B5 OK done"


async def test_an_answer_split_anywhere_asks_for_more_then_comes_out_whole() -> None:
    body = b"x" * 5000 + b"\r\n"
    whole = answer(7, 42, body)
    for cut in (1, 10, len(whole) - 5000, len(whole) - 2, len(whole) - 1):
        wire, send = await wire_with(whole[:cut])
        await wire.fill()
        assert wire.body_fetch() is True, cut
        await send.send_all(whole[cut:])
        await wire.fill()
        assert wire.body_fetch() == (7, 42, body), cut


async def test_other_responses_are_left_for_the_general_parser() -> None:
    for other in (
        b"* 3 EXISTS\r\n",
        b"* 2 FETCH (FLAGS (\\Seen))\r\n",
        b"* 1 FETCH (UID 10 BODY[] NIL)\r\n",
        b"* 1 FETCH (UID 10 BODY[] {3}\r\nabc FLAGS (\\Seen))\r\n",  # more after the literal
        b"B7 NO [SERVERBUG] oops\r\n",
    ):
        wire, _send = await wire_with(other)
        await wire.fill()
        assert wire.body_fetch() is False, other
        assert wire.pending == len(other), other  # untouched


def test_vanished_ranges_of_any_width_remove_exactly_the_listed_uids() -> None:
    listing = _Listing()
    uids = [3, 10, 11, 500, 70_000, 4_000_000_000]
    listing.exists(len(uids))
    for number, uid in enumerate(uids, 1):
        listing.fetched(number, uid, 100, False)
    # Narrow and wide ranges, written either way round; most UIDs they span never existed.
    listing.vanish(_uid_ranges(b"11,20:5,600:69999,4294967295:1000000000"))
    assert listing.by_sequence == [3, 500, 70_000]
    assert sorted(listing.info) == [3, 500, 70_000]


async def test_a_literal_beyond_the_commands_budget_is_refused_before_it_is_read() -> None:
    wire, _send = await wire_with(b"* 1 FETCH (UID 9 BODY[] {4294967295}\r\nonly the start")
    await wire.fill()
    assert wire.body_fetch() is False  # left to the general parser, which refuses it
    with pytest.raises(UpstreamImplausible, match="4294967295-byte literal"):
        await wire.response()
