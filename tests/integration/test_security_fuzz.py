"""Hostile input at a live session: arbitrary bytes, huge lines, NULs, invalid UTF-8 and random
command sequences, one line at a time, against the real bridge and Dovecot. Every line gets a
well-formed +OK/-ERR answer (or a SASL "+ " challenge), the session never sees another user's
mail, and the service keeps serving another client afterwards."""

from __future__ import annotations

import base64
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import Mailbox
from tests.harness import Pop3Client, ThreadedBridge, poplib_payload, wait_until
from tests.security_support import RawClient

MINE = b"Subject: mine\r\n\r\nFUZZ-OWN-MARKER\r\n.leading dot\r\n"
THEIRS = b"Subject: theirs\r\n\r\nOTHER-USER-SECRET-MARKER\r\n"

_COMMANDS = [
    b"CAPA", b"STAT", b"LIST", b"LIST 1", b"LIST 2", b"LIST 0", b"UIDL", b"UIDL 1", b"RETR 1",
    b"RETR 2", b"TOP 1 0", b"TOP 1 99999999999999999999", b"DELE 1", b"RSET", b"NOOP",
    b"USER", b"PASS", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"*", b"=",
    b"STLS", b"APOP x y", b"", b" ", b"LIST -1", b"RETR 1 2", b"TOP", b"QUIT",
]

_line = st.one_of(
    st.sampled_from(_COMMANDS),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.binary(min_size=200, max_size=2000).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"\0", b"USER \xff\xfe", b"PASS \x00x", b"RETR \xd9\xa1", b"\xc3\x28 CAPA"]),
    st.text(max_size=30).map(lambda t: t.replace("\n", "").encode("utf-8", "surrogatepass")),
)

_MULTILINE_OK = {b"CAPA", b"LIST", b"UIDL", b"RETR", b"TOP", b"AUTH"}


def _is_multiline(line: bytes, in_sasl: bool) -> bool:
    if in_sasl:
        return False
    words = line.split(b" ")
    keyword = words[0].upper()
    args = [w for w in words[1:] if w]
    if keyword in (b"LIST", b"UIDL", b"AUTH") and args:
        return False
    return keyword in _MULTILINE_OK


def _converse(client: RawClient, lines: list[bytes], max_line: int = 255) -> None:
    in_sasl = False
    for line in lines:
        if line.upper() == b"QUIT":
            break
        client.send(line + b"\r\n")
        status = client.status()
        too_long = len(line) + 2 > (8192 if in_sasl else max_line)
        if status.startswith(b"+ "):
            base64.b64decode(status[2:-2], validate=True)
            in_sasl = True
            continue
        assert status.startswith((b"+OK", b"-ERR")), (line, status)
        assert b"\r" not in status[:-2] and b"\n" not in status[:-2]
        if status.startswith(b"+OK") and not too_long and _is_multiline(line.strip(b"\r"), in_sasl):
            body = client.body()
            assert THEIRS.split(b"\r\n")[2] not in body
        if status.startswith(b"+OK begin TLS"):
            break  # the rest would have to be TLS
        in_sasl = False


def test_fuzzed_sessions_always_answer_and_never_leak(
    bridge_factory: Callable[..., ThreadedBridge], mailbox_factory: Callable[[], Mailbox]
) -> None:
    mine, theirs = mailbox_factory(), mailbox_factory()
    mine.append([MINE])
    theirs.append([THEIRS])
    bridge = bridge_factory(login_limits={"failure_delay_seconds": 0}, pool={"park_seconds": 0})

    def all_sessions_ended() -> bool:
        # A maildrop stays locked until its session has ended on the bridge's side, which
        # happens just after the client hangs up: the next login must not race it ([IN-USE]).
        names = [e.get("event") for e in bridge.events()]
        return names.count("session_end") >= names.count("session_start")

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.booleans(), st.lists(_line, max_size=25))
    def session(log_in: bool, lines: list[bytes]) -> None:
        with RawClient(bridge.port, timeout=30) as client:
            if log_in:
                client.login(mine.user, mine.password)
            _converse(client, lines)
        wait_until(all_sessions_ended, "the fuzzed session to end")
        # The other user's session is unaffected and sees exactly its own mail.
        with Pop3Client(bridge.port, theirs.user, theirs.password) as pop:
            assert poplib_payload(pop.retr(1)[1]) == THEIRS
        wait_until(all_sessions_ended, "the other user's session to end")

    session()
    # Nothing crashed inside the bridge, and nothing was deleted (no fuzzed session sent QUIT
    # after DELE: QUIT always ends the conversation before it is sent).
    assert not [e for e in bridge.events() if e.get("event") in ("session_crashed", "upstream_asyncio_error")]
    with Pop3Client(bridge.port, mine.user, mine.password) as pop:
        assert poplib_payload(pop.retr(1)[1]) == MINE
