"""A scripted IMAP server on loopback, for the few upstream behaviours no real server shows:
a PREAUTH greeting (an on-path attacker's, or a pre-authenticating server's) and hostile
numbers (`* 4294967295 EXISTS`, a 4 GiB literal, a VANISHED range over every UID).

Everything else the bridge meets is real Dovecot (tests/conftest.py). The stub speaks just
enough IMAP4rev1 for the bridge's two engines to log in, select, list and fetch: it accepts
any login, serves `messages` as the INBOX, and lets a test replace any answer by overriding
`answer` (or `greeting`). It runs in its own thread with blocking sockets, so it can neither
share nor disturb the bridge's event loop.
"""

from __future__ import annotations

import base64
import re
import socket
import socketserver
import threading
from typing import Any

_FETCH_BODY = re.compile(rb"UID FETCH (\d+) \(UID BODY\.PEEK\[\]<(\d+)\.(\d+)>\)", re.IGNORECASE)
_BODY_PEEK = re.compile(rb"BODY\.PEEK\[\]<(\d+)\.(\d+)>", re.IGNORECASE)


class StubConnection:
    """One client connection: the commands it sent (tags stripped) and its user."""

    def __init__(self, server: StubImapServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.commands: list[bytes] = []
        self.user: str | None = None
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes | None:
        while b"\r\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line


class StubImapServer:
    """``with StubImapServer(messages=[...]) as stub:`` an IMAP server on ``stub.port``."""

    capabilities = b"IMAP4rev1 AUTH=PLAIN SASL-IR IDLE"

    def __init__(self, messages: list[bytes] | None = None) -> None:
        self.messages = list(messages or [])
        self.connections: list[StubConnection] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                stub._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="imap-stub", daemon=True)

    def __enter__(self) -> StubImapServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self.connections):
            connection.sock.close()

    def connections_of(self, user: str) -> int:
        """How many connections logged in as `user`."""
        with self._lock:
            return sum(1 for connection in self.connections if connection.user == user)

    def commands(self) -> list[bytes]:
        """Every command every connection sent, in order of connections."""
        with self._lock:
            return [command for connection in self.connections for command in connection.commands]

    # -- what tests override -----------------------------------------------------------------

    def greeting(self, connection: StubConnection) -> bytes:
        return b"* OK [CAPABILITY " + self.capabilities + b"] stub ready\r\n"

    def answer(self, connection: StubConnection, tag: bytes, command: bytes) -> bytes | None:
        """The bytes to send for one command (its tagged answer included); None closes."""
        name = command.split(b" ", 1)[0].upper()
        ok = tag + b" OK done\r\n"
        if name == b"CAPABILITY":
            return b"* CAPABILITY " + self.capabilities + b"\r\n" + ok
        if name in (b"LOGIN", b"AUTHENTICATE"):
            connection.user = _user_of(command)
            return tag + b" OK [CAPABILITY " + self.capabilities + b"] logged in\r\n"
        if name in (b"SELECT", b"EXAMINE"):
            return self.select_answer(connection) + tag + b" OK [READ-WRITE] selected\r\n"
        if name in (b"NOOP", b"ENABLE", b"CHECK"):
            return ok
        if name == b"LOGOUT":
            connection.send(b"* BYE logging out\r\n" + ok)
            return None
        if name == b"IDLE":
            connection.send(b"+ idling\r\n")
            done = connection.line()
            return None if done is None else ok
        if name in (b"UID", b"FETCH"):
            return self.fetch_answer(connection, command) + ok
        return tag + b" BAD not in this stub\r\n"

    def select_answer(self, connection: StubConnection) -> bytes:
        count = len(self.messages)
        return (
            b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
            b"* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT %d] next\r\n"
            % (count, count + 1)
        )

    def fetch_answer(self, connection: StubConnection, command: bytes) -> bytes:
        body = _FETCH_BODY.search(command)
        if body is not None:
            uid, offset, length = (int(value) for value in body.groups())
            if not 1 <= uid <= len(self.messages):
                return b""
            data = self.messages[uid - 1][offset : offset + length]
            return b"* %d FETCH (UID %d BODY[]<%d> {%d}\r\n" % (uid, uid, offset, len(data)) + data + b")\r\n"
        if b"RFC822.SIZE" in command.upper():
            return b"".join(
                b"* %d FETCH (UID %d RFC822.SIZE %d FLAGS ())\r\n" % (n, n, len(message))
                for n, message in enumerate(self.messages, 1)
            )
        return b""

    # -- serving -----------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        connection = StubConnection(self, sock)
        with self._lock:
            self.connections.append(connection)
        try:
            connection.send(self.greeting(connection))
            while (line := connection.line()) is not None:
                tag, _, command = line.partition(b" ")
                with self._lock:
                    connection.commands.append(command)
                reply = self.answer(connection, tag, command)
                if reply is None:
                    break
                connection.send(reply)
        except OSError:
            pass
        finally:
            sock.close()


def _user_of(command: bytes) -> str:
    """The user name of a LOGIN "user" "password" or AUTHENTICATE PLAIN <base64> command."""
    words = command.split(b" ")
    if words[0].upper() == b"LOGIN":
        return words[1].strip(b'"').decode()
    return base64.b64decode(words[2]).split(b"\0")[1].decode()


def stub_settings(stub: StubImapServer, **upstream: Any) -> dict[str, Any]:
    """The `upstream` section for a bridge in front of `stub` (plaintext: it has no TLS)."""
    return {"host": "127.0.0.1", "port": stub.port, "tls": "none", **upstream}
