"""The POP3 client's connection as a session reads and writes it, with the timeouts of every
wait for the client (bridge.net.client_timeouts).

A TLS connection (or any other Trio stream) goes through the stream's own `receive_some` and
`send_all`. A plain TCP connection is read and written on its file descriptor with Trio's
low-level waits: `wait_readable` then one `os.read`, and `os.write` first; what the kernel
did not take at once goes to the event loop's write pump (bridge.net.write_pump), which
writes it as the client makes room while the session sleeps.

Why: a POP3 client downloading its mail sends one command and waits for its reply, 1,000
times for 1,000 messages. `SocketStream.receive_some` first tries a read that fails (the
command is not there yet) before it waits, and `send_all` yields to the scheduler after a
write that succeeded at once; on the 2-core benchmark machine the two cost about 28 µs of
CPU per command (a Trio echo server: 84 µs per request and reply, 56 µs this way), a
quarter of what the bridge spent on a small RETR. A reply the kernel takes at once sets no
timeout at all: only real waits do.

A client that answers a reply within `pop3.poll_microseconds` (a program on the same host
downloading its mail) has its next command polled for, a few reads without sleeping, before
the session waits for it: a CPU that goes idle between two commands takes far longer to wake
(tens of microseconds on a virtual machine) than such a client takes to send its next one.
Whether to poll follows the client's recent answers (`turnaround`, smoothed): a client
further away never qualifies, and a busy process sees even local clients answer late (it gets
back to them late), so it stops polling by itself. A poll never outlasts the window, and a
session whose client is polled for command after command still yields to the others every
few replies, as one whose client pipelines does.

Every wait is a Trio wait inside the session's cancel scope, which the watchdog cancels
when the wait's time is up; errors come out as Trio's stream errors.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable

import trio

from bridge.net.client_timeouts import ClientWait
from bridge.net.descriptors import descriptor_of
from bridge.net.write_pump import write_pump

# A stream without a file descriptor (TLS) sends in pieces of this size, each within the
# send timeout: the timeout measures a client that stops reading, not a slow link taking
# long over a big message (256 KiB take 2 s at 1 Mbit/s). On a plain socket each wait for
# room in the kernel's buffer gets the timeout, which measures the same more closely.
SEND_PIECE = 256 * 1024

# A send that needs no wait does not yield to the scheduler, nor does a command found by
# polling; after this many sends without a yield (a client that pipelines many commands, or
# one polled for through a whole download) one send does, so other sessions, and this
# session's own work in the background (the read-ahead's next FETCH), get their turn.
_SENDS_BETWEEN_YIELDS = 16
# How much each new answer time moves the smoothed one.
_TURNAROUND_WEIGHT = 0.25


class ClientStream:
    """`stream` with the session's `wait` kept up to date: `deadline` (Trio time) is when the
    session must end, for `deadline_reason` (pop3.session_timeout_seconds after it started, or
    before login pop3.login_timeout_seconds if that comes first)."""

    def __init__(
        self, stream: trio.abc.Stream, wait: ClientWait, deadline: float = math.inf,
        deadline_reason: str = "session_timeout", poll_seconds: float = 0.0,
    ) -> None:
        self.stream = stream
        self.wait = wait
        self.deadline = deadline
        self.deadline_reason = deadline_reason
        # The plain socket whose descriptor is read and written directly; None over TLS.
        self._socket = stream.socket if type(stream) is trio.SocketStream else None
        self._sends_without_yield = 0
        self.poll_seconds = poll_seconds
        # Seconds from a reply sent at once to the client's next bytes, smoothed; inf until
        # measured. `_replied_at` (perf_counter) is when the last such reply went out, 0 when
        # the next bytes answer nothing (a send had to wait, or they were counted already).
        self.turnaround = math.inf
        self._replied_at = 0.0

    def _waiting(self, seconds: float, reason: str) -> None:
        wait = self.wait
        due = trio.current_time() + seconds
        if due < self.deadline:
            wait.due, wait.reason = due, reason
        else:
            wait.due, wait.reason = self.deadline, self.deadline_reason

    async def receive(self, max_bytes: int, allowed_seconds: float) -> bytes:
        """Up to `max_bytes`; b"" when the client closed its side. Ends as "autologout" after
        `allowed_seconds` without a byte."""
        self._waiting(allowed_seconds, "autologout")
        try:
            if self._socket is None:
                return await self.stream.receive_some(max_bytes)
            data = self._poll(self._descriptor(), max_bytes) if self.turnaround < self.poll_seconds else None
            while data is None:
                await trio.lowlevel.wait_readable(self._descriptor())
                self._sends_without_yield = 0
                try:
                    data = os.read(self._descriptor(), max_bytes)
                except BlockingIOError:
                    continue  # woken without data after all
                except OSError as exc:
                    raise _stream_error(exc) from exc
            if self._replied_at:
                # Capped: a single late answer (or a moment this process spent on other work
                # before reading it) moves the smoothed figure by a bounded step, while a client
                # that is always slow still ends up at the cap, above the window.
                answered = min(time.perf_counter() - self._replied_at, 2 * self.poll_seconds)
                self._replied_at = 0.0
                old = self.turnaround
                self.turnaround = answered if old == math.inf else old + (answered - old) * _TURNAROUND_WEIGHT
            return data
        finally:
            self.wait.due = math.inf

    def _poll(self, fd: int, max_bytes: int) -> bytes | None:
        """What the client sent within `poll_seconds`, read without sleeping; None if nothing."""
        give_up = time.perf_counter() + self.poll_seconds
        while True:
            try:
                return os.read(fd, max_bytes)
            except BlockingIOError:
                if time.perf_counter() > give_up:
                    return None
            except OSError as exc:
                raise _stream_error(exc) from exc

    async def send(self, data: bytes | memoryview, allowed_seconds: float) -> bool:
        """All of `data`; ends as "send_timeout" when the client takes nothing for
        `allowed_seconds`. True if the client was slower than the data: the socket's buffer
        filled up and the send had to wait (over TLS: always, as far as this can tell)."""
        view = memoryview(data)
        if self._socket is None:
            for start in range(0, len(view), SEND_PIECE):
                self._waiting(allowed_seconds, "send_timeout")
                try:
                    await self.stream.send_all(view[start : start + SEND_PIECE])
                finally:
                    self.wait.due = math.inf
            return True
        sent = self._write(view)
        if sent < len(view):
            self._sends_without_yield = 0
            self._replied_at = 0.0
            pump = write_pump()
            if pump is not None:
                await self._pumped(pump.write(self._descriptor(), view[sent:], self._progress(allowed_seconds)))
                return True
            while sent < len(view):
                self._waiting(allowed_seconds, "send_timeout")
                try:
                    await trio.lowlevel.wait_writable(self._descriptor())
                finally:
                    self.wait.due = math.inf
                sent += self._write(view[sent:])
            return True
        self._replied_at = time.perf_counter()
        self._sends_without_yield += 1
        if self._sends_without_yield >= _SENDS_BETWEEN_YIELDS:
            self._sends_without_yield = 0
            await trio.lowlevel.checkpoint()
        return False

    async def send_file(
        self, fd: int, length: int, allowed_seconds: float, start: int = 0, piece_size: int = SEND_PIECE
    ) -> None:
        """Bytes [start, length) of the file `fd`: with sendfile on a plain socket (the
        kernel copies from its page cache), read and sent in pieces of `piece_size` over TLS
        (what a slow reader's session holds while it waits). Ends as "send_timeout" like
        `send`; raises EOFError if the file is shorter than `length`."""
        if self._socket is None:
            for offset in range(start, length, piece_size):
                piece = os.pread(fd, min(piece_size, length - offset), offset)
                if not piece:
                    raise EOFError("file ended early")
                await self.send(piece, allowed_seconds)
            return
        offset = start
        while offset < length:
            try:
                sent = os.sendfile(self._descriptor(), fd, offset, length - offset)
            except BlockingIOError:
                pump = write_pump()
                if pump is not None:
                    progressed = self._progress(allowed_seconds)
                    await self._pumped(pump.send_file(self._descriptor(), fd, offset, length, progressed))
                    break
                self._waiting(allowed_seconds, "send_timeout")
                try:
                    await trio.lowlevel.wait_writable(self._descriptor())
                finally:
                    self.wait.due = math.inf
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc
            if not sent:
                raise EOFError("file ended early")
            offset += sent
        await trio.lowlevel.checkpoint()

    def _progress(self, allowed_seconds: float) -> Callable[[], None]:
        # Each write the client made room for starts its send timeout again, as each wait
        # for room does when the session waits itself.
        self._waiting(allowed_seconds, "send_timeout")
        return lambda: self._waiting(allowed_seconds, "send_timeout")

    async def _pumped(self, writing: Awaitable[None]) -> None:
        try:
            await writing
        except OSError as exc:
            raise _stream_error(exc) from exc
        finally:
            self.wait.due = math.inf

    def _descriptor(self) -> int:
        assert self._socket is not None
        return descriptor_of(self._socket, "client connection")

    def _write(self, view: memoryview) -> int:
        try:
            return os.write(self._descriptor(), view)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc


def _stream_error(exc: OSError) -> trio.BrokenResourceError:
    # What SocketStream would raise: the session ends with outcome "client_gone".
    return trio.BrokenResourceError(f"client connection lost: {exc.strerror}")
