"""Parsing of one POP3 command line (RFC 1939, RFC 2449 CAPA).

`parse_command` turns the bytes of one line (terminator already removed) into
either a command value or a `BadCommand` carrying the text of our ``-ERR``
reply.  Nothing here knows about session state; deciding whether a command is
allowed *now* is the state machine's job, which is why `BadCommand` remembers
which command the broken line was meant to be.

Adding a command means one frozen dataclass below (named in the `Command`
union) and one entry in `_PARSERS`; the state machine then decides where it is
allowed and what it does.  STLS (RFC 2595) and AUTH (RFC 5034) only name what
the client asked for here: whether TLS or a SASL mechanism is available, and
the exchange that follows AUTH, are the state machine's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "Auth",
    "BadCommand",
    "Capa",
    "Command",
    "Dele",
    "List",
    "Noop",
    "Pass",
    "Quit",
    "Retr",
    "Rset",
    "Stat",
    "Stls",
    "Top",
    "Uidl",
    "User",
    "parse_command",
]

# Numbers are clamped rather than converted: the line cap is configurable, and
# int() raises ValueError for digit strings beyond sys.get_int_max_str_digits().
# Anything this large is past the end of any maildrop, and as a TOP line count
# it means "the whole body" just the same.
HUGE_NUMBER = 2**63 - 1
_HUGE_DIGITS = len(str(HUGE_NUMBER))


@dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Stat:
    pass


@dataclass(frozen=True, slots=True)
class List:
    number: int | None = None


@dataclass(frozen=True, slots=True)
class Retr:
    number: int


@dataclass(frozen=True, slots=True)
class Dele:
    number: int


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Top:
    number: int
    lines: int


@dataclass(frozen=True, slots=True)
class Uidl:
    number: int | None = None


@dataclass(frozen=True, slots=True)
class Capa:
    pass


@dataclass(frozen=True, slots=True)
class Stls:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH [mechanism [initial-response]]`` (RFC 5034).

    ``mechanism`` is upper-cased, or None for a bare ``AUTH`` (which asks for
    the list of mechanisms).  ``initial_response`` is the base64 text as sent,
    still encoded ("=" stands for an empty response), or None when absent.
    """

    mechanism: str | None = None
    initial_response: bytes | None = field(default=None, repr=False)


Command = User | Pass | Stat | List | Retr | Dele | Noop | Rset | Quit | Top | Uidl | Capa | Stls | Auth


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A line we will not execute.

    ``text`` is the complete text of the ``-ERR`` reply, always written by us
    (client bytes are never echoed back).  ``command`` is the command class the
    line named, or None when the keyword itself was not recognised, so the
    state machine can answer "not allowed now" before "bad argument".
    """

    text: str
    command: type[Command] | None = None


UNKNOWN_COMMAND = "unknown command"
EMPTY_COMMAND = "empty command"
INVALID_CHARACTER = "invalid character in command"
NO_SUCH_MESSAGE = "no such message"
TOO_MANY_ARGUMENTS = "too many arguments"
MISSING_USER_NAME = "missing user name"
MISSING_PASSWORD = "missing password"
MISSING_MESSAGE_NUMBER = "missing message number"
INVALID_MESSAGE_NUMBER = "invalid message number"
MISSING_LINE_COUNT = "missing line count"
INVALID_LINE_COUNT = "invalid line count"
INVALID_MECHANISM = "invalid authentication mechanism name"

# RFC 4422 section 3.1: SASL mechanism names are 1 to 20 of A-Z, 0-9, "-" and "_".
_MECHANISM_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


# An argument parser returns the command, or the text of the -ERR reply.
_Parsed = Command | str
_Parser = Callable[[bytes | None], _Parsed]


def _split(rest: bytes | None) -> list[bytes]:
    # RFC 1939 asks for exactly one space between arguments; runs of spaces
    # and trailing spaces are accepted because they cannot be ambiguous and
    # rejecting them only hurts sloppy clients.
    return [arg for arg in rest.split(b" ") if arg] if rest is not None else []


def _number(arg: bytes) -> int | None:
    # bytes.isdigit() is ASCII-only, which rules out signs, spaces, and
    # Unicode digits that int() would otherwise accept.
    if not arg.isdigit():
        return None
    digits = arg.lstrip(b"0")
    if len(digits) > _HUGE_DIGITS:
        return HUGE_NUMBER
    return min(int(digits or b"0"), HUGE_NUMBER)


def _message_number(arg: bytes) -> int | str:
    number = _number(arg)
    if number is None:
        return INVALID_MESSAGE_NUMBER
    if number == 0:
        return NO_SUCH_MESSAGE
    return number


def _no_arguments(cls: Callable[[], Command]) -> _Parser:
    def parse(rest: bytes | None) -> _Parsed:
        return TOO_MANY_ARGUMENTS if _split(rest) else cls()

    return parse


def _optional_message(cls: Callable[[int | None], Command]) -> _Parser:
    def parse(rest: bytes | None) -> _Parsed:
        args = _split(rest)
        if not args:
            return cls(None)
        if len(args) > 1:
            return TOO_MANY_ARGUMENTS
        number = _message_number(args[0])
        return number if isinstance(number, str) else cls(number)

    return parse


def _one_message(cls: Callable[[int], Command]) -> _Parser:
    def parse(rest: bytes | None) -> _Parsed:
        args = _split(rest)
        if not args:
            return MISSING_MESSAGE_NUMBER
        if len(args) > 1:
            return TOO_MANY_ARGUMENTS
        number = _message_number(args[0])
        return number if isinstance(number, str) else cls(number)

    return parse


def _parse_top(rest: bytes | None) -> _Parsed:
    args = _split(rest)
    if not args:
        return MISSING_MESSAGE_NUMBER
    if len(args) > 2:
        return TOO_MANY_ARGUMENTS
    # The message number is judged first so that "TOP 0" and "TOP x" read
    # the same as they do for RETR.
    number = _message_number(args[0])
    if isinstance(number, str):
        return number
    if len(args) < 2:
        return MISSING_LINE_COUNT
    lines = _number(args[1])
    return INVALID_LINE_COUNT if lines is None else Top(number, lines)


def _rest_verbatim(cls: Callable[[str], Command], missing: str) -> _Parser:
    def parse(rest: bytes | None) -> _Parsed:
        if not rest:
            return missing
        # surrogateescape keeps every byte: upstream re-encodes with the same
        # handler and gets the client's exact bytes back, whatever the charset.
        return cls(rest.decode("utf-8", errors="surrogateescape"))

    return parse


def _parse_auth(rest: bytes | None) -> _Parsed:
    args = _split(rest)
    if not args:
        return Auth()
    if len(args) > 2:
        return TOO_MANY_ARGUMENTS
    mechanism = args[0].upper()
    if len(mechanism) > 20 or not _MECHANISM_CHARS.issuperset(mechanism):
        return INVALID_MECHANISM
    return Auth(mechanism.decode("ascii"), args[1] if len(args) == 2 else None)


# keyword -> (command class, argument parser).  ``rest`` is everything after
# the first space, verbatim, or None when the line had no space at all.
_PARSERS: dict[bytes, tuple[type[Command], _Parser]] = {
    b"USER": (User, _rest_verbatim(User, MISSING_USER_NAME)),
    b"PASS": (Pass, _rest_verbatim(Pass, MISSING_PASSWORD)),
    b"STAT": (Stat, _no_arguments(Stat)),
    b"LIST": (List, _optional_message(List)),
    b"RETR": (Retr, _one_message(Retr)),
    b"DELE": (Dele, _one_message(Dele)),
    b"NOOP": (Noop, _no_arguments(Noop)),
    b"RSET": (Rset, _no_arguments(Rset)),
    b"QUIT": (Quit, _no_arguments(Quit)),
    b"TOP": (Top, _parse_top),
    b"UIDL": (Uidl, _optional_message(Uidl)),
    b"CAPA": (Capa, _no_arguments(Capa)),
    b"STLS": (Stls, _no_arguments(Stls)),
    b"AUTH": (Auth, _parse_auth),
}


def parse_command(line: bytes) -> Command | BadCommand:
    """Parse one command line given without its line terminator."""
    # A NUL would be cut short by C-string handling further down the line
    # (upstream servers, logs); a lone CR can only be half of a line end or
    # an attempt to smuggle one.  Neither belongs in a POP3 command.
    if b"\0" in line or b"\r" in line:
        return BadCommand(INVALID_CHARACTER)
    if not line:
        return BadCommand(EMPTY_COMMAND)
    keyword, space, rest = line.partition(b" ")
    entry = _PARSERS.get(keyword.upper())
    if entry is None:
        return BadCommand(UNKNOWN_COMMAND)
    cls, parse = entry
    parsed = parse(rest if space else None)
    return BadCommand(parsed, cls) if isinstance(parsed, str) else parsed
