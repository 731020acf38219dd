"""The POP3 server state machine (RFC 1939), without any I/O.

Bytes from the client go into `Pop3Server.receive_data`; `next_event` then
returns, one at a time and in order, what the I/O layer has to do: send bytes,
check a login, fetch a message, expunge at QUIT, close, or read more.  Work
that needs the upstream mailbox comes out as a request event, and the core
waits for the matching answer method before it looks at the next command.

Everything that moves the state machine lives in this module: the session
states and the transitions between them (`_TRANSITIONS`), which commands each
state accepts (`_ALLOWED`), and the outstanding request, if any (`_Awaiting`).

Input is bounded as follows.  An incomplete command line is never held beyond
``max_line_length`` bytes (see `linebuffer`).  Complete but not yet answered
commands are bounded by what the I/O layer hands to ``receive_data``; it is
expected to read from the socket only when ``next_event`` returns `NEED_DATA`,
which is after every buffered command has been answered, so a pipelining
client is held back by TCP flow control rather than by our memory.

Security-relevant rules also live here.  STLS (RFC 2595) throws away every
byte received before the TLS negotiation, so nothing a client (or an attacker
on the path) pipelined in the clear behind STLS is ever executed.  Logins
(USER/PASS and AUTH, RFC 5034) are refused with ``-ERR [AUTH]`` on a
connection that is not encrypted unless the I/O layer says plaintext logins
are allowed there, and CAPA advertises only what would be accepted now.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Sequence

from .commands import (
    Auth,
    BadCommand,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    parse_command,
)
from .dotstuff import DotStuffer, MessageEncoder, TopEncoder
from .errors import LocalProtocolError
from .events import (
    NEED_DATA,
    Close,
    CommitRequest,
    Event,
    LoginRequest,
    PreparedRetrieve,
    RetrieveRequest,
    Send,
    StartTls,
)
from .linebuffer import LINE_TOO_LONG, LineBuffer
from .maildrop import Maildrop, MaildropEntry, Unavailable
from .responses import ResponseCode, continuation, err, multiline, ok
from .sasl import (
    MAX_RESPONSE_LINE,
    SUPPORTED_MECHANISMS,
    Credentials,
    SaslExchange,
    SaslFailure,
    decode_response,
    start_exchange,
)

__all__ = ["Pop3Server", "State"]


class State(enum.Enum):
    """The session states of RFC 1939 section 3, plus CLOSED."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"  # QUIT received, waiting for the deletions to be applied
    CLOSED = "CLOSED"


class _Trigger(enum.Enum):
    LOGIN_ACCEPTED = enum.auto()
    QUIT = enum.auto()
    COMMIT_FINISHED = enum.auto()
    CONNECTION_LOST = enum.auto()  # client EOF, or a message that broke mid-send


_TRANSITIONS: dict[tuple[State, _Trigger], State] = {
    (State.AUTHORIZATION, _Trigger.LOGIN_ACCEPTED): State.TRANSACTION,
    # QUIT before login has nothing to commit (RFC 1939 section 4).
    (State.AUTHORIZATION, _Trigger.QUIT): State.CLOSED,
    (State.TRANSACTION, _Trigger.QUIT): State.UPDATE,
    # Whether the deletions worked or not, the session ends (RFC 1939 section 6).
    (State.UPDATE, _Trigger.COMMIT_FINISHED): State.CLOSED,
    # Without a QUIT nothing may be deleted, so these skip UPDATE.
    (State.AUTHORIZATION, _Trigger.CONNECTION_LOST): State.CLOSED,
    (State.TRANSACTION, _Trigger.CONNECTION_LOST): State.CLOSED,
}

_ALLOWED: dict[State, frozenset[type[Command]]] = {
    State.AUTHORIZATION: frozenset({User, Pass, Quit, Capa, Stls, Auth}),
    State.TRANSACTION: frozenset({Stat, List, Retr, Dele, Noop, Rset, Quit, Top, Uidl, Capa}),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}

# What a command gets in a state that does not accept it.
_WRONG_STATE: dict[State, str] = {
    State.AUTHORIZATION: "not logged in",
    State.TRANSACTION: "already logged in",
    State.UPDATE: "session is ending",
    State.CLOSED: "session is closed",
}


class _Awaiting(enum.Enum):
    """Which answer method the core is waiting for, if any."""

    NOTHING = "nothing"
    LOGIN = "accept_login() or reject_login()"
    MESSAGE_START = "start_message(), refuse_message() or abort_message()"
    MESSAGE_BODY = "message_body_encoder(), end_message() or abort_message()"
    COMMIT = "commit_succeeded() or commit_failed()"
    TLS = "tls_established() or tls_failed()"


# Our reply texts.  Parse errors come with their own text from `commands`.
_LINE_TOO_LONG = "line too long"
# A LIST/UIDL body up to this size is sent with its status line in one write.
_LISTING_IN_ONE_WRITE = 64 * 1024
_USER_FIRST = "send USER first"
_USER_ACCEPTED = "send PASS"
_LOGGED_IN = "logged in."
_BYE = "bye"
_CAPA = "capability list follows"
_BEGIN_TLS = "begin TLS negotiation"
_NO_STLS = "STLS not available"
_TLS_ALREADY = "TLS is already active"
_UNSUPPORTED_MECHANISM = "unsupported authentication mechanism"
_AUTH_CANCELLED = "authentication cancelled"
_RESPONSE_TOO_LONG = "authentication response too long"
_MECHANISMS = "supported authentication mechanisms follow"
_PLAINTEXT_REFUSED_STLS = "plaintext authentication is disabled on unencrypted connections; use STLS first"
_PLAINTEXT_REFUSED = "plaintext authentication is disabled on unencrypted connections; connect with TLS"


def _retr_status_line(entry: MaildropEntry) -> bytes:
    return b"+OK %d octets\r\n" % entry.size


def _check_capability(text: str) -> str:
    if not text or not text.isascii() or not text.isprintable() or text.startswith("."):
        raise ValueError(f"not a valid capability line: {text!r}")
    return text


class Pop3Server:
    """One POP3 session, server side.  See the module docstring."""

    def __init__(
        self,
        *,
        max_line_length: int = 255,
        implementation: str = "pop3-imap-bridge",
        extra_capabilities: Sequence[str] = (),
        sasl_mechanisms: Sequence[str] = (),
        stls_available: bool = False,
        tls_active: bool = False,
        plaintext_auth_allowed: bool = True,
    ) -> None:
        """``sasl_mechanisms``: what AUTH offers (a subset of PLAIN, LOGIN; none
        by default).  ``stls_available``: the I/O layer can start TLS on this
        connection.  ``tls_active``: the connection is encrypted already
        (implicit TLS).  ``plaintext_auth_allowed``: USER/PASS and AUTH may be
        used while the connection is not encrypted."""
        # Rejecting bad configuration here keeps a broken CAPA or greeting
        # from ever reaching a client halfway through a session.
        if max_line_length < len(b"QUIT\r\n"):
            raise ValueError("max_line_length is too small for any POP3 command")
        unknown = set(sasl_mechanisms) - set(SUPPORTED_MECHANISMS)
        if unknown:
            raise ValueError(f"unsupported SASL mechanisms: {sorted(unknown)}")
        self._mechanisms = tuple(dict.fromkeys(sasl_mechanisms))
        self._stls_available = stls_available
        self._tls_active = tls_active
        self._plaintext_auth_allowed = plaintext_auth_allowed
        self._implementation = _check_capability(implementation)
        self._extra_capabilities = tuple(_check_capability(c) for c in extra_capabilities)
        _check_capability(f"IMPLEMENTATION {implementation}")

        self._lines = LineBuffer(max_line_length)
        self._eof = False
        self._state = State.AUTHORIZATION
        self._awaiting = _Awaiting.NOTHING
        self._user: str | None = None  # set by USER, consumed by the next line
        self._maildrop: Maildrop | None = None
        self._retrieval: RetrieveRequest | None = None
        self._encoder: DotStuffer | TopEncoder | None = None
        self._max_line_length = max_line_length
        self._sasl: SaslExchange | None = None  # an AUTH exchange waiting for a response line

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def _auth_allowed(self) -> bool:
        return self._tls_active or self._plaintext_auth_allowed

    def _fire(self, trigger: _Trigger) -> None:
        new_state = _TRANSITIONS.get((self._state, trigger))
        if new_state is None:
            raise LocalProtocolError(f"no transition for {trigger.name} in {self._state.name}")
        self._state = new_state

    def _expect(self, *awaiting: _Awaiting) -> None:
        if self._awaiting not in awaiting:
            wanted = " or ".join(a.name for a in awaiting)
            raise LocalProtocolError(
                f"called while the core waits for {self._awaiting.value}; needs {wanted}"
            )

    @property
    def _drop(self) -> Maildrop:
        if self._maildrop is None:
            raise LocalProtocolError("no maildrop outside TRANSACTION")
        return self._maildrop

    # -- input -------------------------------------------------------------

    def greeting(self) -> bytes:
        """The first line to send on a new connection."""
        return ok(f"{self._implementation} ready.")

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes read from the client; ``b""`` means EOF."""
        if self._state is State.CLOSED:
            return  # nothing a closed session reads can matter any more
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() with data after EOF")
            return
        if not data:
            self._eof = True
            return
        self._lines.feed(data)

    def next_event(self) -> Event:
        """What to do next; see the module docstring."""
        if self._awaiting is not _Awaiting.NOTHING:
            raise LocalProtocolError(f"next_event() while waiting for {self._awaiting.value}")
        if self._state is State.CLOSED:
            return Close()
        line = self._lines.next_line()
        if line is None:
            if self._eof:
                # A partial line left at EOF was never a command.
                self._fire(_Trigger.CONNECTION_LOST)
                return Close()
            return NEED_DATA
        if self._sasl is not None:
            return self._sasl_response(line)
        if line is LINE_TOO_LONG:
            self._user = None
            return Send(err(_LINE_TOO_LONG), command="UNKNOWN")
        command = parse_command(line)
        event = self._execute(command)
        if isinstance(event, Send) and event.command is None:
            named = command.command if isinstance(command, BadCommand) else type(command)
            return dataclasses.replace(event, command=named.__name__.upper() if named else "UNKNOWN")
        return event

    # -- commands ----------------------------------------------------------

    def _execute(self, command: Command | BadCommand) -> Event:
        # PASS is only valid immediately after USER (RFC 1939 section 7), so
        # every line, good or bad, uses up a pending user name.
        user, self._user = self._user, None
        if isinstance(command, BadCommand):
            if command.command is not None and command.command not in _ALLOWED[self._state]:
                return Send(err(_WRONG_STATE[self._state]))
            return Send(err(command.text))
        if type(command) not in _ALLOWED[self._state]:
            return Send(err(_WRONG_STATE[self._state]))

        match command:
            # RETR first: a download runs it for every message (the patterns are disjoint,
            # so their order changes nothing else).
            case Retr(number=number):
                return self._retrieve(number, None)
            case User(name=name):
                if not self._auth_allowed:
                    return self._plaintext_refused()
                self._user = name
                return Send(ok(_USER_ACCEPTED))
            case Pass(password=password):
                if not self._auth_allowed:
                    return self._plaintext_refused()
                if user is None:
                    return Send(err(_USER_FIRST))
                self._awaiting = _Awaiting.LOGIN
                return LoginRequest(user, password)
            case Quit():
                return self._quit()
            case Capa():
                return Send(multiline(_CAPA, self._capabilities()))
            case Stls():
                return self._stls()
            case Auth(mechanism=mechanism, initial_response=initial):
                return self._auth(mechanism, initial)
            case Stat():
                count, octets = self._drop.stat()
                return Send(ok(f"{count} {octets}"))
            case List(number=None):
                count, _octets = self._drop.stat()
                return self._listing(f"{count} messages:", unique_ids=False)
            case List(number=int(number)):
                found = self._drop.lookup(number)
                if isinstance(found, Unavailable):
                    return Send(err(self._unavailable(number, found)))
                return Send(ok(f"{number} {found.size}"))
            case Uidl(number=None):
                return self._listing("", unique_ids=True)
            case Uidl(number=int(number)):
                found = self._drop.lookup(number)
                if isinstance(found, Unavailable):
                    return Send(err(self._unavailable(number, found)))
                return Send(ok(f"{number} {found.unique_id}"))
            case Top(number=number, lines=body_lines):
                return self._retrieve(number, body_lines)
            case Dele(number=number):
                found = self._drop.mark_deleted(number)
                if isinstance(found, Unavailable):
                    return Send(err(self._unavailable(number, found)))
                return Send(ok(f"message {number} deleted"))
            case Rset():
                self._drop.reset()
                return Send(ok())
            case Noop():
                return Send(ok())
        raise LocalProtocolError(f"no handler for {type(command).__name__}")  # pragma: no cover

    def _capabilities(self) -> list[str]:
        # RFC 2449 lets the list depend on the state: STLS only before login
        # and before TLS; USER and SASL only where a login would be accepted
        # (RFC 2595 section 4: a client must re-issue CAPA after STLS).
        auth = self._auth_allowed
        mechanisms = " ".join(self._mechanisms)
        return [
            "TOP",
            "UIDL",
            *(["USER"] if auth else []),
            *([f"SASL {mechanisms}"] if auth and mechanisms else []),
            *(["STLS"] if self._stls_offered else []),
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            *self._extra_capabilities,
            f"IMPLEMENTATION {self._implementation}",
        ]

    @property
    def _stls_offered(self) -> bool:
        return self._stls_available and not self._tls_active and self._state is State.AUTHORIZATION

    def _plaintext_refused(self) -> Event:
        text = _PLAINTEXT_REFUSED_STLS if self._stls_offered else _PLAINTEXT_REFUSED
        return Send(err(text, ResponseCode.AUTH))

    # -- STLS (RFC 2595) ---------------------------------------------------------

    def _stls(self) -> Event:
        if self._tls_active:
            return Send(err(_TLS_ALREADY))
        if not self._stls_available:
            return Send(err(_NO_STLS))
        # Whatever the client sent after STLS arrived in the clear and could have
        # been injected by anyone on the path: it is dropped, never executed.
        self._lines.clear()
        self._awaiting = _Awaiting.TLS
        return StartTls(ok(_BEGIN_TLS))

    def tls_established(self) -> None:
        """TLS is up; the session starts over in AUTHORIZATION with nothing buffered."""
        self._expect(_Awaiting.TLS)
        self._lines.clear()
        self._user = None
        self._tls_active = True
        self._awaiting = _Awaiting.NOTHING

    def tls_failed(self) -> None:
        """The TLS negotiation failed: the connection is unusable and must be closed."""
        self._expect(_Awaiting.TLS)
        self._lines.clear()
        self._awaiting = _Awaiting.NOTHING
        self._fire(_Trigger.CONNECTION_LOST)

    # -- AUTH (RFC 5034) ---------------------------------------------------------

    def _auth(self, mechanism: str | None, initial: bytes | None) -> Event:
        if not self._auth_allowed:
            return self._plaintext_refused()
        if mechanism is None:
            # Not in RFC 5034, but many clients (and Dovecot, Cyrus) use a bare
            # AUTH to list the mechanisms, as RFC 1734 implementations did.
            return Send(multiline(_MECHANISMS, self._mechanisms))
        if mechanism not in self._mechanisms:
            return Send(err(_UNSUPPORTED_MECHANISM))
        exchange = start_exchange(mechanism)
        if initial is None:
            return self._challenge(exchange, exchange.first_challenge)
        try:
            return self._sasl_step(exchange, decode_response(initial))
        except SaslFailure as failure:
            return Send(err(str(failure)))

    def _challenge(self, exchange: SaslExchange, challenge: bytes) -> Event:
        self._sasl = exchange
        # A response line may be longer than a command line (RFC 5034 section 4).
        self._lines.max_line_length = max(self._max_line_length, MAX_RESPONSE_LINE)
        return Send(continuation(challenge))

    def _sasl_step(self, exchange: SaslExchange, response: bytes) -> Event:
        result = exchange.step(response)
        if isinstance(result, Credentials):
            self._awaiting = _Awaiting.LOGIN
            return LoginRequest(result.username, result.password, exchange.name)
        return self._challenge(exchange, result)

    def _sasl_response(self, line: bytes | object) -> Event:
        exchange, self._sasl = self._sasl, None
        self._lines.max_line_length = self._max_line_length
        assert exchange is not None
        if line is LINE_TOO_LONG:
            return Send(err(_RESPONSE_TOO_LONG))
        assert isinstance(line, bytes)
        if line == b"*":
            return Send(err(_AUTH_CANCELLED))
        try:
            return self._sasl_step(exchange, decode_response(line))
        except SaslFailure as failure:
            return Send(err(str(failure)))

    def _listing(self, text: str, unique_ids: bool) -> Send:
        """LIST or UIDL without an argument. A small listing is one write; a big one goes
        out piece by piece (`Send.rest`), so no session copies a huge maildrop's listing
        into one string of its own."""
        command = "UIDL" if unique_ids else "LIST"
        pieces = self._drop.listing_pieces(unique_ids)
        first = next(pieces, b"")
        second = next(pieces, None)
        if second is None and len(first) <= _LISTING_IN_ONE_WRITE:
            return Send(ok(text) + first + b".\r\n", command)
        head = () if second is None else (second,)
        return Send(ok(text), command, rest=itertools.chain((first,), head, pieces, (b".\r\n",)))

    @staticmethod
    def _unavailable(number: int, why: Unavailable) -> str:
        if why is Unavailable.DELETED:
            return f"message {number} already deleted"
        return "no such message"

    def _quit(self) -> Event:
        if self._state is State.AUTHORIZATION:
            self._fire(_Trigger.QUIT)
            return Send(ok(_BYE))
        marked = self._drop.marked()
        self._fire(_Trigger.QUIT)
        self._awaiting = _Awaiting.COMMIT
        return CommitRequest(marked)

    def _retrieve(self, number: int, body_lines: int | None) -> Event:
        found = self._drop.lookup(number)
        if isinstance(found, Unavailable):
            return Send(err(self._unavailable(number, found)))
        self._retrieval = RetrieveRequest(number, found, body_lines)
        self._awaiting = _Awaiting.MESSAGE_START
        return self._retrieval

    # -- answers to requests -----------------------------------------------

    def accept_login(self, maildrop: Maildrop, extra_capabilities: Sequence[str] | None = None) -> bytes:
        """The credentials were good and ``maildrop`` is this session's view.

        ``extra_capabilities``, if given, replaces the extra CAPA lines from now on: RFC 2449
        lets a capability such as EXPIRE depend on the user, known only after login.
        """
        self._expect(_Awaiting.LOGIN)
        if extra_capabilities is not None:
            self._extra_capabilities = tuple(_check_capability(c) for c in extra_capabilities)
        self._maildrop = maildrop
        self._awaiting = _Awaiting.NOTHING
        self._fire(_Trigger.LOGIN_ACCEPTED)
        return ok(_LOGGED_IN)

    def reject_login(self, text: str, code: ResponseCode | None) -> bytes:
        """The login failed; the client may start again with USER."""
        self._expect(_Awaiting.LOGIN)
        reply = err(text, code)
        self._awaiting = _Awaiting.NOTHING
        return reply

    def _current(self) -> RetrieveRequest:
        if self._retrieval is None:  # pragma: no cover - guarded by _expect
            raise LocalProtocolError("no retrieval in progress")
        return self._retrieval

    def start_message(self) -> bytes:
        """The +OK line that goes before the body of the requested message."""
        self._expect(_Awaiting.MESSAGE_START)
        request = self._current()
        self._awaiting = _Awaiting.MESSAGE_BODY
        # Like Dovecot: RETR announces the size it listed, TOP says nothing.
        return _retr_status_line(request.entry) if request.body_lines is None else ok()

    # -- a RETR answered before it is asked ----------------------------------

    def prepare_retrieve(self, number: int, body: bytes) -> PreparedRetrieve | None:
        """The reply ``RETR number`` would get now if its message is ``body``, made before
        the client asks: a client downloading in order asks for it next, and the I/O layer
        can then send it the moment the command arrives (`take_prepared`). None if RETR
        ``number`` would not get that reply now: outside TRANSACTION, while a request is
        outstanding, for a message that is missing or marked, or a body of another size than
        the one listed."""
        if self._state is not State.TRANSACTION or self._awaiting is not _Awaiting.NOTHING:
            return None
        found = self._drop.lookup(number)
        if isinstance(found, Unavailable) or found.size != len(body):
            return None
        encoder = DotStuffer()
        reply = b"".join((_retr_status_line(found), encoder.feed(body), encoder.finish()))
        return PreparedRetrieve(number, found, reply, b"RETR %d\r\n" % number)

    def take_prepared(self, data: bytes, prepared: PreparedRetrieve) -> bool:
        """Answer ``data`` with ``prepared.reply`` if that is exactly what the core would do.

        True when ``data`` is the whole of one ``RETR n`` command line (``prepared.command``,
        the keyword in any case), nothing else is buffered or outstanding, and the
        message is still there, unmarked and the same: the core has then handled the
        command (the I/O layer sends ``prepared.reply``, and nothing else is due). False:
        the core is untouched, and ``data`` goes to `receive_data` as usual.
        """
        if data != prepared.command and data.upper() != prepared.command:
            return False
        if self._state is not State.TRANSACTION or self._awaiting is not _Awaiting.NOTHING:
            return False
        if self._eof or not self._lines.empty:
            return False
        return self._drop.lookup(prepared.number) is prepared.entry

    def refuse_message(self, text: str, code: ResponseCode | None = None) -> bytes:
        """An -ERR instead of the body (the message vanished upstream, say)."""
        self._expect(_Awaiting.MESSAGE_START)
        reply = err(text, code)
        self._retrieval = None
        self._awaiting = _Awaiting.NOTHING
        return reply

    def message_body_encoder(self) -> MessageEncoder:
        """The encoder for the body: dot-stuffing, and for TOP the cut-off."""
        self._expect(_Awaiting.MESSAGE_BODY)
        if self._encoder is not None:
            raise LocalProtocolError("message_body_encoder() called twice for one message")
        body_lines = self._current().body_lines
        self._encoder = DotStuffer() if body_lines is None else TopEncoder(body_lines)
        return self._encoder

    def end_message(self) -> None:
        """The body and its terminator have been sent in full."""
        self._expect(_Awaiting.MESSAGE_BODY)
        # A missing terminator would leave the client reading our next
        # response as part of the message, so this is checked, not trusted.
        if self._encoder is None or not self._encoder.finished:
            raise LocalProtocolError("end_message() before the encoder's finish()")
        self._retrieval = None
        self._encoder = None
        self._awaiting = _Awaiting.NOTHING

    def end_cached_message(self) -> None:
        """RETR only: the body went out as this core's encoder made it for an earlier RETR
        of the same message, terminator included, instead of through message_body_encoder()
        (the session layer's message cache keeps a finished encoder's output only)."""
        self._expect(_Awaiting.MESSAGE_BODY)
        if self._encoder is not None or self._current().body_lines is not None:
            raise LocalProtocolError("end_cached_message() is for a RETR sent without an encoder")
        self._retrieval = None
        self._awaiting = _Awaiting.NOTHING

    def abort_message(self) -> None:
        """The message could not be sent in full: the connection must be dropped."""
        self._expect(_Awaiting.MESSAGE_START, _Awaiting.MESSAGE_BODY)
        self._retrieval = None
        self._encoder = None
        self._awaiting = _Awaiting.NOTHING
        self._fire(_Trigger.CONNECTION_LOST)

    def commit_succeeded(self) -> bytes:
        """The marked messages were deleted upstream; the session is over."""
        self._expect(_Awaiting.COMMIT)
        self._awaiting = _Awaiting.NOTHING
        self._fire(_Trigger.COMMIT_FINISHED)
        return ok(_BYE)

    def commit_failed(self, text: str, code: ResponseCode | None = ResponseCode.SYS_TEMP) -> bytes:
        """Applying the deletions failed; the session is over all the same."""
        self._expect(_Awaiting.COMMIT)
        reply = err(text, code)
        self._awaiting = _Awaiting.NOTHING
        self._fire(_Trigger.COMMIT_FINISHED)
        return reply
