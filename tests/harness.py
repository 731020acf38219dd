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
from bridge.observability import configure_logging
from bridge.server import Pop3Service


def bridge_settings(imap_port: int, **sections: dict[str, Any]) -> BridgeSettings:
    overrides: dict[str, dict[str, Any]] = {
        "pop3": {"listen": ["127.0.0.1:0"]},
        "upstream": {"host": "127.0.0.1", "port": imap_port, "timeout_seconds": 10},
        "logging": {"level": "debug", "format": "json"},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
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
            addresses = await nursery.start(Pop3Service(self.settings).serve)
            self.port = int(addresses[0].rsplit(":", 1)[1])
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

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line.startswith("{")]

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

    def __init__(self, workdir: Path, imap_port: int, extra_toml: str = "") -> None:
        self.port = free_port()
        self.config_path = workdir / "bridge.toml"
        self.config_path.write_text(
            f'[pop3]\nlisten = ["127.0.0.1:{self.port}"]\n'
            f'[upstream]\nhost = "127.0.0.1"\nport = {imap_port}\ntimeout_seconds = 10\n'
            f'[logging]\nlevel = "info"\nformat = "json"\n{extra_toml}'
        )
        self.log_path = workdir / "bridge.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SubprocessBridge:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
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

    def __enter__(self) -> SubprocessBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
