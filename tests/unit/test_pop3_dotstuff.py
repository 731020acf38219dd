"""DotStuffer, TopFilter and TopEncoder: what a POP3 client reads off the wire."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.pop3 import DotStuffer, LocalProtocolError, TopEncoder, TopFilter

# Inputs chosen for their edges: lone dots, dots after bare LF and after CRLF,
# missing final newline, CR at chunk ends, blank lines of both kinds.
TRICKY = [
    b"",
    b".",
    b"..",
    b"...",
    b"\n",
    b"\r",
    b"\r\n",
    b".\r\n",
    b"..\r\n",
    b".\n",
    b"\n.",
    b"\r\n.",
    b".\r\n.\r\n",
    b"a\r\n.\r\nb",
    b"a\n.\nb\n",
    b"a\r",
    b"abc",
    b"\r\n\r\n",
    b"\n\n",
    b"\n\r\n",
    b"\r\n\n",
    b"H: v\r\n\r\n.\r\n..\r\n.x\r\nend",
    b"H: v\n\n.\n.\n",
    b"H: v\r\n\r\nline1\r\nline2\r\nline3",
    b"H: v\r\nX: y\r\n\r\n\r\n\r\nz\r\n",
    b"H\n\r\nbody\n",
    b"H\r\n\nbody",
    b"no blank line\r\n.dot\r\n",
    b"a\r\r\n\r\nb\r\n",
    b"a\r\n\r\r\nb\r\n\r\nc\r\n",
    b"\r\n.body\r\n..\r\n",
    b"\n.\n..\n",
]


def _lines(data: bytes) -> list[bytes]:
    """Lines as a client reads them: each up to and including LF, last maybe without."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


def client_read(wire: bytes) -> bytes:
    """Undo dot-stuffing the way a POP3 client does, checking the framing."""
    lines = _lines(wire)
    body: list[bytes] = []
    for i, line in enumerate(lines):
        if line == b".\r\n":
            assert i == len(lines) - 1, "data after the terminator"
            return b"".join(body)
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed dot line {line!r}"
            line = line[1:]
        body.append(line)
    raise AssertionError(f"no terminator in {wire!r}")


def completed(message: bytes) -> bytes:
    """The message as the client ends up with it: a last line always has its CRLF."""
    return message + b"\r\n" if message and not message.endswith(b"\n") else message


def stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


def top_reference(message: bytes, body_lines: int) -> bytes:
    """Plain line-by-line statement of TOP: header through the first blank
    line, then the first `body_lines` lines."""
    lines = _lines(message)
    for i, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return b"".join(lines[: i + 1 + body_lines])
    return message


def run_filter(chunks: list[bytes], body_lines: int) -> bytes:
    top = TopFilter(body_lines)
    return b"".join(top.feed(c) for c in chunks)


def splits(data: bytes) -> list[list[bytes]]:
    """Every way of cutting `data` into two pieces, and, for short inputs, three."""
    ways = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    if len(data) <= 40:
        ways += [
            [data[:i], data[i:j], data[j:]]
            for i in range(len(data) + 1)
            for j in range(i, len(data) + 1)
        ]
    ways.append([data[i : i + 1] for i in range(len(data))])
    return ways


# -- DotStuffer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b"a\n.b\n", b"a\n..b\n.\r\n"),  # bare LF is a line end too, and is kept
        (b"a.b\r\n", b"a.b\r\n.\r\n"),  # a dot inside a line is left alone
        (b" .\r\n", b" .\r\n.\r\n"),
        (b"a\r", b"a\r\r\n.\r\n"),
        (b"a\r\n\r\n", b"a\r\n\r\n.\r\n"),
    ],
)
def test_dotstuffer_examples(message: bytes, wire: bytes) -> None:
    assert stuff([message]) == wire


@pytest.mark.parametrize("message", TRICKY)
def test_dotstuffer_any_split_gives_the_same_bytes(message: bytes) -> None:
    whole = stuff([message])
    for chunks in splits(message):
        assert stuff(chunks) == whole, chunks


@pytest.mark.parametrize("message", TRICKY)
def test_dotstuffer_round_trip(message: bytes) -> None:
    assert client_read(stuff([message])) == completed(message)


def test_dotstuffer_changes_nothing_but_leading_dots() -> None:
    message = bytes(range(256)) * 4 + b"\n" + bytes(range(256))
    wire = stuff([message])
    assert wire.replace(b"\n..", b"\n.") == message + b"\r\n.\r\n"


def test_dotstuffer_empty_chunks_are_harmless() -> None:
    assert stuff([b"", b".a", b"", b"\n", b"", b".", b""]) == b"..a\n..\r\n.\r\n"


def test_dotstuffer_done_only_after_finish() -> None:
    stuffer = DotStuffer()
    assert not stuffer.done
    stuffer.feed(b"x\r\n")
    assert not stuffer.done
    stuffer.finish()
    assert stuffer.done and stuffer.finished


def test_dotstuffer_misuse_after_finish() -> None:
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(LocalProtocolError):
        stuffer.feed(b"x")
    with pytest.raises(LocalProtocolError):
        stuffer.finish()


# -- TopFilter ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "body_lines", "expected"),
    [
        # TOP n 0 is the header and the blank line, nothing else.
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n", 0, b"A: 1\r\nB: 2\r\n\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n", 1, b"A: 1\r\nB: 2\r\n\r\nl1\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n", 2, b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n", 99, b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"),
        # Blank body lines count as lines.
        (b"A: 1\r\n\r\n\r\n\r\nx\r\n", 2, b"A: 1\r\n\r\n\r\n\r\n"),
        # A last line without LF is sent when within the count.
        (b"A: 1\r\n\r\nl1\r\nl2", 2, b"A: 1\r\n\r\nl1\r\nl2"),
        (b"A: 1\r\n\r\nl1\r\nl2", 1, b"A: 1\r\n\r\nl1\r\n"),
        # No blank line: all of it is header.
        (b"A: 1\r\nB: 2\r\n", 0, b"A: 1\r\nB: 2\r\n"),
        (b"A: 1", 0, b"A: 1"),
        (b"", 0, b""),
        # A message that opens with a blank line has an empty header.
        (b"\r\nbody\r\n", 0, b"\r\n"),
        (b"\nbody\n", 1, b"\nbody\n"),
        # Bare LF and mixed endings.
        (b"A: 1\n\nl1\nl2\n", 1, b"A: 1\n\nl1\n"),
        (b"A: 1\n\r\nl1\n", 0, b"A: 1\n\r\n"),
        (b"A: 1\r\n\nl1\n", 0, b"A: 1\r\n\n"),
        # "\r\r\n" is not a blank line.
        (b"A: 1\r\n\r\r\nB: 2\r\n\r\nbody\r\n", 0, b"A: 1\r\n\r\r\nB: 2\r\n\r\n"),
    ],
)
def test_topfilter_examples(message: bytes, body_lines: int, expected: bytes) -> None:
    assert run_filter([message], body_lines) == expected
    assert top_reference(message, body_lines) == expected


@pytest.mark.parametrize("body_lines", [0, 1, 2, 3, 10**30])
@pytest.mark.parametrize("message", TRICKY)
def test_topfilter_any_split_matches_reference(message: bytes, body_lines: int) -> None:
    expected = top_reference(message, body_lines)
    for chunks in splits(message):
        assert run_filter(chunks, body_lines) == expected, chunks


def test_topfilter_done_as_soon_as_the_last_wanted_line_is_through() -> None:
    top = TopFilter(1)
    assert top.feed(b"A: 1\r\n") == b"A: 1\r\n"
    assert not top.done
    assert top.feed(b"\r\nfirst\r") == b"\r\nfirst\r"
    assert not top.done
    assert top.feed(b"\nsecond\r\n") == b"\n"
    assert top.done
    assert top.feed(b"more\r\n") == b""


def test_topfilter_zero_lines_done_at_the_blank_line() -> None:
    top = TopFilter(0)
    assert top.feed(b"A: 1\r\n\r") == b"A: 1\r\n\r"
    assert not top.done
    assert top.feed(b"\nbody") == b"\n"
    assert top.done


def test_topfilter_without_blank_line_is_never_done() -> None:
    top = TopFilter(0)
    top.feed(b"A: 1\r\n" * 100)
    assert not top.done


def test_topfilter_rejects_negative_count() -> None:
    with pytest.raises(ValueError):
        TopFilter(-1)


# -- TopEncoder (TopFilter into DotStuffer) -------------------------------------


def test_top_encoder_stuffs_and_terminates() -> None:
    encoder = TopEncoder(2)
    wire = encoder.feed(b"A: 1\r\n\r\n.one\r\n") + encoder.feed(b".\r\nthree\r\n")
    assert encoder.done and not encoder.finished
    wire += encoder.finish()
    assert encoder.finished
    assert wire == b"A: 1\r\n\r\n..one\r\n..\r\n.\r\n"


def test_top_encoder_completes_a_cut_off_last_line() -> None:
    encoder = TopEncoder(5)
    wire = encoder.feed(b"A: 1\r\n\r\nonly") + encoder.finish()
    assert wire == b"A: 1\r\n\r\nonly\r\n.\r\n"


# -- speed -----------------------------------------------------------------------


def _big_body() -> bytes:
    # Every line starts with a dot: the worst case for stuffing.
    line = b".a line of some typical length, to look like a real message body\r\n"
    return b"Subject: big\r\n\r\n" + line * (32 * 1024 * 1024 // len(line))


def _pump(encoder: DotStuffer | TopEncoder, body: bytes, chunk: int = 65536) -> int:
    total = 0
    for i in range(0, len(body), chunk):
        total += len(encoder.feed(body[i : i + chunk]))
    return total + len(encoder.finish())


def test_dotstuffer_32_mib_stuffs_every_line() -> None:
    # Speed is measured in bench/, not here; this checks the big-chunk path is exact.
    body = _big_body()
    size = _pump(DotStuffer(), body)
    assert size == len(body) + body.count(b"\n.") + len(b".\r\n")


def test_topfilter_32_mib_without_blank_line_passes_everything() -> None:
    body = b"X-Header: " + b"v" * 60 + b"\r\n"
    body *= 32 * 1024 * 1024 // len(body)
    assert _pump(TopEncoder(0), body) == len(body) + len(b".\r\n")


# -- properties -----------------------------------------------------------------

# Bytes rich in the characters that matter, so the edges are hit often.
_message_bytes = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b" ", b"..", b"\n.", b"\r\n\r\n"])
    | st.binary(max_size=4),
    max_size=40,
).map(b"".join)


@st.composite
def _message_and_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    message = draw(_message_bytes)
    cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=8)))
    bounds = [0, *cuts, len(message)]
    return message, [message[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=400, deadline=None)
@given(_message_and_chunks())
def test_property_dotstuffer_chunking_does_not_matter(case: tuple[bytes, list[bytes]]) -> None:
    message, chunks = case
    assert stuff(chunks) == stuff([message])


@settings(max_examples=400, deadline=None)
@given(_message_bytes)
def test_property_dotstuffer_round_trip(message: bytes) -> None:
    assert client_read(stuff([message])) == completed(message)


@settings(max_examples=400, deadline=None)
@given(_message_and_chunks(), st.integers(0, 6) | st.just(10**20))
def test_property_topfilter_chunking_and_reference(
    case: tuple[bytes, list[bytes]], body_lines: int
) -> None:
    message, chunks = case
    assert run_filter(chunks, body_lines) == top_reference(message, body_lines)


@settings(max_examples=300, deadline=None)
@given(_message_and_chunks(), st.integers(0, 6))
def test_property_top_encoder_round_trip(case: tuple[bytes, list[bytes]], body_lines: int) -> None:
    message, chunks = case
    encoder = TopEncoder(body_lines)
    wire = b"".join(encoder.feed(c) for c in chunks) + encoder.finish()
    assert client_read(wire) == completed(top_reference(message, body_lines))
