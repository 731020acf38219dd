"""The exact client strings of XOAUTH2 and OAUTHBEARER (RFC 7628), and the answers to the
server's continuation requests, byte for byte."""

from __future__ import annotations

import base64

import pytest

from bridge.imap.bearer import (
    OAUTHBEARER,
    XOAUTH2,
    BearerExchange,
    choose_mechanism,
    escape_authzid,
    oauthbearer_response,
    xoauth2_response,
)


def test_xoauth2_string() -> None:
    # Google's documented example (developers.google.com/gmail/imap/xoauth2-protocol).
    assert base64.b64decode(xoauth2_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")) == (
        b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    )
    assert xoauth2_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg") == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_oauthbearer_string() -> None:
    # RFC 7628 section 4.1's example.
    assert base64.b64decode(oauthbearer_response("user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==", "server.example.com", 143)) == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )


@pytest.mark.parametrize(
    ("user", "escaped"),
    [("plain@example.com", "plain@example.com"), ("a,b", "a=2Cb"), ("a=b", "a=3Db"), ("=,=", "=3D=2C=3D"), ("=2C", "=3D2C")],
)
def test_the_authorisation_identity_is_escaped(user: str, escaped: str) -> None:
    assert escape_authzid(user) == escaped
    decoded = base64.b64decode(oauthbearer_response(user, "t", "h", 1))
    assert decoded.startswith(b"n,a=" + escaped.encode() + b",\x01")


@pytest.mark.parametrize(
    ("configured", "capabilities", "chosen"),
    [
        ("auto", {"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"}, OAUTHBEARER),
        ("auto", {"AUTH=XOAUTH2"}, XOAUTH2),
        ("auto", set(), XOAUTH2),
        ("xoauth2", {"AUTH=OAUTHBEARER"}, XOAUTH2),
        ("oauthbearer", {"AUTH=XOAUTH2"}, OAUTHBEARER),
    ],
)
def test_the_mechanism_choice(configured: str, capabilities: set[str], chosen: str) -> None:
    assert choose_mechanism(configured, frozenset(capabilities)) == chosen


def test_an_error_challenge_gets_an_empty_line_with_xoauth2_then_a_cancel() -> None:
    exchange = BearerExchange(XOAUTH2, b"INITIAL", initial_sent=True)
    assert exchange.respond(b"eyJzdGF0dXMiOiI0MDEifQ==") == b""
    assert exchange.respond(b"again") == b"*"
    assert exchange.challenges == [b"eyJzdGF0dXMiOiI0MDEifQ==", b"again"]


def test_an_error_challenge_gets_x01_with_oauthbearer() -> None:
    exchange = BearerExchange(OAUTHBEARER, b"INITIAL", initial_sent=True)
    assert exchange.respond(b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=") == b"AQ=="
    assert base64.b64decode(b"AQ==") == b"\x01"


def test_without_sasl_ir_the_first_continuation_gets_the_initial_response() -> None:
    exchange = BearerExchange(XOAUTH2, b"INITIAL", initial_sent=False)
    assert exchange.respond(b"") == b"INITIAL"
    assert exchange.respond(b"error") == b""
    assert exchange.respond(b"error") == b"*"
    assert exchange.challenges == [b"error", b"error"]
