"""The primitive each IMAP engine provides: one connection that runs commands.

`bridge.imap.mailbox.ImapMailbox` writes the mailbox operations once over an `ImapChannel`;
an engine (`bridge.imap.trio_engine`, `bridge.imap.aioimaplib_engine`) only connects, frames commands and
reads their answers. A command is given as its name and arguments (already in IMAP syntax:
quoted strings, folder arguments, UID sets), so an engine built on a library that wants them
apart can have them apart.

Every method runs within upstream.timeout_seconds; whatever goes wrong half-way (timeout,
cancellation, lost connection, an implausible answer) leaves the channel marked unusable,
never half-read, and is raised as an UpstreamError naming `what` was being done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from bridge.imap.errors import UpstreamError
from bridge.imap.interface import RangeReader
from bridge.imap.limits import MAX_OTHER_LITERAL_BYTES
from bridge.imap.untagged import ServerView
from bridge.imap.wire import Response


@dataclass(slots=True)
class Reply:
    """A command's answer: its tagged status text (`OK ...`, `NO ...`, `BAD ...`, the tag
    taken off) and the untagged responses read on the way."""

    status: bytes
    responses: list[Response] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status[:2].upper() == b"OK"

    @property
    def result(self) -> str:
        """OK, NO or BAD."""
        return self.status.split(b" ", 1)[0].decode("ascii", "replace").upper()

    @property
    def text(self) -> bytes:
        """The status text after OK/NO/BAD (with its response code, if any)."""
        parts = self.status.split(b" ", 1)
        return parts[1] if len(parts) > 1 else b""

    def require(self, what: str) -> Reply:
        """This reply if it is OK; else UpstreamError naming `what` and the result."""
        if not self.ok:
            raise UpstreamError(f"{what}: server answered {self.result}")
        return self


@dataclass(frozen=True, slots=True)
class Command:
    """`[UID ]NAME arg arg ...`: arguments already in IMAP syntax."""

    name: bytes
    args: tuple[bytes, ...] = ()
    uid: bool = False

    def line(self) -> bytes:
        return b" ".join((b"UID", self.name, *self.args) if self.uid else (self.name, *self.args))


@dataclass(frozen=True, slots=True)
class TlsSession:
    """What `pop3-imap-bridge probe` shows of a connection's TLS (bridge.ops.probe)."""

    version: str | None
    cipher: str | None
    # The server's certificate as ssl.getpeercert() gives it; {} when it was not verified.
    certificate: dict[str, Any]

    @classmethod
    def of(cls, ssl_object: Any) -> TlsSession:
        cipher = ssl_object.cipher()
        return cls(ssl_object.version(), cipher[0] if cipher else None, ssl_object.getpeercert() or {})


class StopSignal:
    """Tells a parked connection's keeper to stop and hand the connection over. Like a
    `trio.Event`, and it also cancels the scopes a keeper reads under (`cancelling`) as it is
    set: the keeper's read ends in the next turn of the event loop, not one turn after a
    watcher task has woken to cancel it. Under load a turn is one scheduler batch of every
    busy session, and a login on a parked connection waits for each one."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._scopes: set[trio.CancelScope] = set()

    def set(self) -> None:
        self._event.set()
        for scope in self._scopes:
            scope.cancel()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    @contextmanager
    def cancelling(self, deadline: float = float("inf")) -> Iterator[trio.CancelScope]:
        """A cancel scope (with `deadline`) that is cancelled when this signal is set, or at
        once if it is set already."""
        with trio.CancelScope(deadline=deadline) as scope:
            if self._event.is_set():
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)


class ImapChannel(Protocol):
    # What this connection has learnt of the server (capabilities, the selected folder),
    # kept up to date from every response the engine reads.
    view: ServerView
    # The engine follows untagged responses between commands and can pipeline, so a warm
    # listing of the maildrop can be kept (and parked connections IDLE).
    keeps_listing: bool
    # stream_body hands out a literal as it arrives (else the mailbox reads it in chunks).
    streams_bodies: bool
    # Closed by the bridge because what used it gave up half-way through a command (its
    # session ended: the client left, stopped reading, was kicked), the connection being fine.
    abandoned: bool

    @property
    def usable(self) -> bool: ...

    async def run(
        self, what: str, command: Command, *, literal: bytes | None = None,
        literal_budget: int = MAX_OTHER_LITERAL_BYTES, collect: bool = False, secret: bool = False,
    ) -> Reply:
        """Send one command (with `literal` appended as its last argument, if given) and
        read up to its tagged answer; every untagged response goes to `view` (and, with
        `collect`, into the reply). `literal_budget`: the literal bytes the answer may bring
        back (bridge.imap.limits). `secret`: the command carries a password."""
        ...

    async def authenticate(self, what: str, command: Command, respond: Callable[[bytes], bytes]) -> Reply:
        """A command the server may answer with continuation requests (AUTHENTICATE, RFC
        3501 6.2.2): each `+ <text>` is answered with the line `respond(text)` (text without
        the `+ `), up to the tagged answer. The command and the lines carry credentials: no
        engine logs them."""
        ...

    async def pipeline(self, what: str, commands: Sequence[Command]) -> list[Reply]:
        """Several commands in one write, all their answers read (one round trip); the
        replies carry the status only (the untagged responses went to `view`)."""
        ...

    async def fetch_bodies(self, what: str, command: Command, literal_budget: int) -> tuple[Reply, dict[int, bytes]]:
        """A UID FETCH of BODY sections: the reply, and each body by UID."""
        ...

    def stream_body(self, uid: int, offset: int, length: int) -> AbstractAsyncContextManager[RangeReader]:
        """One partial FETCH of the selected folder's message `uid`, its literal handed out
        as it arrives (streams_bodies only)."""
        ...

    async def idle(self, stop: StopSignal, interval: float) -> None:
        """IDLE (RFC 2177) until `stop` is set or `interval` has passed (keeps_listing only).
        Ended by `stop`, the IDLE is left open: the next command ends it (a pipeline sends
        DONE in the same write)."""
        ...

    async def logout(self) -> None:
        """LOGOUT, best effort and bounded in time; the connection is closed either way."""
        ...

    def close(self) -> None:
        """Close at once; the channel is unusable from now on."""
        ...

    def tls_session(self) -> TlsSession | None:
        """The connection's TLS, or None without TLS."""
        ...
