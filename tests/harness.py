"""Running the real bridge for tests: in a background thread (fast) or as a subprocess (the
real command line, for memory and signal tests). Both listen on a free loopback port and are
stopped by the fixture that started them, even when the test fails."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from bridge.config import BridgeSettings, load_settings
from bridge.net.server import Pop3Service
from bridge.ops.logs import configure_logging

# The key signing per-client state records (delete.state_key). Every bridge a test starts
# uses it, as every bridge host serving the same mailboxes must share one.
TEST_STATE_KEY = "tests-only state key, at least 32 characters long"

# Set for each test by tests/conftest.py: the engine the suite runs on (`pytest --engine`;
# a test that names an engine itself keeps it), and the error-level log events the test
# declared it expects (@pytest.mark.bridge_errors). Any other error event a bridge logs fails
# the test when the bridge stops: a session that crashes must never pass unnoticed.
ENGINES = ("trio", "aioimaplib")  # upstream.engine: both IMAP client engines the bridge ships
DEFAULT_ENGINE = "trio"
EXPECTED_ERRORS: frozenset[str] = frozenset()


def unexpected_errors(events: list[dict[str, Any]]) -> list[str]:
    """The error-level events the running test did not declare, as short descriptions."""
    return [
        f"{event.get('event')}: {str(event.get('error') or event.get('exception') or '')[-300:]}"
        for event in events
        if event.get("level") in ("error", "critical") and event.get("event") not in EXPECTED_ERRORS
    ]


def _check_errors(events: list[dict[str, Any]]) -> None:
    problems = unexpected_errors(events)
    if problems:
        raise AssertionError(
            "the bridge logged error events this test does not expect "
            "(declare expected ones with @pytest.mark.bridge_errors(...)):\n" + "\n".join(problems)
        )


def bridge_settings(imap_port: int, **sections: Any) -> BridgeSettings:
    overrides: dict[str, Any] = {
        "pop3": {"listen": ["127.0.0.1:0"]},
        "upstream": {
            "host": "127.0.0.1", "port": imap_port, "timeout_seconds": 10, "tls": "none", "engine": DEFAULT_ENGINE,
        },
        "logging": {"level": "debug", "format": "json"},
    }
    for section, values in sections.items():
        if isinstance(values, list):  # routes=[...]: the [[routes]] as given
            overrides[section] = values
        else:
            overrides.setdefault(section, {}).update(values)
    delete = overrides.setdefault("delete", {})
    if "state_key" not in delete and "state_key_file" not in delete:
        delete["state_key"] = TEST_STATE_KEY
    return load_settings(None, overrides)


class _LockedBuffer(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return super().write(text)

    def getvalue(self) -> str:
        with self._lock:
            return super().getvalue()


class ThreadedBridge:
    """The service on its own Trio loop in a thread; tests talk to it with blocking clients."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.log = _LockedBuffer()
        self.port = 0
        self.addresses: list[str] = []  # every bound address: pop3.listen ones, then tls_listen
        # The running service, for tests that wait on its state (read from the test thread:
        # plain attribute reads, nothing to lock).
        self.service: Pop3Service | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self.service = Pop3Service(self.settings)
            addresses = await nursery.start(self.service.serve)
            self.port = int(addresses[0].rsplit(":", 1)[1])
            self.addresses = list(addresses)
            self._ready.set()

    def start(self) -> ThreadedBridge:
        configure_logging("debug", "json", stream=self.log)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("bridge did not start within 30 s")
        if self._error is not None:
            raise RuntimeError("bridge failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("bridge thread did not stop within 30 s")
        if self._error is not None:
            raise RuntimeError("bridge crashed") from self._error
        _check_errors(self.events())

    @property
    def trio_token(self) -> trio.lowlevel.TrioToken:
        """For running a function on the bridge's loop (trio.from_thread.run)."""
        assert self._token is not None, "the bridge is not running"
        return self._token

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line.startswith("{")]

    def crashed(self) -> bool:
        """The service ended by itself (an error escaped it): it is no longer serving."""
        return self._ready.is_set() and not self._thread.is_alive()

    def __enter__(self) -> ThreadedBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SubprocessBridge:
    """`python -m bridge serve --config FILE` as a child process."""

    def __init__(
        self, workdir: Path, imap_port: int, extra_toml: str = "", env: dict[str, str] | None = None,
        interpreter_options: tuple[str, ...] = (),
    ) -> None:
        self.interpreter_options = interpreter_options  # e.g. ("-X", "importtime")
        # e.g. BRIDGE_<SECTION>__<KEY> overrides
        self.env = {"BRIDGE_DELETE__STATE_KEY": TEST_STATE_KEY, "BRIDGE_UPSTREAM__ENGINE": DEFAULT_ENGINE, **(env or {})}
        self.port = free_port()
        self.config_path = workdir / "bridge.toml"
        self.config_path.write_text(
            f'[pop3]\nlisten = ["127.0.0.1:{self.port}"]\n'
            f'[upstream]\nhost = "127.0.0.1"\nport = {imap_port}\ntimeout_seconds = 10\ntls = "none"\n'
            f'[logging]\nlevel = "info"\nformat = "json"\n{extra_toml}'
        )
        self.log_path = workdir / "bridge.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SubprocessBridge:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, *self.interpreter_options, "-m", "bridge", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(100).startswith(b"+OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"bridge did not listen within 30 s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.log_path.exists():
            _check_errors(self.events())

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events written so far."""
        text = self.log_path.read_text(errors="replace")
        # The last piece may be a line still being written.
        return [json.loads(line) for line in text.split("\n")[:-1] if line.startswith("{")]

    def __enter__(self) -> SubprocessBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# A raw-socket POP3 client: the exact bytes on the wire, for byte-for-byte comparisons
# (poplib un-stuffs dots and splits lines, which would hide exactly the bugs we look for).
# ---------------------------------------------------------------------------

import poplib  # noqa: E402  (helpers appended below the bridge runners)
from collections.abc import Callable  # noqa: E402

POP3_TERMINATOR = b"\r\n.\r\n"


def pop3_unstuff(raw_body: bytes) -> bytes:
    """A multi-line response body as sent (after the status line, with its ``.CRLF``
    terminator) back to the data it carries: terminator removed, stuffed dots removed."""
    if not raw_body.endswith(b".\r\n"):
        raise ValueError(f"no terminator at the end of {raw_body[-40:]!r}")
    body = raw_body[:-3]
    if body[:1] == b".":
        body = body[1:]
    return body.replace(b"\n..", b"\n.")


class RawPop3:
    """Blocking POP3 over a plain socket that hands back responses byte for byte.

    ``status()`` reads one status line (CRLF included); ``multiline()`` reads a status line
    and, if it is +OK, everything up to and including the ``.CRLF`` terminator line.
    Responses are read from one buffer in order, so pipelined commands can be sent in one
    write and their answers collected one after another.
    """

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = bytearray()
        self.greeting = self.status()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPop3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"server closed the connection; unread: {bytes(self._buf[-200:])!r}")
        self._buf += chunk

    def take_buffered(self) -> bytes:
        """Bytes already read off the socket but not yet returned, for a test that goes on
        reading the socket itself (the bridge may send a status line and data in one write)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def status(self) -> bytes:
        """One status line, CRLF included."""
        while (end := self._buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buf[: end + 2])
        del self._buf[: end + 2]
        return line

    def body(self) -> bytes:
        """The lines of a multi-line response after its status line, terminator included."""
        if self._buf[:3] == b".\r\n":
            del self._buf[:3]
            return b".\r\n"
        start = 0
        while (end := self._buf.find(POP3_TERMINATOR, start)) < 0:
            start = max(0, len(self._buf) - len(POP3_TERMINATOR) + 1)
            self._fill()
            if self._buf[:3] == b".\r\n":
                del self._buf[:3]
                return b".\r\n"
        data = bytes(self._buf[: end + len(POP3_TERMINATOR)])
        del self._buf[: end + len(POP3_TERMINATOR)]
        return data

    def multiline(self) -> tuple[bytes, bytes]:
        """(status line, body incl. terminator); body is b"" after -ERR."""
        line = self.status()
        return line, (self.body() if line.startswith(b"+OK") else b"")

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.status()

    def command_multiline(self, line: bytes) -> tuple[bytes, bytes]:
        self.send(line + b"\r\n")
        return self.multiline()

    def login(self, user: str, password: str) -> None:
        for line in (b"USER " + user.encode(), b"PASS " + password.encode()):
            reply = self.command(line)
            if not reply.startswith(b"+OK"):
                raise AssertionError(f"{line.split()[0].decode()} refused: {reply!r}")

    def at_eof(self) -> bool:
        """True if the server closed the connection (nothing more to read)."""
        if self._buf:
            return False
        return self.sock.recv(1) == b""


def retr_payload(stored: bytes) -> bytes:
    """What RETR carries for a message IMAP stores as ``stored`` (after un-stuffing, before
    the terminator): the same bytes, plus the CRLF that completes a last line without one."""
    return stored if stored.endswith(b"\r\n") else stored + b"\r\n"


def poplib_payload(lines: list[bytes]) -> bytes:
    """The bytes poplib's RETR/TOP lines stand for (poplib has already un-stuffed dots and
    stripped each line's CRLF)."""
    return b"".join(line + b"\r\n" for line in lines)


class Pop3Client:
    """``with Pop3Client(port, user, password) as pop:`` a logged-in poplib.POP3 whose
    socket is closed at the end (without QUIT, so nothing is deleted unless the test
    called ``pop.quit()`` itself)."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None,
                 host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self._args = (host, port, timeout)
        self._login = (user, password)
        self.pop: poplib.POP3 | None = None

    def __enter__(self) -> poplib.POP3:
        host, port, timeout = self._args
        self.pop = poplib.POP3(host, port, timeout=timeout)
        user, password = self._login
        try:
            if user is not None:
                self.pop.user(user)
                self.pop.pass_(password or "")
        except BaseException:
            self.pop.close()
            raise
        return self.pop

    def __exit__(self, *exc: object) -> None:
        if self.pop is not None:
            self.pop.close()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after
    ``timeout`` seconds. A liveness guard for things that happen asynchronously (a log
    line written after the socket closed), not a speed requirement."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def wait_for_event(bridge: ThreadedBridge, event: str, **fields: Any) -> dict[str, Any]:
    """The first log event named ``event`` whose fields include ``fields``, waiting for it."""

    def find() -> dict[str, Any] | None:
        for item in bridge.events():
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                return item
        return None

    return wait_until(find, f"log event {event} {fields}")
