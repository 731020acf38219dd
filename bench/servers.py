"""The three POP3 servers under comparison, all on loopback, all reading the same maildirs.

- native: Dovecot 2.3's own POP3 on a maildir store (the store every other server reads);
- imapc: a second Dovecot whose POP3 service sits on `imapc` storage pointed at the first
  one's IMAP: the off-the-shelf way to put POP3 in front of an IMAP server;
- bridge: `python -m bridge serve --config ...` as a subprocess, upstream = the first
  Dovecot's IMAP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from sandbox import DovecotSandbox

# Enough Dovecot processes and per-user connections for 1,000 idle bridge sessions (each holds
# an IMAP connection) plus the concurrency run.
_STORE_LIMITS = """
default_process_limit = 3000
default_client_limit = 12000
mail_max_userip_connections = 5000
# Dovecot's own default for imap is 1024 processes; parked bridge connections count too.
service imap {
  process_limit = 3000
}
"""


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _imapc_config(store: DovecotSandbox, homes: Path) -> str:
    # passdb imap: a login is checked by logging in to the store; the password (%w) is
    # handed to imapc through userdb fields prefetched from the passdb.
    return f"""
mail_location = imapc:~/imapc
imapc_host = {store.host}
imapc_port = {store.imap_port}
imapc_features = rfc822.size fetch-headers
passdb {{
  driver = imap
  args = host={store.host} port={store.imap_port}
  default_fields = userdb_imapc_user=%u userdb_imapc_password=%w userdb_home={homes}/%u userdb_uid={store.mail_uid} userdb_gid={store.mail_gid}
}}
userdb {{
  driver = prefetch
}}
"""


class BridgeProcess:
    """The bridge as a child process (the real command line), stopped by pid."""

    def __init__(
        self, workdir: Path, imap_port: int, extra_toml: str = "", *,
        sections: str = "", max_connections: int = 5000,
    ) -> None:
        """`extra_toml`: more lines for [upstream]; `sections`: whole further sections
        (e.g. "[pool]\\nmax_connections = 200"); `max_connections`: pop3.max_connections,
        and the per-address cap (every benchmark client comes from 127.0.0.1)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.imap_port = imap_port
        self.config_path = workdir / "bridge.toml"
        self.log_path = workdir / "bridge.log"
        self.config_path.write_text(
            f'[pop3]\nlisten = ["127.0.0.1:{self.port}"]\nmax_connections = {max_connections}\n'
            f"max_connections_per_address = {max_connections}\n"
            # The store Dovecot runs without TLS: loopback only.
            f'[upstream]\nhost = "127.0.0.1"\nport = {imap_port}\ntls = "none"\n{extra_toml}\n'
            f'[logging]\nlevel = "info"\nformat = "json"\n{sections}\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited at start-up:\n{self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(100).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("bridge did not accept connections within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_workers(self, count: int, timeout: float = 30.0) -> int:
        """With server.workers > 1: wait until `count` worker processes listen on the POP3
        port (the supervisor itself serves none); returns how many do."""
        deadline = time.monotonic() + timeout
        listening = 0
        while time.monotonic() < deadline:
            listening = 0
            for child in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any(
                        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                        for c in child.net_connections(kind="tcp")
                    ):
                        listening += 1
            if listening >= count:
                return listening
            time.sleep(0.1)
        raise RuntimeError(f"only {listening} of {count} bridge workers listen after {timeout:.0f} s")

    def log_summary(self) -> dict[str, object]:
        """Log events at warning level or worse, counted by (level, event): what went wrong
        in the bridge during a row."""
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    if line.strip():
                        counts["(not JSON) " + line[:80]] = counts.get("(not JSON) " + line[:80], 0) + 1
                    continue
                level = str(event.get("level", ""))
                if level in ("warning", "error", "critical"):
                    key = f"{level}: {event.get('event')}"
                    counts[key] = counts.get(key, 0) + 1
        return {"log": str(self.log_path), "problems": counts}


class BenchServers:
    """Starts the store Dovecot, the imapc Dovecot and the bridge; stops all three on exit."""

    def __init__(self, bridge_toml: str = "", keep_workdir: bool = False) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
        # Dovecot's mail processes run as an unprivileged user and must get through.
        self.workdir.chmod(0o755)
        self._bridge_toml = bridge_toml
        self._keep = keep_workdir
        self._stack = contextlib.ExitStack()
        # What one row made and another may reuse (e.g. the concurrency row's accounts).
        self.shared: dict[str, Any] = {}
        self.store: DovecotSandbox
        self.imapc: DovecotSandbox
        self.bridge: BridgeProcess

    def __enter__(self) -> BenchServers:
        try:
            self.store = DovecotSandbox(self.workdir / "store", extra_config=_STORE_LIMITS)
            self._stack.enter_context(self.store)
            homes = self.workdir / "imapc-homes"
            homes.mkdir(mode=0o755)
            if os.geteuid() == 0:
                os.chown(homes, self.store.mail_uid, self.store.mail_gid)
            self.imapc = DovecotSandbox(self.workdir / "imapc", extra_config=_imapc_config(self.store, homes))
            self._stack.enter_context(self.imapc)
            self.bridge = BridgeProcess(self.workdir, self.store.imap_port, self._bridge_toml)
            self._stack.callback(self.bridge.stop)
            self.bridge.start()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        self._stack.close()
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start_bridge(
        self, name: str, sections: str = "", *, max_connections: int = 5000,
        store: DovecotSandbox | None = None,
    ) -> BridgeProcess:
        """Another bridge (its own config, log and port under workdir/name) in front of
        `store` (default: the store), stopped with the rest or by `stop_bridge`."""
        bridge = BridgeProcess(
            self.workdir / name, (store or self.store).imap_port, self._bridge_toml,
            sections=sections, max_connections=max_connections,
        )
        self._stack.callback(bridge.stop)
        bridge.start()
        return bridge

    def start_store(self, name: str, extra_config: str) -> DovecotSandbox:
        """Another store Dovecot (maildir, native POP3 and IMAP) under workdir/name."""
        store = DovecotSandbox(self.workdir / name, extra_config=extra_config)
        self._stack.enter_context(store)
        return store

    def target_set(self, bridge: BridgeProcess) -> list[Target]:
        """native, imapc and `bridge` (instead of the first one)."""
        return [*self.targets[:2], Target("bridge", "127.0.0.1", bridge.port)]

    @property
    def targets(self) -> list[Target]:
        return [
            Target("native", self.store.host, self.store.pop3_port),
            Target("imapc", self.imapc.host, self.imapc.pop3_port),
            Target("bridge", "127.0.0.1", self.bridge.port),
        ]
