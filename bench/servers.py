"""The three POP3 servers under comparison, all on loopback, all reading the same maildirs.

- native: Dovecot 2.3's own POP3 on a maildir store (the store every other server reads);
- imapc: a second Dovecot whose POP3 service sits on `imapc` storage pointed at the first
  one's IMAP: the off-the-shelf way to put POP3 in front of an IMAP server;
- bridge: `python -m bridge serve --config ...` as a subprocess, upstream = the first
  Dovecot's IMAP.
"""

from __future__ import annotations

import contextlib
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

    def __init__(self, workdir: Path, imap_port: int, extra_toml: str = "") -> None:
        self.port = _free_port()
        self.config_path = workdir / "bridge.toml"
        self.log_path = workdir / "bridge.log"
        self.config_path.write_text(
            # Every benchmark client comes from 127.0.0.1: lift the per-address cap too.
            f'[pop3]\nlisten = ["127.0.0.1:{self.port}"]\nmax_connections = 5000\n'
            f"max_connections_per_address = 5000\n"
            # The store Dovecot runs without TLS: loopback only.
            f'[upstream]\nhost = "127.0.0.1"\nport = {imap_port}\ntls = "none"\n{extra_toml}\n'
            f'[logging]\nlevel = "info"\nformat = "json"\n'
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


class BenchServers:
    """Starts the store Dovecot, the imapc Dovecot and the bridge; stops all three on exit."""

    def __init__(self, bridge_toml: str = "", keep_workdir: bool = False) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
        # Dovecot's mail processes run as an unprivileged user and must get through.
        self.workdir.chmod(0o755)
        self._bridge_toml = bridge_toml
        self._keep = keep_workdir
        self._stack = contextlib.ExitStack()
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

    @property
    def targets(self) -> list[Target]:
        return [
            Target("native", self.store.host, self.store.pop3_port),
            Target("imapc", self.imapc.host, self.imapc.pop3_port),
            Target("bridge", "127.0.0.1", self.bridge.port),
        ]
