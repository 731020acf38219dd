"""aioimaplib 2.0.3 (pinned), made fit for the bridge by subclassing. Every fix is here:

- its response handler recurses once per line (a ~1,000-line read raises RecursionError) and
  copies the unread tail for every line; `_handle_responses` is replaced by a loop over offsets;
- its FETCH completeness check rescans every line of the response for every new line
  (quadratic); `IncrementalFetchCommand` keeps a running parenthesis depth instead;
- a lost connection is not surfaced, the next command hangs; `connection_lost` now fails every
  pending command at once;
- it formats every received chunk into a debug log string even when debug is off (and would
  log message bodies); `data_received` and `send` skip that;
- it takes "PREAUTH" or "OK" anywhere in the greeting for its status; `welcome` goes by the
  status alone and refuses PREAUTH (bridge.imap.errors.PreauthGreeting);
- it reads a literal of whatever size the server announces; each command has a budget of
  literal bytes (bridge.imap.limits), and a literal beyond it drops the connection;
- it answers no continuation request of AUTHENTICATE (its xoauth2() hangs on an error
  challenge until its timeout); `_continuation` answers them with the channel's `sasl_respond`;
- it has no STARTTLS: the plaintext the server sends after its STARTTLS OK must be dropped
  (a response-injection defence): `starttls_tag` and `plaintext_closed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aioimaplib import aioimaplib as _aio

from bridge.imap.errors import PreauthGreeting
from bridge.imap.limits import MAX_OTHER_LITERAL_BYTES


class IncrementalFetchCommand(_aio.FetchCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._depth = 0

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        # Literal payloads arrive as bytearray and never count towards parentheses.
        if type(line) is bytes:
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._depth = line.count(b"(") - line.count(b")")
            else:
                self._depth += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._depth > 0


class ClientProtocol(_aio.IMAP4ClientProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.lost = False
        self.greeting_error: str | None = None
        # STARTTLS: the tag of the command in flight, and whether its tagged answer came in.
        # From that answer until TLS takes over, received bytes are plaintext nobody may
        # inject into the encrypted session: they are dropped.
        self.starttls_tag: bytes | None = None
        self.plaintext_closed = False
        # Literal bytes the current command may still bring back (set per command, see
        # the channel's run); `violation` says why the connection was dropped past it.
        self.literal_budget = MAX_OTHER_LITERAL_BYTES
        self.violation: str | None = None
        # While an AUTHENTICATE runs: the line to send for each `+ <challenge>` (the channel's
        # `authenticate`, bridge.imap.bearer).
        self.sasl_respond: Callable[[bytes], bytes] | None = None

    def data_received(self, d: bytes) -> None:
        if self.plaintext_closed or self.violation is not None:
            return
        try:
            self._handle_responses(self.incomplete_line + d, self._handle_line, self.current_command)
            self.incomplete_line = b""
            self.current_command = None
        except _aio.IncompleteRead as incomplete_read:
            self.current_command = incomplete_read.cmd
            self.incomplete_line = incomplete_read.data

    def send(self, line: str, scrub: str | None = None) -> None:
        # surrogateescape: credentials that were not valid UTF-8 go out as the bytes the client sent.
        self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "AUTHENTICATE" and self.sasl_respond is not None:
            self.transport.write(self.sasl_respond(line[1:].strip()) + b"\r\n")
            return
        super()._continuation(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_pending(_aio.Abort("upstream connection lost"))

    def _refuse(self, violation: str) -> None:
        """The server sent something no sane server does: drop the connection."""
        self.violation = violation
        self._fail_pending(_aio.Abort(violation))
        if self.transport is not None:
            self.transport.close()

    def _fail_pending(self, error: Exception) -> None:
        pending = [*self.pending_async_commands.values(), self.pending_sync_command]
        for command in pending:
            if command is not None and not command._event.is_set():
                command._exception = error
                command.close(b"connection lost", "BYE")

    async def welcome(self, command: bytes) -> None:
        # aioimaplib looks for "PREAUTH" and "OK" anywhere in the greeting: "* BYE ... OK"
        # would pass for OK, and "PREAUTH" in an OK greeting's text would skip LOGIN and
        # STARTTLS. Only the greeting's status counts here, and PREAUTH is refused
        # (bridge.imap.errors.PreauthGreeting).
        status = command[:10].upper()
        try:
            if status.startswith(b"* PREAUTH"):
                raise PreauthGreeting()
            if not status.startswith(b"* OK"):
                raise _aio.Error(command.decode("utf-8", "replace"))
            await super().welcome(b"* OK")
        except Exception as exc:  # PREAUTH, a BYE greeting or a non-IMAP4rev1 server
            self.greeting_error = "PREAUTH" if isinstance(exc, PreauthGreeting) else type(exc).__name__
            async with self.state_condition:
                self.state = _aio.LOGOUT
                self.state_condition.notify_all()

    def _handle_responses(
        self,
        data: bytes,
        line_handler: Callable[[bytes, _aio.Command], _aio.Command | None],
        current_cmd: _aio.Command | None = None,
    ) -> None:
        pos, end_of_data = 0, len(data)
        while True:
            if pos >= end_of_data:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise _aio.IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                missing = current_cmd._expected_size - len(current_cmd._resp_literal_data)
                piece = data[pos : pos + missing]
                pos += len(piece)
                current_cmd.append_literal_data(piece)
                if current_cmd.wait_literal_data():
                    raise _aio.IncompleteRead(current_cmd)
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                raise _aio.IncompleteRead(current_cmd, data[pos:])
            line = data[pos:line_end]
            pos = line_end + 2
            command = line_handler(line, current_cmd)
            if self.starttls_tag is not None and line.startswith(self.starttls_tag + b" "):
                self.plaintext_closed = True
                return
            literal = _aio.literal_data_re.match(line)
            if literal:
                size = int(literal.group("size"))
                if size > self.literal_budget:
                    self._refuse(f"a {size}-byte literal, more than the {self.literal_budget} bytes left for this command")
                    return
                self.literal_budget -= size
                if command is None:
                    command = _aio.Command("NIL", "unused", loop=self.loop)
                command.begin_literal_data(int(literal.group("size")))
                current_cmd = command
            elif command is not None and command.wait_data():
                current_cmd = command
            else:
                current_cmd = None
