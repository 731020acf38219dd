"""A private Redis (Debian's redis-server) on a free loopback port, for the shared OAuth2
token store: its own configuration and directory, no persistence, stopped by its pid.
A system Redis, if one runs, is never touched."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sandbox.netcheck import LOOPBACK, pick_free_ports


class RedisNotInstalledError(RuntimeError):
    pass


class RedisSandbox:
    def __init__(self, workdir: Path, startup_timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin"]))
        if binary is None:
            raise RedisNotInstalledError(
                "redis-server not found: install the Debian package redis-server (scripts/install-deps test does it)"
            )
        self._binary = binary
        self.workdir = workdir
        self.port = pick_free_ports(1)[0]
        self._timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        config = self.workdir / "redis.conf"
        config.write_text(
            f"bind {LOOPBACK}\nport {self.port}\nprotected-mode yes\ndaemonize no\n"
            f'dir {self.workdir}\nsave ""\nappendonly no\nlogfile {self.workdir / "redis.log"}\n'
        )
        self._process = subprocess.Popen([self._binary, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "redis.log").read_text(errors="replace") if (self.workdir / "redis.log").exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
