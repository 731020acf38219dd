"""The values `Pop3Server.next_event` hands to the I/O layer.

Each is small and frozen.  The request events (`LoginRequest`,
`RetrieveRequest`, `CommitRequest`) need an answer through the matching
`Pop3Server` method before the next call to ``next_event``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from .maildrop import MaildropEntry

__all__ = [
    "NEED_DATA",
    "Close",
    "CommitRequest",
    "Event",
    "LoginRequest",
    "NeedData",
    "RetrieveRequest",
    "Send",
    "StartTls",
]


class NeedData(enum.Enum):
    """Type of `NEED_DATA`: feed more bytes with ``receive_data`` first.

    A one-member enum gives a true singleton that type checkers understand.
    """

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client; the core has already moved on. ``command`` names the
    POP3 command answered (e.g. "STAT"; "UNKNOWN" for an unrecognised one), for metrics.
    ``rest``: more bytes to write after ``data``, in pieces, for a response too big to be
    built as one string per session (LIST and UIDL of a huge maildrop); ``whole()`` joins
    them (tests)."""

    data: bytes
    command: str | None = field(default=None, compare=False)
    rest: Iterable[bytes] = field(default=(), compare=False)

    def whole(self) -> bytes:
        return self.data + b"".join(self.rest)


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """USER and PASS (or an AUTH exchange) are in: answer with ``accept_login``
    or ``reject_login``.  ``mechanism`` says how the client logged in: "USER"
    for USER/PASS, else the SASL mechanism name ("PLAIN", "LOGIN")."""

    username: str
    password: str = field(repr=False)
    mechanism: str = "USER"


@dataclass(frozen=True, slots=True)
class StartTls:
    """STLS was accepted: send ``data`` (the +OK), then negotiate TLS on the
    connection and report with ``tls_established`` or ``tls_failed``.  Input
    received before the negotiation has already been thrown away."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RetrieveRequest:
    """RETR or TOP of a message that exists and is not marked.

    ``number`` is the 1-based number the client used; ``body_lines`` is None
    for RETR and the requested line count for TOP.
    """

    number: int
    entry: MaildropEntry
    body_lines: int | None


@dataclass(frozen=True, slots=True)
class PreparedRetrieve:
    """The whole reply to ``RETR number`` (status line, dot-stuffed body, terminator), made
    by `Pop3Server.prepare_retrieve` before the client asked for it. Not an event: the I/O
    layer holds it and offers it to `Pop3Server.take_prepared` with the next bytes it reads.
    """

    number: int
    entry: MaildropEntry
    reply: bytes
    # The command line as a client downloading in order sends it.
    command: bytes


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """QUIT in TRANSACTION: expunge ``marked`` upstream, then report back."""

    marked: tuple[MaildropEntry, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once everything returned before has been sent."""


Event = NeedData | Send | LoginRequest | RetrieveRequest | CommitRequest | Close | StartTls
