"""`pop3-imap-bridge demo`, as README's first command runs it: a real process with its own
private Dovecot, used with a real POP3 client, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.integration.test_e2e_cli import REPO, clean_env


class DemoProcess:
    """The demo's output is read by a thread, so waiting for a line never blocks for ever."""

    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.demo", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env={**clean_env(), "PYTHONUNBUFFERED": "1"}, cwd=REPO,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "demo is ready" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> str:
        # A bound for a hung start, not a speed target: the demo starts Dovecot and seeds it.
        assert self._ready.wait(120), "the demo did not become ready"
        output = "".join(self.lines)
        assert "demo is ready" in output, output
        return output

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(10)


@pytest.fixture
def demo() -> Iterator[DemoProcess]:
    process = DemoProcess(free_port())
    yield process
    process.stop()


def test_demo_serves_its_mail_and_stops_with_its_dovecot(demo: DemoProcess) -> None:
    output = demo.wait_ready()
    port = int(re.search(r"POP3 on 127\.0\.0\.1:(\d+)", output).group(1))  # type: ignore[union-attr]
    workdir = Path(re.search(r"its files in (\S+)\)", output).group(1))  # type: ignore[union-attr]
    # What the banner tells the user to type works: curl (if this machine has it) and poplib.
    assert f"curl -u demo:demo pop3://127.0.0.1:{port}/1" in output
    assert "telnet" not in output
    pop = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        pop.user("demo")
        pop.pass_("demo")
        count, _size = pop.stat()
        assert count == 5
        message = b"\r\n".join(pop.retr(1)[1])
        assert b"Subject: Welcome to your POP3 bridge" in message
        pop.quit()
    finally:
        pop.close()
    dovecot_pids = _pids_mentioning(str(workdir))
    assert dovecot_pids, "the demo's Dovecot is not running"

    assert demo.stop() == 0, "".join(demo.lines)
    assert not workdir.exists(), "the demo left its temporary directory behind"
    assert not any(_alive(pid) for pid in dovecot_pids), "the demo left its Dovecot running"


def test_demo_names_cause_and_fix_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sandbox.demo", "--port", str(port)],
            capture_output=True, text=True, timeout=120, env=clean_env(), stdin=subprocess.DEVNULL, cwd=REPO,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0] == f"pop3-imap-bridge demo: cannot start: 127.0.0.1:{port} is already in use by another program (an earlier demo still running?)"
    assert lines[1] == f"  fix: stop that program, or choose another port: ./scripts/demo --port {port + 1}"


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in (Path(f"/proc/{pid}/stat").read_text().split()[2:3] or [""])
