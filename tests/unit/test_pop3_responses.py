"""Status lines and multi-line responses, byte for byte."""

from __future__ import annotations

import pytest

from bridge.pop3 import ResponseCode, err, multiline, ok


def test_ok() -> None:
    assert ok() == b"+OK\r\n"
    assert ok("") == b"+OK\r\n"
    assert ok("2 320") == b"+OK 2 320\r\n"


def test_err_without_code() -> None:
    assert err("no such message") == b"-ERR no such message\r\n"
    assert err("") == b"-ERR\r\n"


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (ResponseCode.AUTH, b"-ERR [AUTH] nope\r\n"),
        (ResponseCode.SYS_TEMP, b"-ERR [SYS/TEMP] nope\r\n"),
        (ResponseCode.SYS_PERM, b"-ERR [SYS/PERM] nope\r\n"),
        (ResponseCode.IN_USE, b"-ERR [IN-USE] nope\r\n"),
        (ResponseCode.LOGIN_DELAY, b"-ERR [LOGIN-DELAY] nope\r\n"),
    ],
)
def test_err_with_code(code: ResponseCode, wire: bytes) -> None:
    assert err("nope", code) == wire


def test_err_with_code_and_no_text() -> None:
    assert err("", ResponseCode.SYS_TEMP) == b"-ERR [SYS/TEMP]\r\n"


def test_multiline() -> None:
    assert (
        multiline("2 messages:", ["1 120", "2 200"])
        == b"+OK 2 messages:\r\n1 120\r\n2 200\r\n.\r\n"
    )
    assert multiline("", []) == b"+OK\r\n.\r\n"


def test_multiline_stuffs_leading_dots() -> None:
    assert multiline("x", [".hidden", "."]) == b"+OK x\r\n..hidden\r\n..\r\n.\r\n"


@pytest.mark.parametrize("text", ["a\r\nb", "a\nb", "a\rb", "a\0b", "caf\u00e9", "tab\there"])
def test_texts_that_would_break_the_line_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ok(text)
    with pytest.raises(ValueError):
        err(text, ResponseCode.AUTH)
    with pytest.raises(ValueError):
        multiline("x", [text])
