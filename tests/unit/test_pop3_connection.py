"""Pop3Server: whole conversations, bytes in and bytes out, as a client sees them.

`Harness` plays the I/O layer: it feeds the client's bytes to the core,
answers the core's requests from an in-memory mailbox, and records every byte
the core wants sent.  Tests assert on those bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.pop3 import (
    NEED_DATA,
    Close,
    CommitRequest,
    LocalProtocolError,
    LoginRequest,
    Maildrop,
    MaildropEntry,
    Pop3Server,
    ResponseCode,
    RetrieveRequest,
    Send,
    State,
)
from bridge.pop3.maildrop import MessageList

M1 = b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n.\r\nBye\r\n"
M2 = b"Subject: two\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(1, 6))
M3 = b"Subject: three\r\n\r\n.no final newline"
MESSAGES = [M1, M2, M3]
USER = "alice"
PASSWORD = "open sesame"
LOGIN = b"USER alice\r\nPASS open sesame\r\n"
LOGGED_IN = b"+OK send PASS\r\n+OK logged in.\r\n"
GREETING = b"+OK pop3-imap-bridge ready.\r\n"
CAPA = (
    b"+OK capability list follows\r\n"
    b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
    b"IMPLEMENTATION pop3-imap-bridge\r\n.\r\n"
)


def _lines(data: bytes) -> list[bytes]:
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


def client_read(wire: bytes) -> bytes:
    """Read a multi-line body back the way a client does: unstuff, stop at the terminator."""
    lines = _lines(wire)
    assert lines and lines[-1] == b".\r\n" and b".\r\n" not in lines[:-1]
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines[:-1])


def completed(message: bytes) -> bytes:
    return message + b"\r\n" if message and not message.endswith(b"\n") else message


def top_of(message: bytes, body_lines: int) -> bytes:
    lines = _lines(message)
    for i, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return b"".join(lines[: i + 1 + body_lines])
    return message


def entries(messages: list[bytes]) -> list[MaildropEntry]:
    return [MaildropEntry(size=len(m), unique_id=f"uid{i}", ref=i) for i, m in enumerate(messages)]


class Harness:
    """A stand-in for the Trio session layer, driving one Pop3Server."""

    def __init__(
        self,
        messages: list[bytes] | None = None,
        *,
        server: Pop3Server | None = None,
        body_chunk: int = 5,
    ) -> None:
        self.server = server if server is not None else Pop3Server()
        self.messages = MESSAGES if messages is None else messages
        self.body_chunk = body_chunk
        self.out = bytearray()
        self.writes: list[bytes] = []
        self.requests: list[object] = []
        self.commits: list[tuple[MaildropEntry, ...]] = []
        self.closed = False
        # Hooks a test may replace to answer requests differently.
        self.login: Callable[[LoginRequest], bytes] = self._login
        self.retrieve: Callable[[RetrieveRequest], None] = self._retrieve
        self.commit: Callable[[CommitRequest], bytes] = self._commit

    def send(self, data: bytes, chunk: int | None = None) -> bytes:
        """The client sends `data`, `chunk` bytes per read; returns the server's reply bytes."""
        start = len(self.out)
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            self.server.receive_data(data[i : i + step])
            self.pump()
        return bytes(self.out[start:])

    def eof(self) -> bytes:
        start = len(self.out)
        self.server.receive_data(b"")
        self.pump()
        return bytes(self.out[start:])

    def pump(self) -> None:
        while True:
            event = self.server.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Close):
                self.closed = True
                return
            if isinstance(event, Send):
                assert event.data, "empty Send"
                self.out += event.data
                self.writes.append(event.data)
                for piece in event.rest:
                    self.out += piece
                    self.writes.append(piece)
                continue
            self.requests.append(event)
            if isinstance(event, LoginRequest):
                self.out += self.login(event)
            elif isinstance(event, RetrieveRequest):
                self.retrieve(event)
            elif isinstance(event, CommitRequest):
                self.commits.append(event.marked)
                self.out += self.commit(event)
            else:  # pragma: no cover
                raise AssertionError(f"unknown event {event!r}")

    def _login(self, request: LoginRequest) -> bytes:
        if (request.username, request.password) == (USER, PASSWORD):
            return self.server.accept_login(Maildrop(entries(self.messages)))
        return self.server.reject_login("invalid user name or password", ResponseCode.AUTH)

    def _retrieve(self, request: RetrieveRequest) -> None:
        body = self.messages[request.entry.ref]
        self.out += self.server.start_message()
        encoder = self.server.message_body_encoder()
        wire = bytearray()
        for i in range(0, len(body), self.body_chunk):
            if encoder.done:
                break
            wire += encoder.feed(body[i : i + self.body_chunk])
        wire += encoder.finish()
        self.server.end_message()
        # Whatever the test, a client must be able to read the body back.
        expected = body if request.body_lines is None else top_of(body, request.body_lines)
        assert client_read(bytes(wire)) == completed(expected)
        self.out += wire

    def _commit(self, request: CommitRequest) -> bytes:
        return self.server.commit_succeeded()


def logged_in(messages: list[bytes] | None = None, **kwargs: object) -> Harness:
    harness = Harness(messages, **kwargs)  # type: ignore[arg-type]
    assert harness.send(LOGIN) == LOGGED_IN
    return harness


def converse(harness: Harness, transcript: list[tuple[bytes, bytes]]) -> None:
    for client, server in transcript:
        assert harness.send(client) == server, client


FULL_SESSION: list[tuple[bytes, bytes]] = [
    (b"CAPA\r\n", CAPA),
    (b"USER alice\r\n", b"+OK send PASS\r\n"),
    (b"PASS open sesame\r\n", b"+OK logged in.\r\n"),
    (b"STAT\r\n", b"+OK 3 %d\r\n" % sum(map(len, MESSAGES))),
    (b"LIST\r\n", b"+OK 3 messages:\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % tuple(map(len, MESSAGES))),
    (b"LIST 2\r\n", b"+OK 2 %d\r\n" % len(M2)),
    (b"UIDL\r\n", b"+OK\r\n1 uid0\r\n2 uid1\r\n3 uid2\r\n.\r\n"),
    (b"UIDL 3\r\n", b"+OK 3 uid2\r\n"),
    (
        b"RETR 1\r\n",
        b"+OK %d octets\r\n" % len(M1)
        + b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n..\r\nBye\r\n.\r\n",
    ),
    (b"TOP 2 1\r\n", b"+OK\r\nSubject: two\r\n\r\nline 1\r\n.\r\n"),
    (b"TOP 3 0\r\n", b"+OK\r\nSubject: three\r\n\r\n.\r\n"),
    (b"TOP 3 5\r\n", b"+OK\r\nSubject: three\r\n\r\n..no final newline\r\n.\r\n"),
    (b"RETR 3\r\n", b"+OK %d octets\r\n" % len(M3) + M3.replace(b"\n.", b"\n..") + b"\r\n.\r\n"),
    (b"DELE 1\r\n", b"+OK message 1 deleted\r\n"),
    (b"STAT\r\n", b"+OK 2 %d\r\n" % (len(M2) + len(M3))),
    (b"LIST\r\n", b"+OK 2 messages:\r\n2 %d\r\n3 %d\r\n.\r\n" % (len(M2), len(M3))),
    (b"UIDL\r\n", b"+OK\r\n2 uid1\r\n3 uid2\r\n.\r\n"),
    (b"RETR 1\r\n", b"-ERR message 1 already deleted\r\n"),
    (b"NOOP\r\n", b"+OK\r\n"),
    (b"RSET\r\n", b"+OK\r\n"),
    (b"STAT\r\n", b"+OK 3 %d\r\n" % sum(map(len, MESSAGES))),
    (b"CAPA\r\n", CAPA),
    (b"DELE 2\r\n", b"+OK message 2 deleted\r\n"),
    (b"QUIT\r\n", b"+OK bye\r\n"),
]
FULL_INPUT = b"".join(client for client, _ in FULL_SESSION)
FULL_OUTPUT = b"".join(server for _, server in FULL_SESSION)


# -- whole conversations --------------------------------------------------------


def test_greeting() -> None:
    assert Pop3Server().greeting() == GREETING
    assert Pop3Server(implementation="bridge-1.0").greeting() == b"+OK bridge-1.0 ready.\r\n"


def test_full_session_transcript() -> None:
    harness = Harness()
    assert harness.server.state is State.AUTHORIZATION
    converse(harness, FULL_SESSION)
    assert harness.commits == [(entries(MESSAGES)[1],)]
    assert harness.closed
    assert harness.server.state is State.CLOSED


def test_full_session_pipelined_in_one_chunk() -> None:
    harness = Harness()
    assert harness.send(FULL_INPUT) == FULL_OUTPUT
    assert harness.commits == [(entries(MESSAGES)[1],)]
    assert harness.closed


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_full_session_in_small_chunks(chunk: int) -> None:
    harness = Harness()
    assert harness.send(FULL_INPUT, chunk=chunk) == FULL_OUTPUT
    assert harness.commits == [(entries(MESSAGES)[1],)]


@pytest.mark.parametrize("body_chunk", [1, 2, 1000])
def test_body_chunking_does_not_change_the_wire(body_chunk: int) -> None:
    harness = Harness(body_chunk=body_chunk)
    assert harness.send(FULL_INPUT) == FULL_OUTPUT


def test_rough_session_byte_at_a_time_matches_whole() -> None:
    rough = (
        b"noop\r\nPASS x\r\nUSER alice\r\nPASS wrong\r\n\r\nXYZ\r\n"
        + b"A" * 600
        + b"\r\nUSER alice\nPASS open sesame\n"
        + b"list 0\r\nretr 9\r\ntop 1\r\nDELE 1\0\r\ndele 3\r\ndele 3\r\nuidl\r\n"
        + b"user bob\r\nstat\r\nquit\r\nNOOP\r\n"
    )
    whole, single = Harness(), Harness()
    assert whole.send(rough) == single.send(rough, chunk=1)
    assert whole.commits == single.commits == [(entries(MESSAGES)[2],)]


def test_mixed_line_endings() -> None:
    harness = Harness()
    assert harness.send(
        b"USER alice\nPASS open sesame\r\nSTAT\n"
    ) == LOGGED_IN + b"+OK 3 %d\r\n" % sum(map(len, MESSAGES))


# -- AUTHORIZATION ------------------------------------------------------------


def test_wrong_password_then_retry() -> None:
    harness = Harness()
    converse(
        harness,
        [
            (b"USER alice\r\n", b"+OK send PASS\r\n"),
            (b"PASS nope\r\n", b"-ERR [AUTH] invalid user name or password\r\n"),
            # A failed login uses up the user name: the client starts over.
            (b"PASS open sesame\r\n", b"-ERR send USER first\r\n"),
            (b"STAT\r\n", b"-ERR not logged in\r\n"),
            (LOGIN, LOGGED_IN),
        ],
    )
    assert harness.server.state is State.TRANSACTION


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (ResponseCode.AUTH, b"-ERR [AUTH] no\r\n"),
        (ResponseCode.SYS_TEMP, b"-ERR [SYS/TEMP] no\r\n"),
        (ResponseCode.SYS_PERM, b"-ERR [SYS/PERM] no\r\n"),
        (ResponseCode.IN_USE, b"-ERR [IN-USE] no\r\n"),
        (ResponseCode.LOGIN_DELAY, b"-ERR [LOGIN-DELAY] no\r\n"),
        (None, b"-ERR no\r\n"),
    ],
)
def test_reject_login_with_each_code(code: ResponseCode | None, wire: bytes) -> None:
    harness = Harness()
    harness.login = lambda request: harness.server.reject_login("no", code)
    assert harness.send(LOGIN) == b"+OK send PASS\r\n" + wire
    assert harness.server.state is State.AUTHORIZATION


def test_login_request_carries_the_credentials() -> None:
    harness = Harness()
    harness.send(b"USER alice\r\nPASS  pass with  spaces \r\n")
    request = harness.requests[0]
    assert request == LoginRequest("alice", " pass with  spaces ")
    assert "pass with" not in repr(request)


def test_login_with_invalid_utf8_is_lossless() -> None:
    harness = Harness()
    harness.send(b"USER \xffal\xe9\r\nPASS p\xc3\x28\r\n")
    request = harness.requests[0]
    assert isinstance(request, LoginRequest)
    assert request.username.encode("utf-8", "surrogateescape") == b"\xffal\xe9"
    assert request.password.encode("utf-8", "surrogateescape") == b"p\xc3\x28"


@pytest.mark.parametrize(
    "between",
    [
        b"NOOP\r\n",
        b"CAPA\r\n",
        b"XYZZY\r\n",
        b"\r\n",
        b"USER\r\n",
        b"STAT\0\r\n",
        b"A" * 300 + b"\r\n",
    ],
)
def test_pass_must_come_right_after_user(between: bytes) -> None:
    harness = Harness()
    harness.send(b"USER alice\r\n" + between)
    assert harness.send(b"PASS open sesame\r\n") == b"-ERR send USER first\r\n"
    assert harness.requests == []


def test_second_user_replaces_the_first() -> None:
    harness = Harness()
    assert harness.send(b"USER bob\r\nUSER alice\r\nPASS open sesame\r\n") == (
        b"+OK send PASS\r\n" + LOGGED_IN
    )


def test_pass_without_user() -> None:
    harness = Harness()
    assert harness.send(b"PASS open sesame\r\n") == b"-ERR send USER first\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"USER\r\n", b"-ERR missing user name\r\n"),
        (b"USER \r\n", b"-ERR missing user name\r\n"),
        (b"PASS\r\n", b"-ERR missing password\r\n"),
        (b"CAPA x\r\n", b"-ERR too many arguments\r\n"),
        (b"QUIT x\r\n", b"-ERR too many arguments\r\n"),
    ],
)
def test_bad_arguments_before_login(line: bytes, reply: bytes) -> None:
    harness = Harness()
    assert harness.send(line) == reply
    assert harness.server.state is State.AUTHORIZATION


TRANSACTION_ONLY = [
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"LIST 0",
    b"LIST x",
    b"RETR 1",
    b"RETR",
    b"RETR 0",
    b"DELE 1",
    b"NOOP",
    b"NOOP x",
    b"RSET",
    b"TOP 1 1",
    b"TOP",
    b"TOP 1",
    b"UIDL",
    b"UIDL 1",
    b"uidl 99",
]


@pytest.mark.parametrize("line", TRANSACTION_ONLY)
def test_transaction_commands_before_login(line: bytes) -> None:
    harness = Harness()
    assert harness.send(line + b"\r\n") == b"-ERR not logged in\r\n"
    assert harness.server.state is State.AUTHORIZATION
    assert harness.requests == []
    assert not harness.closed


def test_capa_before_and_after_login_with_extras() -> None:
    server = Pop3Server(
        implementation="bridge-x", extra_capabilities=["EXPIRE NEVER", "LOGIN-DELAY 0"]
    )
    harness = Harness(server=server)
    expected = (
        b"+OK capability list follows\r\n"
        b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"EXPIRE NEVER\r\nLOGIN-DELAY 0\r\nIMPLEMENTATION bridge-x\r\n.\r\n"
    )
    assert harness.send(b"CAPA\r\n") == expected
    harness.send(LOGIN)
    assert harness.send(b"capa\r\n") == expected


def test_quit_before_login() -> None:
    harness = Harness()
    assert harness.send(b"QUIT\r\nSTAT\r\nUSER alice\r\n") == b"+OK bye\r\n"
    assert harness.closed
    assert harness.commits == []
    assert harness.server.state is State.CLOSED


# -- TRANSACTION ------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"USER alice", b"USER bob", b"PASS x", b"USER", b"PASS"])
def test_user_and_pass_after_login(line: bytes) -> None:
    harness = logged_in()
    assert harness.send(line + b"\r\n") == b"-ERR already logged in\r\n"
    assert harness.server.state is State.TRANSACTION
    assert len(harness.requests) == 1


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"LIST 1", b"+OK 1 %d" % len(M1)),
        (b"LIST 3", b"+OK 3 %d" % len(M3)),
        (b"LIST 4", b"-ERR no such message"),
        (b"LIST 0", b"-ERR no such message"),
        (b"LIST 18446744073709551617", b"-ERR no such message"),
        (b"LIST " + b"9" * 240, b"-ERR no such message"),
        (b"UIDL 1", b"+OK 1 uid0"),
        (b"UIDL 3", b"+OK 3 uid2"),
        (b"UIDL 4", b"-ERR no such message"),
        (b"UIDL 0", b"-ERR no such message"),
        (b"RETR 4", b"-ERR no such message"),
        (b"RETR 0", b"-ERR no such message"),
        (b"TOP 4 1", b"-ERR no such message"),
        (b"TOP 0 0", b"-ERR no such message"),
        (b"DELE 4", b"-ERR no such message"),
        (b"DELE 0", b"-ERR no such message"),
        (b"LIST x", b"-ERR invalid message number"),
        (b"LIST -1", b"-ERR invalid message number"),
        (b"LIST 1 2", b"-ERR too many arguments"),
        (b"RETR", b"-ERR missing message number"),
        (b"RETR 1 2", b"-ERR too many arguments"),
        (b"RETR one", b"-ERR invalid message number"),
        (b"DELE", b"-ERR missing message number"),
        (b"DELE +1", b"-ERR invalid message number"),
        (b"TOP", b"-ERR missing message number"),
        (b"TOP 1", b"-ERR missing line count"),
        (b"TOP 1 -1", b"-ERR invalid line count"),
        (b"TOP 1 x", b"-ERR invalid line count"),
        (b"TOP 1 1 1", b"-ERR too many arguments"),
        (b"STAT 1", b"-ERR too many arguments"),
        (b"NOOP 1", b"-ERR too many arguments"),
        (b"RSET 1", b"-ERR too many arguments"),
        (b"QUIT 1", b"-ERR too many arguments"),
        (b"UIDL 1 2", b"-ERR too many arguments"),
        (b"XYZZY", b"-ERR unknown command"),
        (b"LAST", b"-ERR unknown command"),
        (b"", b"-ERR empty command"),
    ],
)
def test_single_replies_in_transaction(line: bytes, reply: bytes) -> None:
    harness = logged_in()
    assert harness.send(line + b"\r\n") == reply + b"\r\n"
    assert harness.server.state is State.TRANSACTION
    assert harness.requests == [LoginRequest(USER, PASSWORD)]


@pytest.mark.parametrize(
    "line", [b"LIST 2", b"UIDL 2", b"RETR 2", b"TOP 2 0", b"DELE 2", b"list 02"]
)
def test_marked_message_is_already_deleted(line: bytes) -> None:
    harness = logged_in()
    harness.send(b"DELE 2\r\n")
    assert harness.send(line + b"\r\n") == b"-ERR message 2 already deleted\r\n"


def test_retrieve_request_fields() -> None:
    harness = logged_in()
    harness.send(b"RETR 2\r\nTOP 3 7\r\nTOP 1 " + b"9" * 30 + b"\r\n")
    first, second, third = harness.requests[1:]
    assert first == RetrieveRequest(2, entries(MESSAGES)[1], None)
    assert second == RetrieveRequest(3, entries(MESSAGES)[2], 7)
    assert isinstance(third, RetrieveRequest) and third.body_lines is not None
    assert third.body_lines >= 2**63 - 1


def test_top_with_huge_line_count_sends_everything() -> None:
    harness = logged_in()
    assert (
        harness.send(b"TOP 1 " + b"9" * 100 + b"\r\n")
        == b"+OK\r\n" + M1.replace(b"\n.", b"\n..") + b".\r\n"
    )


def test_top_of_message_without_blank_line() -> None:
    harness = logged_in([b"Subject: only a header\r\nX: y\r\n"])
    assert harness.send(b"TOP 1 0\r\n") == b"+OK\r\nSubject: only a header\r\nX: y\r\n.\r\n"


def test_empty_message() -> None:
    harness = logged_in([b""])
    assert harness.send(b"RETR 1\r\nTOP 1 0\r\n") == b"+OK 0 octets\r\n.\r\n+OK\r\n.\r\n"


def test_empty_maildrop() -> None:
    harness = logged_in([])
    converse(
        harness,
        [
            (b"STAT\r\n", b"+OK 0 0\r\n"),
            (b"LIST\r\n", b"+OK 0 messages:\r\n.\r\n"),
            (b"UIDL\r\n", b"+OK\r\n.\r\n"),
            (b"RETR 1\r\n", b"-ERR no such message\r\n"),
            (b"QUIT\r\n", b"+OK bye\r\n"),
        ],
    )
    assert harness.commits == [()]


def _huge_maildrop_session(count: int) -> tuple[Harness, MessageList]:
    shared = MessageList([1000 + n for n in range(count)], [f"uid-{n}" for n in range(count)], list(range(count)))
    harness = Harness()
    harness.login = lambda request: harness.server.accept_login(Maildrop(shared))
    assert harness.send(LOGIN) == LOGGED_IN
    return harness, shared


def _expected_listing(numbers_and_values: list[tuple[int, object]]) -> bytes:
    return b"".join(b"%d %s\r\n" % (n, str(v).encode()) for n, v in numbers_and_values)


def test_listing_of_a_huge_maildrop_goes_out_in_pieces() -> None:
    count = 20_000
    harness, shared = _huge_maildrop_session(count)
    uidl = harness.send(b"UIDL\r\n")
    assert uidl == b"+OK\r\n" + _expected_listing([(n + 1, f"uid-{n}") for n in range(count)]) + b".\r\n"
    # Unmarked: the listing every session of this maildrop shares goes out as it is.
    assert any(write is shared.all_lines(unique_ids=True) for write in harness.writes)
    harness.writes.clear()
    for number in range(1, count + 1, 2):
        harness.send(b"DELE %d\r\n" % number)
    harness.writes.clear()
    listing = harness.send(b"LIST\r\n")
    kept = [(n, 1000 + n - 1) for n in range(2, count + 1, 2)]
    assert listing == b"+OK %d messages:\r\n" % len(kept) + _expected_listing(kept) + b".\r\n"
    # Marked: made a bounded number of lines at a time, never as one string.
    assert len(harness.writes) > 2
    assert max(len(write) for write in harness.writes) < len(listing) // 2
    assert harness.send(b"LIST 3\r\n") == b"-ERR message 3 already deleted\r\n"


def test_listing_of_a_small_maildrop_is_one_write() -> None:
    harness = logged_in()
    harness.writes.clear()
    harness.send(b"UIDL\r\n")
    assert harness.writes == [b"+OK\r\n1 uid0\r\n2 uid1\r\n3 uid2\r\n.\r\n"]


def test_every_message_deleted() -> None:
    harness = logged_in()
    converse(
        harness,
        [
            (
                b"DELE 1\r\nDELE 2\r\nDELE 3\r\n",
                b"".join(b"+OK message %d deleted\r\n" % n for n in (1, 2, 3)),
            ),
            (b"STAT\r\n", b"+OK 0 0\r\n"),
            (b"LIST\r\n", b"+OK 0 messages:\r\n.\r\n"),
            (b"QUIT\r\n", b"+OK bye\r\n"),
        ],
    )
    assert harness.commits == [tuple(entries(MESSAGES))]


def test_quit_with_nothing_marked_still_asks_to_commit() -> None:
    harness = logged_in()
    assert harness.send(b"QUIT\r\n") == b"+OK bye\r\n"
    assert harness.commits == [()]
    assert harness.closed


def test_rset_then_quit_commits_nothing() -> None:
    harness = logged_in()
    harness.send(b"DELE 1\r\nRSET\r\nQUIT\r\n")
    assert harness.commits == [()]


def test_commit_failed() -> None:
    harness = logged_in()
    harness.commit = lambda request: harness.server.commit_failed("could not delete messages")
    assert harness.send(b"DELE 1\r\nQUIT\r\nNOOP\r\n") == (
        b"+OK message 1 deleted\r\n-ERR [SYS/TEMP] could not delete messages\r\n"
    )
    assert harness.closed
    assert harness.server.state is State.CLOSED


def test_commit_failed_with_other_code() -> None:
    harness = logged_in()
    harness.commit = lambda request: harness.server.commit_failed("gone", ResponseCode.SYS_PERM)
    assert harness.send(b"QUIT\r\n") == b"-ERR [SYS/PERM] gone\r\n"


def test_states_through_a_session() -> None:
    harness = Harness()
    seen: list[State] = []

    def commit(request: CommitRequest) -> bytes:
        seen.append(harness.server.state)
        return harness.server.commit_succeeded()

    harness.commit = commit
    assert harness.server.state is State.AUTHORIZATION
    harness.send(LOGIN)
    assert harness.server.state is State.TRANSACTION
    harness.send(b"QUIT\r\n")
    assert seen == [State.UPDATE]
    assert harness.server.state is State.CLOSED


# -- retrieval answers ----------------------------------------------------------


def test_refuse_message_keeps_the_session() -> None:
    harness = logged_in()
    harness.retrieve = lambda request: harness.out.extend(
        harness.server.refuse_message("message vanished", ResponseCode.SYS_TEMP)
    )
    assert harness.send(b"RETR 1\r\nSTAT\r\n") == (
        b"-ERR [SYS/TEMP] message vanished\r\n+OK 3 %d\r\n" % sum(map(len, MESSAGES))
    )
    assert harness.server.state is State.TRANSACTION


def test_refuse_message_without_code() -> None:
    harness = logged_in()
    harness.retrieve = lambda request: harness.out.extend(harness.server.refuse_message("gone"))
    assert harness.send(b"TOP 1 1\r\n") == b"-ERR gone\r\n"


def test_abort_message_closes_without_commit() -> None:
    harness = logged_in()

    def broken(request: RetrieveRequest) -> None:
        harness.out += harness.server.start_message()
        harness.out += harness.server.message_body_encoder().feed(b"Subject: one\r\n")
        harness.server.abort_message()

    harness.retrieve = broken
    out = harness.send(b"DELE 2\r\nRETR 1\r\nQUIT\r\n")
    assert out == b"+OK message 2 deleted\r\n+OK %d octets\r\nSubject: one\r\n" % len(M1)
    assert harness.closed
    assert harness.commits == []
    assert harness.server.state is State.CLOSED


def test_abort_before_start() -> None:
    harness = logged_in()
    harness.retrieve = lambda request: harness.server.abort_message()
    assert harness.send(b"RETR 1\r\nQUIT\r\n") == b""
    assert harness.closed and harness.commits == []


# -- input edges ----------------------------------------------------------------


def test_line_exactly_at_the_cap() -> None:
    harness = Harness()
    line = b"USER " + b"a" * (255 - len(b"USER \r\n")) + b"\r\n"
    assert len(line) == 255
    assert harness.send(line) == b"+OK send PASS\r\n"


def test_line_one_over_the_cap() -> None:
    harness = Harness()
    line = b"USER " + b"a" * (256 - len(b"USER \r\n")) + b"\r\n"
    assert harness.send(line + b"CAPA\r\n") == b"-ERR line too long\r\n" + CAPA


def test_megabyte_without_line_feed() -> None:
    harness = logged_in()
    for _ in range(256):
        assert harness.send(b"X" * 4096) == b""
    assert harness.send(b"\r\nSTAT\r\n") == b"-ERR line too long\r\n+OK 3 %d\r\n" % sum(
        map(len, MESSAGES)
    )
    assert harness.server.state is State.TRANSACTION


def test_custom_cap() -> None:
    harness = Harness(server=Pop3Server(max_line_length=1000))
    assert harness.send(b"USER " + b"a" * 900 + b"\r\n") == b"+OK send PASS\r\n"
    assert harness.send(b"USER " + b"a" * 1000 + b"\r\n") == b"-ERR line too long\r\n"


@pytest.mark.parametrize("line", [b"\0", b"NOOP\0", b"ST\0AT", b"USER al\0ice", b"PASS \0"])
def test_nul_bytes_are_refused_in_both_states(line: bytes) -> None:
    harness = Harness()
    assert harness.send(line + b"\r\n") == b"-ERR invalid character in command\r\n"
    harness.send(LOGIN)
    assert harness.send(line + b"\r\nNOOP\r\n") == b"-ERR invalid character in command\r\n+OK\r\n"
    assert harness.server.state is State.TRANSACTION


def test_eof_answers_buffered_commands_and_never_commits() -> None:
    harness = logged_in()
    assert harness.send(b"DELE 1\r\nSTAT\r\nQUI") == b"+OK message 1 deleted\r\n+OK 2 %d\r\n" % (
        len(M2) + len(M3)
    )
    assert not harness.closed
    assert harness.eof() == b""
    assert harness.closed
    assert harness.commits == []
    assert harness.server.state is State.CLOSED


def test_eof_with_complete_commands_buffered() -> None:
    harness = Harness()
    harness.server.receive_data(LOGIN + b"DELE 1\r\nLIST 1\r\n")
    harness.server.receive_data(b"")
    harness.pump()
    assert (
        bytes(harness.out)
        == LOGGED_IN + b"+OK message 1 deleted\r\n-ERR message 1 already deleted\r\n"
    )
    assert harness.closed
    assert harness.commits == []


def test_eof_after_buffered_quit_does_commit() -> None:
    # QUIT did arrive, so the deletions are due even though the client is gone.
    harness = Harness()
    harness.server.receive_data(LOGIN + b"DELE 1\r\nQUIT\r\n")
    harness.server.receive_data(b"")
    harness.pump()
    assert harness.commits == [(entries(MESSAGES)[0],)]


def test_eof_before_login() -> None:
    harness = Harness()
    assert harness.eof() == b""
    assert harness.closed and harness.server.state is State.CLOSED


def test_eof_during_login_request() -> None:
    harness = Harness()
    server = harness.server
    server.receive_data(b"USER alice\r\nPASS open sesame\r\nSTAT\r\n")
    assert server.next_event() == Send(b"+OK send PASS\r\n")
    assert isinstance(server.next_event(), LoginRequest)
    server.receive_data(b"")  # the client hung up while we were checking
    server.accept_login(Maildrop(entries(MESSAGES)))
    assert isinstance(server.next_event(), Send)
    assert server.next_event() == Close()


def test_close_is_sticky() -> None:
    harness = Harness()
    harness.send(b"QUIT\r\n")
    server = harness.server
    for _ in range(3):
        assert server.next_event() == Close()
    server.receive_data(b"STAT\r\n")
    server.receive_data(b"")
    assert server.next_event() == Close()


ALL_COMMANDS = [
    b"USER alice",
    b"PASS open sesame",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"RETR 1",
    b"DELE 1",
    b"NOOP",
    b"RSET",
    b"QUIT",
    b"TOP 1 1",
    b"UIDL",
    b"UIDL 1",
    b"CAPA",
    b"XYZZY",
]


@pytest.mark.parametrize("line", ALL_COMMANDS)
@pytest.mark.parametrize("login", [b"", LOGIN])
def test_nothing_is_answered_once_closed(line: bytes, login: bytes) -> None:
    harness = Harness()
    harness.send(login + b"QUIT\r\n")
    commits = list(harness.commits)
    assert harness.send(line + b"\r\n") == b""
    assert harness.closed and harness.server.state is State.CLOSED
    assert harness.commits == commits


def test_repeated_eof_is_harmless() -> None:
    server = Pop3Server()
    server.receive_data(b"")
    server.receive_data(b"")
    assert server.next_event() == Close()


def test_need_data_at_start() -> None:
    assert Pop3Server().next_event() is NEED_DATA


# -- API misuse is our bug: LocalProtocolError ------------------------------------


def _at_login_request() -> Pop3Server:
    server = Pop3Server()
    server.receive_data(LOGIN)
    server.next_event()
    assert isinstance(server.next_event(), LoginRequest)
    return server


def _in_transaction() -> Pop3Server:
    server = _at_login_request()
    server.accept_login(Maildrop(entries(MESSAGES)))
    return server


def _at_retrieve_request(line: bytes = b"RETR 1\r\n") -> Pop3Server:
    server = _in_transaction()
    server.receive_data(line)
    assert isinstance(server.next_event(), RetrieveRequest)
    return server


def _at_body() -> Pop3Server:
    server = _at_retrieve_request()
    server.start_message()
    return server


def _at_commit_request() -> Pop3Server:
    server = _in_transaction()
    server.receive_data(b"QUIT\r\n")
    assert isinstance(server.next_event(), CommitRequest)
    return server


_MAILDROP = Maildrop([])


@pytest.mark.parametrize(
    ("setup", "misuse"),
    [
        # next_event while a request is open
        (_at_login_request, lambda s: s.next_event()),
        (_at_retrieve_request, lambda s: s.next_event()),
        (_at_body, lambda s: s.next_event()),
        (_at_commit_request, lambda s: s.next_event()),
        # answers with no matching request
        (Pop3Server, lambda s: s.accept_login(_MAILDROP)),
        (Pop3Server, lambda s: s.reject_login("no", None)),
        (_in_transaction, lambda s: s.accept_login(_MAILDROP)),
        (_in_transaction, lambda s: s.start_message()),
        (_in_transaction, lambda s: s.refuse_message("no")),
        (_in_transaction, lambda s: s.message_body_encoder()),
        (_in_transaction, lambda s: s.end_message()),
        (_in_transaction, lambda s: s.abort_message()),
        (_in_transaction, lambda s: s.commit_succeeded()),
        (_in_transaction, lambda s: s.commit_failed("no")),
        # answers to the wrong request
        (_at_login_request, lambda s: s.start_message()),
        (_at_login_request, lambda s: s.commit_succeeded()),
        (_at_retrieve_request, lambda s: s.accept_login(_MAILDROP)),
        (_at_retrieve_request, lambda s: s.message_body_encoder()),
        (_at_retrieve_request, lambda s: s.end_message()),
        (_at_retrieve_request, lambda s: s.commit_failed("no")),
        (_at_body, lambda s: s.start_message()),
        (_at_body, lambda s: s.refuse_message("too late")),
        (_at_commit_request, lambda s: s.reject_login("no", None)),
        (_at_commit_request, lambda s: s.abort_message()),
        # out of order within a retrieval
        (_at_body, lambda s: s.end_message()),  # no encoder yet
        (_at_body, lambda s: (s.message_body_encoder(), s.message_body_encoder())),
        (_at_body, lambda s: (s.message_body_encoder().feed(b"x\r\n"), s.end_message())),
    ],
)
def test_misuse_raises_local_protocol_error(
    setup: Callable[[], Pop3Server], misuse: Callable[[Pop3Server], object]
) -> None:
    server = setup()
    with pytest.raises(LocalProtocolError):
        misuse(server)


def test_answers_are_single_use() -> None:
    server = _at_login_request()
    server.accept_login(Maildrop(entries(MESSAGES)))
    with pytest.raises(LocalProtocolError):
        server.accept_login(Maildrop(entries(MESSAGES)))
    server = _at_commit_request()
    server.commit_succeeded()
    with pytest.raises(LocalProtocolError):
        server.commit_succeeded()


def test_data_after_eof_is_misuse() -> None:
    server = Pop3Server()
    server.receive_data(b"NOOP\r\n")
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"STAT\r\n")


def test_local_protocol_error_is_not_a_peer_error() -> None:
    assert not issubclass(LocalProtocolError, (ValueError, OSError, ConnectionError))


def test_bad_reply_text_is_refused_before_state_changes() -> None:
    server = _at_login_request()
    with pytest.raises(ValueError):
        server.reject_login("two\r\nlines", None)
    # The request is still open and can be answered properly.
    assert server.reject_login("no", ResponseCode.AUTH) == b"-ERR [AUTH] no\r\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_line_length": 5},
        {"implementation": ""},
        {"implementation": "a\r\nb"},
        {"implementation": "caf\u00e9"},
        {"extra_capabilities": ["OK", "BAD\r\n"]},
        {"extra_capabilities": [""]},
        {"extra_capabilities": [".dot"]},
    ],
)
def test_bad_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Pop3Server(**kwargs)  # type: ignore[arg-type]


# -- properties -------------------------------------------------------------------

_PIECES = [
    b"USER alice\r\n",
    b"PASS open sesame\r\n",
    b"USER bob\r\n",
    b"PASS x\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 2\r\n",
    b"UIDL\r\n",
    b"UIDL 1\r\n",
    b"RETR 1\r\n",
    b"RETR 3\r\n",
    b"TOP 2 1\r\n",
    b"TOP 3 0\r\n",
    b"DELE 1\r\n",
    b"DELE 2\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"CAPA\r\n",
    b"QUIT\r\n",
    b"\r\n",
    b"\n",
    b"\0",
    b"\r",
    b" ",
    b"0",
    b"X" * 300,
]

_client_bytes = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=12), max_size=30).map(
    b"".join
)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _check_responses(harness: Harness) -> None:
    """Every Send must be well-framed: status lines, or a +OK multi-line block."""
    server = harness.server
    original_next_event = server.next_event

    def checked() -> object:
        event = original_next_event()
        if isinstance(event, Send):
            _assert_well_framed(event.data)
        return event

    server.next_event = checked  # type: ignore[method-assign]


def _assert_well_framed(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")[:-1]
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    first = lines[0]
    assert first == b"+OK" or first.startswith((b"+OK ", b"-ERR ")) or first == b"-ERR"
    if len(lines) > 1:
        assert first.startswith(b"+OK")
        assert lines[-1] == b"."
        assert all(line != b"." for line in lines[1:-1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_client_bytes, st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_property_arbitrary_input_gives_well_framed_replies(
    data: bytes, cuts: list[int], hang_up: bool
) -> None:
    harness = Harness()
    _check_responses(harness)
    for chunk in _chunked(data, cuts):
        harness.server.receive_data(chunk)
        harness.pump()
    if hang_up:
        harness.eof()
        assert harness.closed
    if b"QUIT" not in data.upper():
        assert harness.commits == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_client_bytes, st.lists(st.integers(0, 10_000), max_size=12))
def test_property_chunking_does_not_change_the_conversation(data: bytes, cuts: list[int]) -> None:
    whole = Harness()
    whole.send(data)
    whole.eof()
    split = Harness()
    for chunk in _chunked(data, cuts):
        split.send(chunk)
    split.eof()
    assert split.out == whole.out
    assert split.commits == whole.commits
    assert split.requests == whole.requests


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_client_bytes)
def test_property_byte_at_a_time(data: bytes) -> None:
    whole = Harness()
    whole.send(data)
    single = Harness()
    single.send(data, chunk=1)
    assert single.out == whole.out
    assert single.commits == whole.commits


def test_capabilities_given_at_login_replace_the_extra_ones_after_login() -> None:
    from bridge.pop3 import Maildrop, Pop3Server

    server = Pop3Server(extra_capabilities=["EXPIRE 0 USER"])
    server.receive_data(b"CAPA\r\nUSER a\r\nPASS b\r\n")
    before = server.next_event()
    assert b"EXPIRE 0 USER\r\n" in before.data
    server.next_event()
    server.next_event()
    server.accept_login(Maildrop([]), extra_capabilities=["EXPIRE NEVER"])
    server.receive_data(b"CAPA\r\n")
    after = server.next_event().data
    assert b"EXPIRE NEVER\r\n" in after and b"EXPIRE 0" not in after


def test_replies_name_the_command_they_answer() -> None:
    from bridge.pop3 import Pop3Server

    server = Pop3Server()
    server.receive_data(b"CAPA\r\nstat\r\nFROB\r\n" + b"X" * 300 + b"\r\n")
    named = [server.next_event().command for _ in range(4)]
    # STAT before login is refused, and still counted as a STAT.
    assert named == ["CAPA", "STAT", "UNKNOWN", "UNKNOWN"]


def test_a_retr_sent_from_a_cache_ends_without_an_encoder() -> None:
    harness = logged_in()
    sent: list[bytes] = []

    def from_cache(request: RetrieveRequest) -> None:
        sent.append(harness.server.start_message())
        harness.server.end_cached_message()

    harness.retrieve = from_cache
    harness.send(b"RETR 1\r\n")
    assert sent == [b"+OK %d octets\r\n" % len(M1)]
    assert harness.send(b"NOOP\r\n") == b"+OK\r\n"


@pytest.mark.parametrize("line", [b"TOP 1 0\r\n", b"RETR 1\r\n"])
def test_a_cached_end_is_refused_for_top_and_after_an_encoder(line: bytes) -> None:
    harness = logged_in()
    refused: list[LocalProtocolError] = []

    def misuse(request: RetrieveRequest) -> None:
        harness.server.start_message()
        if request.body_lines is None:
            harness.server.message_body_encoder()
        with pytest.raises(LocalProtocolError) as caught:
            harness.server.end_cached_message()
        refused.append(caught.value)
        harness.server.abort_message()

    harness.retrieve = misuse
    harness.send(line)
    assert len(refused) == 1
