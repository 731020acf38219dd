"""A POP3 client on Trio, for the rows that need thousands of connections from one process
(threads would not do): the 10,000 idle sessions and the slow readers.

Like bench/pop3client.py it parses no more than finding the end of a response needs. A
multi-line body is consumed as it arrives (only a few bytes of it are kept to find the
terminator, unless the caller wants the body). A small receive buffer makes a slow device on
a slow line; its reading at a fixed rate is bench.slow_clients.PacedReaders's, which takes
the socket over between the status line and the end of the body (`hand_over`).
"""

from __future__ import annotations

import socket

import trio

from bench.pop3client import Pop3Error

_TERMINATOR = b"\r\n.\r\n"
_DEFAULT_CHUNK = 65536


def unstuff(body: bytes) -> bytes:
    """The message a dot-stuffed multi-line body carries (RFC 1939, section 3)."""
    return (b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:]


class BodyEnd:
    """The end of a dot-stuffed multi-line body that arrives in pieces (right after its status
    line). `total` counts the body's bytes so far, up to the CRLF before the terminating dot."""

    def __init__(self) -> None:
        self.total = 0
        # The status line's CRLF: an empty body is ".\r\n" right after it.
        self._tail = b"\r\n"

    def feed(self, data: bytes) -> tuple[int, int] | None:
        """None while the body goes on. At its end, (where the body ends in `data`, negative
        if it ended in an earlier piece; where the terminator ends in `data`)."""
        combined = self._tail + data
        found = combined.find(_TERMINATOR)
        if found < 0:
            self.total += len(data)
            self._tail = combined[-4:]
            return None
        in_data = found + 2 - len(self._tail)
        self.total += in_data
        return in_data, found + len(_TERMINATOR) - len(self._tail)


class AsyncPop3:
    def __init__(self, stream: trio.SocketStream, chunk: int = _DEFAULT_CHUNK) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._chunk = chunk
        self.greeting = b""

    @classmethod
    async def connect(cls, host: str, port: int, *, receive_buffer: int | None = None) -> AsyncPop3:
        """Connect and read the greeting. `receive_buffer` sets SO_RCVBUF before connecting
        (so the window the server sees is small from the start) and the read size."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        client = cls(trio.SocketStream(sock), chunk=receive_buffer or _DEFAULT_CHUNK)
        try:
            client.greeting = await client._status()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(self._chunk)
        if not data:
            raise Pop3Error("server closed the connection")
        self._buf += data

    async def _status(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if not line.startswith(b"+OK"):
            raise Pop3Error(line.decode("ascii", "replace"))
        return line

    async def command(self, line: bytes) -> bytes:
        await self._stream.send_all(line + b"\r\n")
        return await self._status()

    async def multiline(self, line: bytes, *, keep: bool = False) -> tuple[int, bytes]:
        """Send `line`, consume the multi-line answer. Returns (body bytes, the body if
        `keep` else b"")."""
        await self.start_multiline(line)
        kept = bytearray()
        body = BodyEnd()
        while True:
            data = bytes(self._buf)
            end = body.feed(data)
            if end is not None:
                in_data, after = end
                if keep:
                    if in_data >= 0:
                        kept += data[:in_data]
                    else:
                        del kept[len(kept) + in_data:]
                del self._buf[:after]
                return body.total, bytes(kept)
            if keep:
                kept += data
            self._buf.clear()
            await self._fill()

    async def start_multiline(self, line: bytes) -> None:
        """Send `line` and read its status line; the body is the caller's to read."""
        await self._stream.send_all(line + b"\r\n")
        await self._status()

    def hand_over(self) -> tuple[int, bytes]:
        """The socket's descriptor and what was read past the last response, for a reader
        that reads the socket itself (the slow clients' pacer) while this client waits."""
        held = bytes(self._buf)
        self._buf.clear()
        return self._stream.socket.fileno(), held

    def take_back(self, data: bytes) -> None:
        """Bytes such a reader read past the end of the body."""
        self._buf[:0] = data

    async def login(self, user: str, password: str) -> None:
        await self.command(b"USER " + user.encode())
        await self.command(b"PASS " + password.encode())

    async def stat(self) -> tuple[int, int]:
        _ok, count, size = (await self.command(b"STAT")).split()[:3]
        return int(count), int(size)

    async def quit(self) -> None:
        await self.command(b"QUIT")
