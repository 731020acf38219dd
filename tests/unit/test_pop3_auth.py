"""The POP3 core's AUTH (RFC 5034, PLAIN and LOGIN), STLS (RFC 2595) and the plaintext-login
rule, as conversations: bytes in, bytes out, the events the I/O layer sees."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.pop3 import (
    NEED_DATA,
    Close,
    LocalProtocolError,
    LoginRequest,
    Pop3Server,
    Send,
    StartTls,
    State,
)
from tests.unit.test_pop3_connection import PASSWORD, USER, Harness

MECHANISMS = ("PLAIN", "LOGIN")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: str = USER, password: str = PASSWORD, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}".encode())


def server(**kwargs: object) -> Pop3Server:
    options: dict[str, object] = {"sasl_mechanisms": MECHANISMS}
    options.update(kwargs)
    return Pop3Server(**options)  # type: ignore[arg-type]


def harness(**kwargs: object) -> Harness:
    return Harness(server=server(**kwargs))


LOGGED_IN = b"+OK logged in.\r\n"
BAD_LOGIN = b"-ERR [AUTH] invalid user name or password\r\n"


# -- AUTH PLAIN -------------------------------------------------------------------------


def test_auth_plain_with_initial_response() -> None:
    h = harness()
    assert h.send(b"AUTH PLAIN " + plain() + b"\r\n") == LOGGED_IN
    assert h.server.state is State.TRANSACTION
    (request,) = h.requests
    assert request == LoginRequest(USER, PASSWORD, "PLAIN")


def test_auth_plain_with_continuation() -> None:
    h = harness()
    assert h.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert h.send(plain() + b"\r\n") == LOGGED_IN
    assert h.requests[0].mechanism == "PLAIN"


def test_auth_mechanism_name_is_case_insensitive() -> None:
    h = harness()
    assert h.send(b"auth plain " + plain() + b"\r\n") == LOGGED_IN


def test_auth_plain_wrong_password_then_user_pass_works() -> None:
    h = harness()
    assert h.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n") == BAD_LOGIN
    assert h.server.state is State.AUTHORIZATION
    assert h.send(b"USER alice\r\nPASS open sesame\r\n") == b"+OK send PASS\r\n" + LOGGED_IN


def test_auth_plain_authzid_equal_to_authcid_is_accepted() -> None:
    h = harness()
    assert h.send(b"AUTH PLAIN " + plain(authzid=USER) + b"\r\n") == LOGGED_IN


@pytest.mark.parametrize(
    ("response", "reply"),
    [
        (plain(authzid="root"), b"-ERR authorization identity not supported\r\n"),
        (b64(b"alice\0open sesame"), b"-ERR malformed PLAIN response\r\n"),
        (b64(b"\0alice\0open\0sesame"), b"-ERR malformed PLAIN response\r\n"),
        (b64(b"\0\0open sesame"), b"-ERR empty user name\r\n"),
        (b64(b"\0alice\0"), b"-ERR empty password\r\n"),
        (b64(b"\0ali\r\nce\0pw"), b"-ERR invalid character in user name\r\n"),
        (b64(b"\0alice\0p\nw"), b"-ERR invalid character in password\r\n"),
        (b"=", b"-ERR malformed PLAIN response\r\n"),
        (b"not-base64!", b"-ERR invalid base64 in authentication response\r\n"),
        (b"AGFsaWNl", b"-ERR malformed PLAIN response\r\n"),  # "\0alice"
        (b"AGFsaWNlAG9wZW4", b"-ERR invalid base64 in authentication response\r\n"),  # no padding
    ],
)
def test_auth_plain_bad_responses(response: bytes, reply: bytes) -> None:
    for h, wire in (
        (harness(), b"AUTH PLAIN " + response + b"\r\n"),
        (harness(), b"AUTH PLAIN\r\n" + response + b"\r\n"),
    ):
        out = h.send(wire)
        assert out.endswith(reply), out
        assert not h.requests
        assert h.server.state is State.AUTHORIZATION
        # The session goes on: a good login still works.
        assert h.send(b"AUTH PLAIN " + plain() + b"\r\n") == LOGGED_IN


def test_auth_utf8_and_invalid_utf8_credentials_are_lossless() -> None:
    h = harness()
    h.login = lambda request: h.server.reject_login("no", None)
    raw_user, raw_password = "jürgen".encode(), b"\xff\xfepw"
    h.send(b"AUTH PLAIN " + b64(b"\0" + raw_user + b"\0" + raw_password) + b"\r\n")
    request = h.requests[0]
    assert request.username.encode("utf-8", "surrogateescape") == raw_user
    assert request.password.encode("utf-8", "surrogateescape") == raw_password


# -- AUTH LOGIN -------------------------------------------------------------------------


def test_auth_login_exchange() -> None:
    h = harness()
    assert h.send(b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"  # "Username:"
    assert h.send(b64(USER.encode()) + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"  # "Password:"
    assert h.send(b64(PASSWORD.encode()) + b"\r\n") == LOGGED_IN
    assert h.requests == [LoginRequest(USER, PASSWORD, "LOGIN")]


def test_auth_login_with_initial_response_is_the_user_name() -> None:
    h = harness()
    assert h.send(b"AUTH LOGIN " + b64(USER.encode()) + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert h.send(b64(PASSWORD.encode()) + b"\r\n") == LOGGED_IN


def test_auth_login_pipelined_in_one_chunk() -> None:
    h = harness()
    wire = b"AUTH LOGIN\r\n" + b64(USER.encode()) + b"\r\n" + b64(PASSWORD.encode()) + b"\r\nSTAT\r\n"
    out = h.send(wire)
    assert out == b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n" + LOGGED_IN + b"+OK 3 %d\r\n" % sum(
        len(m) for m in h.messages
    )


@pytest.mark.parametrize("step", [0, 1])
def test_star_cancels_at_every_step(step: int) -> None:
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    if step:
        h.send(b64(USER.encode()) + b"\r\n")
    assert h.send(b"*\r\n") == b"-ERR authentication cancelled\r\n"
    assert not h.requests
    # The line after a cancel is a command again.
    assert h.send(b"NOOP\r\n") == b"-ERR not logged in\r\n"


def test_bad_base64_in_continuation() -> None:
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"USER alice\r\n") == b"-ERR invalid base64 in authentication response\r\n"
    assert h.send(b"CAPA\r\n").startswith(b"+OK")


def test_empty_user_name_in_login() -> None:
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"\r\n") == b"-ERR empty user name\r\n"


def test_continuation_line_may_exceed_the_command_limit() -> None:
    long_password = "p" * 600
    h = harness()
    h.login = lambda request: h.server.reject_login("checked", None)
    assert h.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    response = plain(password=long_password)
    assert len(response) > 255
    assert h.send(response + b"\r\n") == b"-ERR checked\r\n"
    assert h.requests[0].password == long_password
    # Back to the command limit afterwards.
    assert h.send(b"NOOP " + b"x" * 300 + b"\r\n") == b"-ERR line too long\r\n"


def test_continuation_line_over_its_own_bound_is_refused() -> None:
    h = harness()
    h.send(b"AUTH PLAIN\r\n")
    assert h.send(b"A" * 20000 + b"\r\n") == b"-ERR authentication response too long\r\n"
    assert not h.requests
    assert h.send(b"AUTH PLAIN " + plain() + b"\r\n") == LOGGED_IN


def test_initial_response_counts_against_the_command_limit() -> None:
    h = harness()
    assert h.send(b"AUTH PLAIN " + b"A" * 300 + b"\r\n") == b"-ERR line too long\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH CRAM-MD5", b"-ERR unsupported authentication mechanism\r\n"),
        (b"AUTH XOAUTH2 dGVzdA==", b"-ERR unsupported authentication mechanism\r\n"),
        (b"AUTH PLAIN a b", b"-ERR too many arguments\r\n"),
        (b"AUTH PL@IN", b"-ERR invalid authentication mechanism name\r\n"),
        (b"AUTH " + b"X" * 21, b"-ERR invalid authentication mechanism name\r\n"),
    ],
)
def test_bad_auth_commands(line: bytes, reply: bytes) -> None:
    h = harness()
    assert h.send(line + b"\r\n") == reply
    assert h.server.state is State.AUTHORIZATION


def test_bare_auth_lists_the_mechanisms() -> None:
    h = harness()
    assert h.send(b"AUTH\r\n") == b"+OK supported authentication mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_auth_without_configured_mechanisms_is_unsupported() -> None:
    h = Harness()
    assert h.send(b"AUTH PLAIN " + plain() + b"\r\n") == b"-ERR unsupported authentication mechanism\r\n"


def test_auth_after_login_is_refused() -> None:
    h = harness()
    h.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert h.send(b"AUTH PLAIN " + plain() + b"\r\n") == b"-ERR already logged in\r\n"
    assert len(h.requests) == 1


def test_auth_uses_up_a_pending_user() -> None:
    h = harness()
    h.send(b"USER alice\r\n")
    h.send(b"AUTH\r\n")
    assert h.send(b"PASS open sesame\r\n") == b"-ERR send USER first\r\n"


def test_eof_in_the_middle_of_an_exchange_closes_without_login() -> None:
    h = harness()
    h.send(b"AUTH LOGIN\r\n" + b64(USER.encode()) + b"\r\n")
    h.eof()
    assert h.closed and not h.requests


def test_unknown_mechanism_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="unsupported SASL"):
        Pop3Server(sasl_mechanisms=["GSSAPI"])


def test_the_auth_command_hides_its_initial_response_in_repr() -> None:
    from bridge.pop3 import parse_command

    parsed = parse_command(b"AUTH PLAIN " + plain())
    assert PASSWORD not in repr(parsed) and plain().decode() not in repr(parsed)


# -- CAPA and the plaintext rule ----------------------------------------------------------


def capabilities(h: Harness) -> list[bytes]:
    out = h.send(b"CAPA\r\n")
    assert out.startswith(b"+OK") and out.endswith(b".\r\n")
    return out.split(b"\r\n")[1:-2]


def test_capa_lists_sasl_when_logins_are_allowed() -> None:
    caps = capabilities(harness())
    assert b"USER" in caps and b"SASL PLAIN LOGIN" in caps and b"STLS" not in caps


def test_capa_offers_stls_before_tls_only() -> None:
    h = harness(stls_available=True)
    assert b"STLS" in capabilities(h)
    assert b"STLS" not in capabilities(harness(stls_available=True, tls_active=True))


def test_capa_hides_logins_that_would_be_refused() -> None:
    caps = capabilities(harness(plaintext_auth_allowed=False, stls_available=True))
    assert b"USER" not in caps and not any(c.startswith(b"SASL") for c in caps)
    assert b"STLS" in caps


def test_tls_makes_logins_available() -> None:
    caps = capabilities(harness(plaintext_auth_allowed=False, tls_active=True))
    assert b"USER" in caps and b"SASL PLAIN LOGIN" in caps


STLS_HINT = b"-ERR [AUTH] plaintext authentication is disabled on unencrypted connections; use STLS first\r\n"
TLS_HINT = b"-ERR [AUTH] plaintext authentication is disabled on unencrypted connections; connect with TLS\r\n"


@pytest.mark.parametrize(
    "line",
    [b"USER alice", b"PASS open sesame", b"AUTH PLAIN " + plain(), b"AUTH LOGIN", b"AUTH"],
)
@pytest.mark.parametrize(("stls", "hint"), [(True, STLS_HINT), (False, TLS_HINT)])
def test_plaintext_logins_refused_with_guidance(line: bytes, stls: bool, hint: bytes) -> None:
    h = harness(plaintext_auth_allowed=False, stls_available=stls)
    assert h.send(line + b"\r\n") == hint
    assert not h.requests


def test_user_pass_refusal_does_not_leave_a_pending_user() -> None:
    h = harness(plaintext_auth_allowed=False)
    h.send(b"USER alice\r\nPASS open sesame\r\n")
    assert not h.requests


# -- STLS -----------------------------------------------------------------------------------


def events_until_need(srv: Pop3Server) -> list[object]:
    events: list[object] = []
    while True:
        event = srv.next_event()
        events.append(event)
        if event is NEED_DATA or isinstance(event, (StartTls, Close, LoginRequest)):
            return events


def test_stls_then_login() -> None:
    srv = server(stls_available=True, plaintext_auth_allowed=False)
    srv.receive_data(b"STLS\r\n")
    (event,) = events_until_need(srv)
    assert event == StartTls(b"+OK begin TLS negotiation\r\n")
    with pytest.raises(LocalProtocolError):
        srv.next_event()  # nothing goes on until TLS is up or failed
    srv.tls_established()
    assert srv.tls_active
    srv.receive_data(b"AUTH PLAIN " + plain() + b"\r\n")
    (request,) = events_until_need(srv)
    assert request == LoginRequest(USER, PASSWORD, "PLAIN")


def test_stls_discards_pipelined_plaintext_commands() -> None:
    # The STARTTLS command-injection attack: whatever follows STLS in the clear must never run.
    srv = server(stls_available=True)
    srv.receive_data(b"STLS\r\nUSER mallory\r\nPASS evil\r\nCAPA\r\nQUIT\r\npartial")
    assert isinstance(srv.next_event(), StartTls)
    srv.tls_established()
    assert srv.next_event() is NEED_DATA
    # The first command over TLS is answered as the first command of a new session.
    srv.receive_data(b"PASS evil\r\n")
    assert srv.next_event() == Send(b"-ERR send USER first\r\n")


def test_stls_forgets_a_user_given_before_it() -> None:
    srv = server(stls_available=True)
    srv.receive_data(b"USER alice\r\n")
    srv.next_event()
    srv.receive_data(b"STLS\r\n")
    assert isinstance(srv.next_event(), StartTls)
    srv.tls_established()
    srv.receive_data(b"PASS open sesame\r\n")
    assert srv.next_event() == Send(b"-ERR send USER first\r\n")


def test_capa_after_stls_is_the_new_list() -> None:
    srv = server(stls_available=True, plaintext_auth_allowed=False)
    srv.receive_data(b"CAPA\r\n")
    before = srv.next_event()
    srv.receive_data(b"STLS\r\n")
    assert isinstance(srv.next_event(), StartTls)
    srv.tls_established()
    srv.receive_data(b"CAPA\r\n")
    after = srv.next_event()
    assert isinstance(before, Send) and isinstance(after, Send)
    assert b"STLS\r\n" in before.data and b"USER\r\n" not in before.data
    assert b"STLS\r\n" not in after.data and b"USER\r\n" in after.data and b"SASL PLAIN LOGIN\r\n" in after.data


def test_stls_twice_is_refused() -> None:
    h = harness(stls_available=True, tls_active=True)
    assert h.send(b"STLS\r\n") == b"-ERR TLS is already active\r\n"


def test_stls_without_a_certificate_is_refused() -> None:
    h = harness()
    assert h.send(b"STLS\r\n") == b"-ERR STLS not available\r\n"


def test_stls_after_login_is_refused() -> None:
    h = harness(stls_available=True)
    h.send(b"USER alice\r\nPASS open sesame\r\n")
    assert h.send(b"STLS\r\n") == b"-ERR already logged in\r\n"


def test_stls_with_argument() -> None:
    h = harness(stls_available=True)
    assert h.send(b"STLS now\r\n") == b"-ERR too many arguments\r\n"


def test_failed_tls_closes_the_session() -> None:
    srv = server(stls_available=True)
    srv.receive_data(b"STLS\r\n")
    srv.next_event()
    srv.tls_failed()
    assert srv.state is State.CLOSED
    assert isinstance(srv.next_event(), Close)


def test_tls_answers_only_after_stls() -> None:
    srv = server(stls_available=True)
    with pytest.raises(LocalProtocolError):
        srv.tls_established()
    with pytest.raises(LocalProtocolError):
        srv.tls_failed()


# -- properties -------------------------------------------------------------------------

_PIECES = [
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH\r\n",
    b"AUTH PLAIN " + plain() + b"\r\n",
    plain() + b"\r\n",
    b64(USER.encode()) + b"\r\n",
    b64(PASSWORD.encode()) + b"\r\n",
    b"*\r\n",
    b"=\r\n",
    b"STLS\r\n",
    b"USER alice\r\n",
    b"PASS open sesame\r\n",
    b"CAPA\r\n",
    b"STAT\r\n",
    b"QUIT\r\n",
    b"\r\n",
    b"\0",
    b"A" * 300,
    b"\xff\xfe",
]
_client_bytes = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=12), max_size=30).map(b"".join)


def _well_framed(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    first = lines[0]
    if first.startswith(b"+ "):
        assert len(lines) == 1
        base64.b64decode(first[2:], validate=True)
        return
    assert first == b"+OK" or first.startswith((b"+OK ", b"-ERR")), first
    if len(lines) > 1:
        assert lines[-1] == b"." and first.startswith(b"+OK")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _client_bytes,
    st.booleans(),
    st.booleans(),
    st.sampled_from(["accept", "reject", "tls-ok", "tls-fail"]),
)
def test_property_auth_and_stls_always_answer_well_framed(
    data: bytes, plaintext_allowed: bool, stls: bool, policy: str
) -> None:
    srv = server(plaintext_auth_allowed=plaintext_allowed, stls_available=stls)
    h = Harness(server=srv)
    original = srv.next_event

    def checked() -> object:
        event = original()
        if isinstance(event, Send):
            _well_framed(event.data)
        if isinstance(event, StartTls):
            _well_framed(event.data)
            # Answer at once, as the session would after the handshake.
            if policy == "tls-fail":
                srv.tls_failed()
            else:
                srv.tls_established()
            return Send(event.data)
        if isinstance(event, LoginRequest):
            # Only logins that the rule allows ever reach the I/O layer.
            assert plaintext_allowed or srv.tls_active
        return event

    srv.next_event = checked  # type: ignore[method-assign]
    if policy == "reject":
        h.login = lambda request: srv.reject_login("no", None)
    for i in range(0, len(data), 7):
        srv.receive_data(data[i : i + 7])
        h.pump()
    h.eof()
    assert h.closed
