"""Sans-IO POP3 server core: bytes in, events and bytes out.

No sockets, no Trio, no IMAP here.  The session layer feeds what it reads to
`Pop3Server.receive_data`, acts on what `Pop3Server.next_event` returns, and
answers the request events with the matching methods.  See `connection` for
the state machine and its input bounds.
"""

from .commands import Auth, BadCommand, Command, Stls, parse_command
from .connection import Pop3Server, State
from .dotstuff import DotStuffer, MessageEncoder, TopEncoder, TopFilter
from .errors import LocalProtocolError
from .events import (
    NEED_DATA,
    Close,
    CommitRequest,
    Event,
    LoginRequest,
    NeedData,
    PreparedRetrieve,
    RetrieveRequest,
    Send,
    StartTls,
)
from .linebuffer import LINE_TOO_LONG, LineBuffer, LineTooLong
from .maildrop import Maildrop, MaildropEntry, MessageList, Unavailable
from .responses import ResponseCode, continuation, err, multiline, ok
from .sasl import MAX_RESPONSE_LINE, SUPPORTED_MECHANISMS

__all__ = [
    "LINE_TOO_LONG",
    "MAX_RESPONSE_LINE",
    "NEED_DATA",
    "SUPPORTED_MECHANISMS",
    "Auth",
    "BadCommand",
    "Close",
    "Command",
    "CommitRequest",
    "DotStuffer",
    "Event",
    "LineBuffer",
    "LineTooLong",
    "LocalProtocolError",
    "LoginRequest",
    "Maildrop",
    "MaildropEntry",
    "MessageList",
    "MessageEncoder",
    "NeedData",
    "PreparedRetrieve",
    "Pop3Server",
    "ResponseCode",
    "RetrieveRequest",
    "Send",
    "StartTls",
    "State",
    "Stls",
    "TopEncoder",
    "TopFilter",
    "Unavailable",
    "continuation",
    "err",
    "multiline",
    "ok",
    "parse_command",
]
