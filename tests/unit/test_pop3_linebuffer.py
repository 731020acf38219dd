"""LineBuffer: cutting the client's byte stream into command lines, within a cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.pop3 import LINE_TOO_LONG, LineBuffer, LineTooLong

Item = bytes | LineTooLong


def drain(buffer: LineBuffer) -> list[Item]:
    items: list[Item] = []
    while (item := buffer.next_line()) is not None:
        items.append(item)
    return items


def feed_all(chunks: list[bytes], max_line_length: int = 255) -> tuple[list[Item], LineBuffer]:
    buffer = LineBuffer(max_line_length)
    items: list[Item] = []
    for chunk in chunks:
        buffer.feed(chunk)
        items += drain(buffer)
    return items, buffer


def reference(data: bytes, max_line_length: int) -> list[Item]:
    """The rule stated plainly: split at LF, drop the unfinished tail, judge
    each line by its full length including the terminator."""
    *complete, _tail = data.split(b"\n")
    items: list[Item] = []
    for line in complete:
        if len(line) + 1 > max_line_length:
            items.append(LINE_TOO_LONG)
        else:
            items.append(line[:-1] if line.endswith(b"\r") else line)
    return items


def test_crlf_and_bare_lf_lines() -> None:
    items, _ = feed_all([b"STAT\r\nLIST\nNOOP\r\n"])
    assert items == [b"STAT", b"LIST", b"NOOP"]


def test_nothing_until_the_line_feed() -> None:
    buffer = LineBuffer()
    buffer.feed(b"STAT\r")
    assert buffer.next_line() is None
    assert buffer.next_line() is None
    buffer.feed(b"\n")
    assert buffer.next_line() == b"STAT"
    assert buffer.next_line() is None


def test_only_one_trailing_cr_is_removed() -> None:
    items, _ = feed_all([b"A\r\r\nB\rC\r\n\r\n\n"])
    assert items == [b"A\r", b"B\rC", b"", b""]


def test_empty_feed_is_a_no_op() -> None:
    items, buffer = feed_all([b"", b"NO", b"", b"OP\r\n", b""])
    assert items == [b"NOOP"]
    assert len(buffer) == 0


def test_lines_come_out_one_at_a_time_in_order() -> None:
    buffer = LineBuffer()
    buffer.feed(b"1\r\n2\r\n3\r\n4")
    assert buffer.next_line() == b"1"
    buffer.feed(b"\r\n5\r\n")
    assert drain(buffer) == [b"2", b"3", b"4", b"5"]


@pytest.mark.parametrize("terminator", [b"\r\n", b"\n"])
def test_line_exactly_at_the_cap_is_accepted(terminator: bytes) -> None:
    line = b"X" * (255 - len(terminator))
    items, _ = feed_all([line + terminator + b"NEXT\r\n"])
    assert items == [line, b"NEXT"]


@pytest.mark.parametrize("terminator", [b"\r\n", b"\n"])
def test_line_one_over_the_cap_is_reported_once(terminator: bytes) -> None:
    line = b"X" * (256 - len(terminator))
    items, _ = feed_all([line + terminator + b"NEXT\r\n"])
    assert items == [LINE_TOO_LONG, b"NEXT"]


@pytest.mark.parametrize("terminator", [b"\r\n", b"\n"])
def test_cap_edges_byte_at_a_time(terminator: bytes) -> None:
    data = (
        b"X" * (255 - len(terminator))
        + terminator
        + b"Y" * (256 - len(terminator))
        + terminator
        + b"END\r\n"
    )
    items, _ = feed_all([data[i : i + 1] for i in range(len(data))])
    assert items == [b"X" * (255 - len(terminator)), LINE_TOO_LONG, b"END"]


def test_megabyte_without_line_feed_is_never_buffered() -> None:
    buffer = LineBuffer(255)
    for _ in range(256):
        buffer.feed(b"A" * 4096)
        assert buffer.next_line() is None
        assert len(buffer) <= 255
    buffer.feed(b"B" * 1_000_000)  # a single huge chunk, too
    assert len(buffer) <= 255
    buffer.feed(b"\r\nQUIT\r\n")
    assert drain(buffer) == [LINE_TOO_LONG, b"QUIT"]
    assert len(buffer) == 0


def test_overlong_line_completed_inside_one_chunk() -> None:
    items, _ = feed_all([b"A" * 300, b"A" * 300 + b"\r\nNOOP\r\n" + b"B" * 1000 + b"\nSTAT\r\n"])
    assert items == [LINE_TOO_LONG, b"NOOP", LINE_TOO_LONG, b"STAT"]


def test_partial_line_at_the_end_stays_pending() -> None:
    items, buffer = feed_all([b"STAT\r\nLIS"])
    assert items == [b"STAT"]
    assert len(buffer) == 3


def test_other_cap() -> None:
    items, _ = feed_all([b"12345678\r\n1234567\r\n"], max_line_length=9)
    assert items == [LINE_TOO_LONG, b"1234567"]


def test_cap_must_leave_room_for_a_terminator() -> None:
    with pytest.raises(ValueError):
        LineBuffer(1)


def test_many_lines_in_one_chunk_are_linear() -> None:
    # 200k lines handed over at once, then drained: must not rescan per line.
    data = b"NOOP\r\n" * 200_000
    buffer = LineBuffer()
    buffer.feed(data)
    count = 0
    while buffer.next_line() is not None:
        count += 1
    assert count == 200_000


_stream = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b"A", b"A" * 7, b" "]) | st.binary(max_size=6),
    max_size=60,
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_stream, st.lists(st.integers(0, 400), max_size=10), st.integers(2, 20))
def test_property_any_chunking_matches_reference(
    data: bytes, cuts: list[int], max_line_length: int
) -> None:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    buffer = LineBuffer(max_line_length)
    items: list[Item] = []
    for chunk in chunks:
        buffer.feed(chunk)
        items += drain(buffer)
        # Everything complete was drained, so what is left is one partial line.
        assert len(buffer) <= max_line_length
    assert items == reference(data, max_line_length)
