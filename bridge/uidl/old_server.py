"""The old POP3 server, as `uidl import` reads it: UIDL, LIST and `TOP n 0`, nothing else.

Read-only by construction: the client sends USER/PASS (or AUTH PLAIN), CAPA, STLS, UIDL,
LIST and TOP, never DELE, and leaves without QUIT, so the old server enters no UPDATE state
and changes nothing (RFC 1939 section 6). `TOP n 0` is pipelined (RFC 2449 PIPELINING) where
the server offers it. Addresses: `pop3s://host[:port]` (TLS from the start, port 995) or
`pop3://host[:port]` (port 110, STLS when the server offers it; a password goes in plaintext
only to a loopback address or with `allow_plaintext`). The old server is another party:
every line, count and size it sends is bounded (a header is kept up to the first
HEADER_FETCH_LIMIT bytes, lines up to 64 KiB, at most MAX_MAILDROP_MESSAGES messages).
"""

from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from bridge.imap.limits import HEADER_FETCH_LIMIT, MAX_MAILDROP_MESSAGES
from bridge.net.addresses import is_loopback_host
from bridge.net.tls import load_client_context

_MAX_LINE = 64 * 1024
_PIPELINE_WINDOW = 64
_NUMBERED = re.compile(rb"(\d{1,10}) +(\S+)")


class OldServerError(Exception):
    """The old server could not be read; the message says why (never a password)."""


class OldServerLoginFailed(OldServerError):
    pass


@dataclass(frozen=True)
class OldServerAddress:
    host: str
    port: int
    implicit_tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'pop3s' if self.implicit_tls else 'pop3'}://{host}:{self.port}"


def parse_address(text: str) -> OldServerAddress:
    """`pop3s://host[:port]` or `pop3://host[:port]`; ValueError says what is wrong."""
    parts = urlsplit(text)
    if parts.scheme not in ("pop3", "pop3s"):
        raise ValueError(f"{text!r}: give pop3s://host[:port] or pop3://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r}: bad port") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{text!r}: give pop3s://host[:port] or pop3://host[:port], nothing more")
    implicit = parts.scheme == "pop3s"
    return OldServerAddress(parts.hostname, port or (995 if implicit else 110), implicit)


@dataclass(frozen=True)
class OldMessage:
    """One message as the old server lists it: its number, UIDL (as sent), size (LIST) and
    header (TOP n 0, at most HEADER_FETCH_LIMIT bytes kept)."""

    number: int
    uidl: bytes
    size: int
    header: bytes


class OldServer:
    """One logged-in connection to the old server (`async with connect(...)`)."""

    def __init__(self, stream: trio.abc.Stream, address: OldServerAddress) -> None:
        self._stream = stream
        self._address = address
        self._buffer = bytearray()
        self.capabilities: frozenset[bytes] = frozenset()

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > _MAX_LINE:
                raise OldServerError(f"{self._address}: a line longer than {_MAX_LINE} bytes")
            data = await self._stream.receive_some(65536)
            if not data:
                raise OldServerError(f"{self._address}: the server closed the connection")
            self._buffer += data
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        return line

    async def _status(self, what: str) -> bytes:
        line = await self._line()
        if line.startswith(b"+OK"):
            return line
        text = line.decode("ascii", "replace")[:200]
        raise OldServerError(f"{self._address}: {what}: {text or 'no answer'}")

    async def _lines(self, keep: int | None = None) -> list[bytes]:
        """The lines of a multi-line answer, un-stuffed; with `keep`, only its first `keep`
        bytes are held (the rest is read and dropped)."""
        lines: list[bytes] = []
        held = 0
        while True:
            line = await self._line()
            if line == b".":
                return lines
            if line.startswith(b"."):
                line = line[1:]
            if keep is None or held < keep:
                lines.append(line)
                held += len(line) + 2

    async def _send(self, *commands: bytes) -> None:
        await self._stream.send_all(b"".join(command + b"\r\n" for command in commands))

    async def greet(self) -> None:
        await self._status("greeting")
        await self._send(b"CAPA")
        if (await self._line()).startswith(b"+OK"):
            self.capabilities = frozenset(line.split(b" ", 1)[0].upper() for line in await self._lines())

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self._send(b"STLS")
        await self._status("STLS")
        tls = trio.SSLStream(self._stream, context, server_hostname=self._address.host)
        await _handshake(tls, self._address)
        self._stream = tls
        self._buffer.clear()
        await self._send(b"CAPA")
        if (await self._line()).startswith(b"+OK"):
            self.capabilities = frozenset(line.split(b" ", 1)[0].upper() for line in await self._lines())

    async def log_in(self, user: str, password: str) -> None:
        if any(ch in user + password for ch in "\r\n\0"):
            raise OldServerLoginFailed(f"{self._address}: the login or password holds CR, LF or NUL")
        await self._send(b"USER " + user.encode("utf-8"))
        if (await self._line()).startswith(b"+OK"):
            await self._send(b"PASS " + password.encode("utf-8"))
            if (await self._line()).startswith(b"+OK"):
                return
        elif b"SASL" in self.capabilities:
            token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
            await self._send(b"AUTH PLAIN " + token)
            if (await self._line()).startswith(b"+OK"):
                return
        raise OldServerLoginFailed(f"{self._address}: the old server refused the login of {user!r}")

    async def messages(self) -> list[OldMessage]:
        """Every message's number, UIDL, size and header, in the old server's order."""
        await self._send(b"UIDL")
        await self._status("UIDL")
        uidls = _numbered(await self._lines(), self._address, "UIDL")
        await self._send(b"LIST")
        await self._status("LIST")
        sizes = {number: _size(value, self._address) for number, value in _numbered(await self._lines(), self._address, "LIST").items()}
        if set(uidls) != set(sizes):
            raise OldServerError(f"{self._address}: UIDL and LIST name different messages")
        numbers = sorted(uidls)
        headers: dict[int, bytes] = {}
        window = _PIPELINE_WINDOW if b"PIPELINING" in self.capabilities else 1
        for start in range(0, len(numbers), window):
            batch = numbers[start : start + window]
            await self._send(*(b"TOP %d 0" % number for number in batch))
            for number in batch:
                await self._status(f"TOP {number} 0 (the import needs TOP)")
                lines = await self._lines(keep=HEADER_FETCH_LIMIT)
                headers[number] = b"".join(line + b"\r\n" for line in lines)[:HEADER_FETCH_LIMIT]
        return [OldMessage(number, uidls[number], sizes[number], headers[number]) for number in numbers]

    async def aclose(self) -> None:
        # No QUIT: the session never enters UPDATE, so the old server changes nothing.
        await self._stream.aclose()


def _numbered(lines: list[bytes], address: OldServerAddress, what: str) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for line in lines:
        match = _NUMBERED.match(line)
        if match is None:
            raise OldServerError(f"{address}: {what}: a line that is not `number value`")
        number = int(match.group(1))
        if not 1 <= number <= MAX_MAILDROP_MESSAGES or number in found:
            raise OldServerError(f"{address}: {what}: message number {number} out of place")
        found[number] = match.group(2)
    return found


def _size(value: bytes, address: OldServerAddress) -> int:
    if not value.isdigit() or len(value) > 15:
        raise OldServerError(f"{address}: LIST: {value[:20]!r} is no size")
    return int(value)


async def _handshake(tls: trio.SSLStream[trio.abc.Stream], address: OldServerAddress) -> None:
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise OldServerError(f"{address}: certificate verification failed: {cause.verify_message}") from None
        raise OldServerError(f"{address}: TLS handshake failed") from None


async def connect(
    address: OldServerAddress, *, ca_file: str = "", verify: bool = True, allow_plaintext: bool = False,
) -> OldServer:
    """A greeted connection, TLS as the address says (STLS where offered for pop3://)."""
    context = load_client_context(ca_file, verify=verify)
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise OldServerError(f"{address}: cannot connect: {exc.strerror or type(exc).__name__}") from None
    if address.implicit_tls:
        tls = trio.SSLStream(stream, context, server_hostname=address.host)
        await _handshake(tls, address)
        stream = tls
    server = OldServer(stream, address)
    try:
        await server.greet()
        if not address.implicit_tls:
            if b"STLS" in server.capabilities:
                await server.start_tls(context)
            elif not (allow_plaintext or is_loopback_host(address.host)):
                raise OldServerError(
                    f"{address}: the server offers no STLS; use pop3s://, or --allow-plaintext to send "
                    "passwords unencrypted"
                )
    except BaseException:
        await stream.aclose()
        raise
    return server
