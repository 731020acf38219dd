"""bridge.imap.wire: server responses out of bytes split at every point, as the POP3 core's
tests feed their input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.imap.wire import (
    NEED_DATA,
    BodyFetch,
    Line,
    LiteralPiece,
    Response,
    ResponseReader,
    ResponseTooLarge,
)

TRANSCRIPT = (
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"
    b"* 2 FETCH (UID 7 BODY[]<0> {12}\r\nHello\r\nWorld)\r\n"
    b"* 3 FETCH (UID 8 BODY[HEADER] {0}\r\n BODY[TEXT] {3}\r\nabc)\r\n"
    b"* 4 EXISTS\r\n"
    b"A1 OK done\r\n"
)
EXPECTED = [
    Response(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready"),
    Response(b"* 2 FETCH (UID 7 BODY[]<0> {12})", [b"Hello\r\nWorld"]),
    Response(b"* 3 FETCH (UID 8 BODY[HEADER] {0} BODY[TEXT] {3})", [b"", b"abc"]),
    Response(b"* 4 EXISTS"),
    Response(b"A1 OK done"),
]


def responses(reader: ResponseReader) -> list[Response]:
    found = []
    while (response := reader.next_response()) is not NEED_DATA:
        assert isinstance(response, Response)
        found.append(response)
    return found


def feed_in_pieces(pieces: list[bytes]) -> list[Response]:
    reader = ResponseReader()
    found = []
    for piece in pieces:
        reader.receive_data(piece)
        found += responses(reader)
    assert reader.buffered == 0
    return found


def test_a_transcript_fed_whole() -> None:
    assert feed_in_pieces([TRANSCRIPT]) == EXPECTED


def test_a_transcript_fed_one_byte_at_a_time() -> None:
    assert feed_in_pieces([TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=12))
def test_a_transcript_split_anywhere(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(TRANSCRIPT)]
    assert feed_in_pieces([TRANSCRIPT[a:b] for a, b in zip(points, points[1:], strict=False)]) == EXPECTED


def test_a_streamed_literal_is_handed_out_as_received() -> None:
    reader = ResponseReader()
    reader.receive_data(b"* 1 FETCH (UID 5 BODY[]<0> {10}\r\n")
    assert reader.next_event() == Line(b"* 1 FETCH (UID 5 BODY[]<0> {10}", 10)
    assert reader.next_event() is NEED_DATA
    chunk = b"0123456"
    reader.receive_data(chunk)
    piece = reader.next_event()
    assert isinstance(piece, LiteralPiece) and piece.remaining == 3
    # No copy: the body of a RETR goes from the socket to the client as the same object.
    assert piece.data is chunk
    reader.receive_data(b"789)\r\nA2 OK\r\n")
    assert reader.next_event() == LiteralPiece(b"789", 0)
    assert reader.next_event() == Line(b")")
    assert reader.next_event() == Line(b"A2 OK")
    assert reader.next_event() is NEED_DATA


def test_the_rest_of_a_response_after_its_first_line() -> None:
    reader = ResponseReader()
    reader.receive_data(b"* 9 FETCH (FLAGS () BODY[]<0> {2}\r\nhi UID 4)\r\n")
    first = reader.next_event()
    assert isinstance(first, Line) and first.literal == 2
    assert reader.next_response(first) == Response(b"* 9 FETCH (FLAGS () BODY[]<0> {2} UID 4)", [b"hi"])


def test_a_body_fetch_batch_is_taken_whole() -> None:
    reader = ResponseReader()
    data = b"* 1 FETCH (UID 10 BODY[] {3}\r\nabc)\r\n* 2 FETCH (UID 11 BODY[] {2}\r\nde)\r\n* 3 EXISTS\r\n"
    for cut in range(len(data)):
        reader = ResponseReader()
        reader.receive_data(data[:cut])
        taken = []
        result = reader.take_body_fetch()
        while isinstance(result, BodyFetch):
            taken.append(result)
            result = reader.take_body_fetch()
        reader.receive_data(data[cut:])
        while (result := reader.take_body_fetch()) is not None:
            assert isinstance(result, BodyFetch), (cut, result)
            taken.append(result)
        assert taken == [BodyFetch(1, 10, b"abc"), BodyFetch(2, 11, b"de")], cut
        assert reader.next_response() == Response(b"* 3 EXISTS")


def test_a_body_fetch_in_another_shape_is_left_for_the_general_reader() -> None:
    reader = ResponseReader()
    reader.receive_data(b"* 1 FETCH (UID 10 BODY[] {3}\r\nabc FLAGS (\\Seen))\r\n")
    assert reader.take_body_fetch() is None
    assert reader.next_response() == Response(b"* 1 FETCH (UID 10 BODY[] {3} FLAGS (\\Seen))", [b"abc"])


@pytest.mark.parametrize(
    "other",
    [
        b"* 3 EXISTS\r\n",
        b"* 2 FETCH (FLAGS (\\Seen))\r\n",
        b"* 1 FETCH (UID 10 BODY[] NIL)\r\n",
        b"B7 NO [SERVERBUG] oops\r\n",
    ],
)
def test_other_responses_are_left_untouched_for_the_general_reader(other: bytes) -> None:
    reader = ResponseReader()
    reader.receive_data(other)
    assert reader.take_body_fetch() is None
    assert reader.buffered == len(other)
    assert reader.next_response() == Response(other[:-2])


def test_a_line_beyond_the_bound_is_refused() -> None:
    reader = ResponseReader(max_line=100)
    reader.receive_data(b"* " + b"x" * 200)
    with pytest.raises(ResponseTooLarge):
        reader.next_event()
    reader = ResponseReader(max_line=100)
    reader.receive_data(b"* " + b"x" * 200 + b"\r\n")
    with pytest.raises(ResponseTooLarge):
        reader.next_event()


def test_a_literal_beyond_the_bound_is_refused_before_any_of_it_is_held() -> None:
    reader = ResponseReader(max_literal=1000)
    reader.receive_data(b"* 1 FETCH (BODY[] {4294967295}\r\n")
    with pytest.raises(ResponseTooLarge):
        reader.next_response()
    reader = ResponseReader(max_literal=1000)
    reader.receive_data(b"* 1 FETCH (UID 1 BODY[] {4294967295}\r\n")
    with pytest.raises(ResponseTooLarge):
        reader.take_body_fetch()


def test_a_streamed_literal_may_be_bigger_than_the_bound_for_whole_ones() -> None:
    reader = ResponseReader(max_literal=4)
    reader.receive_data(b"* 1 FETCH (UID 1 BODY[]<0> {8}\r\n12345678)\r\n")
    assert reader.next_event() == Line(b"* 1 FETCH (UID 1 BODY[]<0> {8}", 8)
    assert reader.next_event() == LiteralPiece(b"12345678", 0)


def test_a_long_line_in_small_pieces_is_searched_once() -> None:
    reader = ResponseReader()
    # 100,000 one-byte pieces: linear work, or this would take minutes.
    for _ in range(100_000):
        reader.receive_data(b"x")
        assert reader.next_event() is NEED_DATA
    reader.receive_data(b"\r\n")
    assert reader.next_event() == Line(b"x" * 100_000)


# -- listing lines in bulk (ResponseReader.take_matching_lines + ServerView.listing_rows) -----


def _listing_stream(count: int, deleted: set[int]) -> bytes:
    lines = [b"* %d EXISTS\r\n" % count]
    for number in range(1, count + 1):
        flags = b"\\Seen \\Deleted" if number in deleted else b"\\Seen"
        lines.append(b"* %d FETCH (UID %d RFC822.SIZE %d FLAGS (%s))\r\n" % (number, number * 2, 100 + number, flags))
        if number % 7 == 0:
            # Something else in between: taken the ordinary way.
            lines.append(b"* %d FETCH (FLAGS (\\Seen) UID %d)\r\n" % (number, number * 2))
    lines.append(b"A1 OK done\r\n")
    return b"".join(lines)


def _listed(data: bytes, chunk: int, bulk: bool) -> tuple[list[int], list[int]]:
    from bridge.imap.listing import MaildropListing
    from bridge.imap.untagged import LISTING_LINES, ServerView

    view = ServerView()
    view.listing = MaildropListing()
    reader = ResponseReader()
    for start in range(0, len(data), chunk):
        reader.receive_data(data[start : start + chunk])
        while True:
            if bulk:
                rows = reader.take_matching_lines(LISTING_LINES)
                if rows:
                    view.listing_rows(rows)
            response = reader.next_response()
            if response is NEED_DATA:
                break
            assert isinstance(response, Response)
            if response.text.startswith(b"* "):
                view.untagged(response.text)
    snapshot = view.listing.snapshot(1)
    return list(snapshot.uids), list(snapshot.sizes)


@given(st.integers(1, 60), st.sets(st.integers(1, 60)), st.integers(1, 300))
def test_listing_lines_in_bulk_give_what_one_by_one_gives(count: int, deleted: set[int], chunk: int) -> None:
    data = _listing_stream(count, deleted)
    assert _listed(data, chunk, bulk=True) == _listed(data, len(data), bulk=False)


def test_bulk_lines_stop_at_another_line_and_at_an_incomplete_one() -> None:
    from bridge.imap.untagged import LISTING_LINES

    reader = ResponseReader()
    reader.receive_data(
        b"* 1 FETCH (UID 5 RFC822.SIZE 10 FLAGS ())\r\n* 2 FETCH (UID 6 RFC822.SIZE 20 FLAGS (\\Seen))\r\n"
        b"* 3 EXPUNGE\r\n* 3 FETCH (UID 7 RFC822.SIZE 30 FLAGS ())\r\n* 4 FETCH (UID 8 RFC8"
    )
    assert reader.take_matching_lines(LISTING_LINES) == [
        (b"1", b"5", b"10", b"", None),
        (b"2", b"6", b"20", b"\\Seen", None),
    ]
    assert reader.take_matching_lines(LISTING_LINES) == []
    assert next_text(reader) == b"* 3 EXPUNGE"
    assert reader.take_matching_lines(LISTING_LINES) == [(b"3", b"7", b"30", b"", None)]
    assert reader.take_matching_lines(LISTING_LINES) == []
    reader.receive_data(b"22.SIZE 40 FLAGS ())\r\n")
    assert reader.take_matching_lines(LISTING_LINES) == [(b"4", b"8", b"40", b"", None)]


def test_an_overlong_number_is_left_to_the_ordinary_path() -> None:
    """Lines taken in bulk are not held to max_line, so the pattern bounds every number: a
    21-digit number never matches, and the ordinary path refuses or checks it."""
    from bridge.imap.untagged import LISTING_LINES

    reader = ResponseReader()
    reader.receive_data(b"* 1 FETCH (UID 5 RFC822.SIZE 123456789012345678901 FLAGS ())\r\n")
    assert reader.take_matching_lines(LISTING_LINES) == []


def next_text(reader: ResponseReader) -> bytes:
    response = reader.next_response()
    assert isinstance(response, Response)
    return response.text
