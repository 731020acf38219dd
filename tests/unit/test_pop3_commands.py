"""parse_command: one line in, one command or one -ERR text out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.pop3 import BadCommand, parse_command
from bridge.pop3.commands import (
    HUGE_NUMBER,
    Capa,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Top,
    Uidl,
    User,
)


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"USER alice", User("alice")),
        (b"PASS secret", Pass("secret")),
        (b"STAT", Stat()),
        (b"LIST", List()),
        (b"LIST 3", List(3)),
        (b"RETR 1", Retr(1)),
        (b"DELE 12", Dele(12)),
        (b"NOOP", Noop()),
        (b"RSET", Rset()),
        (b"QUIT", Quit()),
        (b"TOP 2 10", Top(2, 10)),
        (b"TOP 2 0", Top(2, 0)),
        (b"UIDL", Uidl()),
        (b"UIDL 7", Uidl(7)),
        (b"CAPA", Capa()),
    ],
)
def test_every_command(line: bytes, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize("keyword", [b"stat", b"Stat", b"sTaT", b"STAT"])
def test_keywords_are_case_insensitive(keyword: bytes) -> None:
    assert parse_command(keyword) == Stat()


def test_user_and_pass_take_the_rest_of_the_line_verbatim() -> None:
    assert parse_command(b"PASS  two  spaces ") == Pass(" two  spaces ")
    assert parse_command(b"USER a b") == User("a b")
    assert parse_command(b"user Alice@Example.ORG") == User("Alice@Example.ORG")


def test_invalid_utf8_is_kept_byte_for_byte() -> None:
    raw = b"p\xff\xfe\xc3(w"
    command = parse_command(b"PASS " + raw)
    assert isinstance(command, Pass)
    assert command.password.encode("utf-8", errors="surrogateescape") == raw
    user = parse_command(b"USER \xe9t\xe9")
    assert isinstance(user, User)
    assert user.name.encode("utf-8", errors="surrogateescape") == b"\xe9t\xe9"


def test_valid_utf8_decodes_normally() -> None:
    assert parse_command("USER jürgen".encode()) == User("jürgen")


def test_password_is_not_in_repr() -> None:
    assert "hunter2" not in repr(parse_command(b"PASS hunter2"))


@pytest.mark.parametrize(
    ("line", "text", "command"),
    [
        (b"", "empty command", None),
        (b"XYZZY", "unknown command", None),
        (b"STATS", "unknown command", None),
        (b"LAST", "unknown command", None),
        (b"APOP a b", "unknown command", None),
        (b" STAT", "unknown command", None),
        (b"ST AT", "unknown command", None),
        (b"STAT\t", "unknown command", None),
        (b"\xff\xfe", "unknown command", None),
        (b"USER", "missing user name", User),
        (b"USER ", "missing user name", User),
        (b"PASS", "missing password", Pass),
        (b"PASS ", "missing password", Pass),
        (b"STAT 1", "too many arguments", Stat),
        (b"NOOP x", "too many arguments", Noop),
        (b"RSET 1", "too many arguments", Rset),
        (b"QUIT now", "too many arguments", Quit),
        (b"CAPA x", "too many arguments", Capa),
        (b"LIST 1 2", "too many arguments", List),
        (b"UIDL 1 2", "too many arguments", Uidl),
        (b"RETR", "missing message number", Retr),
        (b"RETR ", "missing message number", Retr),
        (b"RETR 1 2", "too many arguments", Retr),
        (b"DELE", "missing message number", Dele),
        (b"DELE 1 1", "too many arguments", Dele),
        (b"TOP", "missing message number", Top),
        (b"TOP 1", "missing line count", Top),
        (b"TOP 1 2 3", "too many arguments", Top),
        (b"TOP 0 1", "no such message", Top),
        (b"TOP x 1", "invalid message number", Top),
        (b"TOP 1 x", "invalid line count", Top),
        (b"TOP 1 -1", "invalid line count", Top),
        (b"TOP 1 +1", "invalid line count", Top),
    ],
)
def test_bad_lines(line: bytes, text: str, command: type | None) -> None:
    assert parse_command(line) == BadCommand(text, command)


@pytest.mark.parametrize("keyword", [b"LIST", b"RETR", b"DELE", b"UIDL"])
@pytest.mark.parametrize(
    ("arg", "text"),
    [
        (b"0", "no such message"),
        (b"00", "no such message"),
        (b"-1", "invalid message number"),
        (b"+1", "invalid message number"),
        (b"1.0", "invalid message number"),
        (b"1e3", "invalid message number"),
        (b"0x1", "invalid message number"),
        (b"one", "invalid message number"),
        (b"\xd9\xa1", "invalid message number"),  # ARABIC-INDIC DIGIT ONE
        ("\uff11".encode(), "invalid message number"),  # FULLWIDTH DIGIT ONE
        (b"1\t", "invalid message number"),
    ],
)
def test_bad_message_numbers(keyword: bytes, arg: bytes, text: str) -> None:
    result = parse_command(keyword + b" " + arg)
    assert isinstance(result, BadCommand)
    assert result.text == text


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"RETR 007", Retr(7)),
        (b"RETR  1", Retr(1)),  # runs of spaces are tolerated
        (b"RETR 1 ", Retr(1)),
        (b"STAT ", Stat()),
        (b"TOP  1   2 ", Top(1, 2)),
        (b"TOP 1 000", Top(1, 0)),
        (b"LIST ", List()),
    ],
)
def test_tolerated_spacing_and_leading_zeros(line: bytes, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize("digits", [b"9" * 19, b"9" * 20, b"1" + b"0" * 1000, b"0" * 500 + b"5"])
def test_huge_numbers_do_not_crash(digits: bytes) -> None:
    result = parse_command(b"RETR " + digits)
    assert isinstance(result, Retr)
    assert result.number == min(int(digits), HUGE_NUMBER)
    top = parse_command(b"TOP 1 " + digits)
    assert isinstance(top, Top)
    assert top.lines == min(int(digits), HUGE_NUMBER)


def test_digits_beyond_pythons_int_conversion_limit() -> None:
    # int() refuses strings over 4300 digits; the parser must not call it on them.
    assert parse_command(b"DELE " + b"7" * 10_000) == Dele(HUGE_NUMBER)


@pytest.mark.parametrize(
    "line",
    [b"\0", b"NOOP\0", b"\0NOOP", b"USER a\0b", b"PASS \0", b"RETR 1\0", b"NOOP\r", b"USER a\rb"],
)
def test_nul_and_stray_cr_are_refused(line: bytes) -> None:
    assert parse_command(line) == BadCommand("invalid character in command")


@settings(max_examples=1000, deadline=None)
@given(
    st.binary(max_size=64)
    | st.sampled_from([b"TOP ", b"RETR ", b"USER ", b"LIST "]).flatmap(
        lambda k: st.binary(max_size=30).map(lambda rest: k + rest)
    )
)
def test_property_any_line_parses_to_something(line: bytes) -> None:
    result = parse_command(line)
    if isinstance(result, BadCommand):
        assert result.text and result.text.isascii() and result.text.isprintable()
