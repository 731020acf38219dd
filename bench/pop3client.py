"""The one POP3 client that drives every server in the benchmark.

Blocking sockets and a single receive buffer, no parsing beyond what finding the end of a
response needs: the client should cost the same, and as little as possible, whichever
server it talks to.
"""

from __future__ import annotations

import socket
import time

_TERMINATOR = b"\r\n.\r\n"
_RECEIVE = 1 << 20


class Pop3Error(Exception):
    """The server answered -ERR (or closed the connection) where +OK was expected."""


class Pop3Client:
    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self.greeting = self._status()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Pop3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(_RECEIVE)
        if not chunk:
            raise Pop3Error("server closed the connection")
        self._buf += chunk

    def _status(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if not line.startswith(b"+OK"):
            raise Pop3Error(line.decode("ascii", "replace"))
        return line

    def _body(self) -> int:
        """Consume a multi-line body up to its terminator; returns its length in bytes. Only
        the last bytes of what came are kept between receives (a terminator may straddle
        two), so a big body costs the client no more than its receives."""
        buf = self._buf
        if buf[:3] == b".\r\n":
            del buf[:3]
            return 0
        passed = 0
        while (end := buf.find(_TERMINATOR)) < 0:
            if len(buf) > len(_TERMINATOR):
                keep = len(_TERMINATOR) - 1
                passed += len(buf) - keep
                del buf[:-keep]
            self._fill()
            if not passed and buf[:3] == b".\r\n":
                del buf[:3]
                return 0
        del buf[: end + len(_TERMINATOR)]
        return passed + end + 2

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self._status()

    def multiline(self, line: bytes) -> int:
        self.sock.sendall(line + b"\r\n")
        self._status()
        return self._body()

    def login(self, user: str, password: str) -> None:
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + password.encode())

    def stat(self) -> tuple[int, int]:
        _ok, count, size = self.command(b"STAT").split()[:3]
        return int(count), int(size)

    def quit(self) -> None:
        self.command(b"QUIT")


def poll(host: str, port: int, user: str, password: str) -> tuple[float, int]:
    """A "leave mail on server" poll: login, STAT, UIDL, LIST, QUIT. (seconds, messages)."""
    started = time.perf_counter()
    with Pop3Client(host, port) as client:
        client.login(user, password)
        count, _size = client.stat()
        client.multiline(b"UIDL")
        client.multiline(b"LIST")
        client.quit()
    return time.perf_counter() - started, count


def session_setup(host: str, port: int, user: str, password: str) -> float:
    """connect -> greeting -> USER/PASS -> STAT; the connection is then dropped with QUIT
    outside the timed part."""
    started = time.perf_counter()
    client = Pop3Client(host, port)
    try:
        client.login(user, password)
        client.stat()
        elapsed = time.perf_counter() - started
        client.quit()
    finally:
        client.close()
    return elapsed
