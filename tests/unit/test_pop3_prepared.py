"""A RETR answered before it is asked (Pop3Server.prepare_retrieve / take_prepared): the
prepared reply is byte for byte what the command would get, and the core takes it only when
the client's bytes are exactly that one command and nothing changed the answer meanwhile."""

from __future__ import annotations

import pytest

from bridge.pop3 import Pop3Server, PreparedRetrieve, State
from tests.unit.test_pop3_connection import LOGGED_IN, LOGIN, MESSAGES, Harness, logged_in


def prepared_for(harness: Harness, number: int) -> PreparedRetrieve:
    prepared = harness.server.prepare_retrieve(number, harness.messages[number - 1])
    assert prepared is not None
    return prepared


@pytest.mark.parametrize("number", [1, 2, 3])
def test_a_prepared_reply_is_what_the_command_gets(number: int) -> None:
    # M1 has a line that is a dot, M3 no final newline: stuffing and terminator both matter.
    expected = logged_in().send(b"RETR %d\r\n" % number)
    assert prepared_for(logged_in(), number).reply == expected


@pytest.mark.parametrize("line", [b"RETR 2\r\n", b"retr 2\r\n", b"Retr 2\r\n"])
def test_the_exact_command_is_taken_and_the_session_goes_on(line: bytes) -> None:
    harness = logged_in()
    prepared = prepared_for(harness, 2)
    assert harness.server.take_prepared(line, prepared)
    # Nothing is left over and nothing was marked: the next commands are answered as usual.
    assert harness.send(b"STAT\r\n") == b"+OK 3 %d\r\n" % sum(map(len, MESSAGES))
    assert harness.send(b"QUIT\r\n") == b"+OK bye\r\n"
    assert harness.commits == [()]


@pytest.mark.parametrize(
    "data",
    [
        b"RETR 3\r\n",  # another message
        b"RETR 2\r\nRETR 3\r\n",  # pipelined: more than the one command
        b"RETR 2",  # half a line
        b"RETR 02\r\n",
        b"RETR  2\r\n",
        b"RETR 2\n",  # valid, but not as prepared: the core answers it the usual way
        b"DELE 2\r\n",
        b"",  # EOF
    ],
)
def test_anything_else_is_left_to_the_usual_path(data: bytes) -> None:
    harness = logged_in()
    prepared = prepared_for(harness, 2)
    assert not harness.server.take_prepared(data, prepared)
    # The core is untouched: the same bytes get the same answer as without the prepared reply.
    fresh = logged_in()
    assert harness.send(data) == fresh.send(data)
    if not data:
        assert harness.eof() == fresh.eof()


def test_a_message_marked_since_is_not_sent() -> None:
    harness = logged_in()
    prepared = prepared_for(harness, 2)
    assert harness.send(b"DELE 2\r\n") == b"+OK message 2 deleted\r\n"
    assert not harness.server.take_prepared(b"RETR 2\r\n", prepared)
    assert harness.send(b"RETR 2\r\n") == b"-ERR message 2 already deleted\r\n"
    # RSET brings it back, and the reply made before is good again.
    harness.send(b"RSET\r\n")
    assert harness.server.take_prepared(b"RETR 2\r\n", prepared)


def test_a_partial_command_buffered_blocks_it() -> None:
    harness = logged_in()
    prepared = prepared_for(harness, 2)
    harness.server.receive_data(b"NO")
    assert not harness.server.take_prepared(b"RETR 2\r\n", prepared)
    assert harness.send(b"OP\r\n") == b"+OK\r\n"
    assert harness.server.take_prepared(b"RETR 2\r\n", prepared)


def test_not_after_quit_or_eof() -> None:
    harness = logged_in()
    prepared = prepared_for(harness, 2)
    harness.server.receive_data(b"QUIT\r\n")
    harness.server.next_event()  # the commit request: UPDATE
    assert harness.server.state is State.UPDATE
    assert not harness.server.take_prepared(b"RETR 2\r\n", prepared)

    harness = logged_in()
    prepared = prepared_for(harness, 2)
    harness.server.receive_data(b"")
    assert not harness.server.take_prepared(b"RETR 2\r\n", prepared)


def test_nothing_is_prepared_that_the_command_would_not_get() -> None:
    assert Pop3Server().prepare_retrieve(1, MESSAGES[0]) is None  # not logged in
    harness = Harness()
    assert harness.send(LOGIN) == LOGGED_IN
    server = harness.server
    assert server.prepare_retrieve(0, MESSAGES[0]) is None
    assert server.prepare_retrieve(4, MESSAGES[0]) is None
    assert server.prepare_retrieve(1, MESSAGES[0] + b"x") is None  # not the size listed
    harness.send(b"DELE 1\r\n")
    assert server.prepare_retrieve(1, MESSAGES[0]) is None
    # While a RETR is outstanding the core answers nothing else.
    server.receive_data(b"RETR 2\r\n")
    server.next_event()
    assert server.prepare_retrieve(3, MESSAGES[2]) is None
