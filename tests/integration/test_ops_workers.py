"""`[server] workers = N`: several processes accept from the same POP3 sockets; the
supervisor restarts a worker that dies, adds up their metrics, forwards SIGHUP/SIGTERM and
exits 0.

Which worker served a connection is observable in the logs: every worker's events carry
`worker` (its index) and `pid`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import RawPop3, SubprocessBridge, free_port
from tests.integration.ops_support import (
    events_named,
    http_get,
    scrape,
    value,
    wait_for,
    wait_for_event,
    wait_for_exit,
)

WORKERS = 2


def _greet_and_quit(port: int) -> None:
    # A connection no worker accepts would wait here: 10 s is ample for an idle worker.
    with RawPop3("127.0.0.1", port, timeout=10) as client:
        assert client.greeting.startswith(b"+OK")
        assert client.command(b"QUIT").startswith(b"+OK")


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """The process frozen (SIGSTOP) for the block: a worker stuck or busy, as the other
    workers see it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _served_by(bridge: SubprocessBridge, connections: int) -> set[int]:
    """The workers (pids) that served `connections` new connections, each greeted and quit."""
    before = len(events_named(bridge, "session_start"))
    for _ in range(connections):
        _greet_and_quit(bridge.port)
    started = wait_for(
        lambda: (found := events_named(bridge, "session_start")[before:]) and len(found) == connections and found,
        f"{connections} sessions logged",
    )
    return {event["pid"] for event in started}


def test_workers_share_the_port_and_a_killed_worker_is_restarted(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(2))
    admin_port = free_port()
    bridge = SubprocessBridge(
        tmp_path, mailbox.imap_port, f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nreadiness_cache_seconds = 0\n',
        env={"BRIDGE_UPSTREAM__TLS": "none", "BRIDGE_SERVER__WORKERS": str(WORKERS)},
    )
    with bridge:
        assert bridge.process is not None
        supervisor = bridge.process.pid
        wait_for(
            lambda: {e["worker"] for e in events_named(bridge, "listening")} == set(range(WORKERS)),
            "every worker listening",
        )
        started = {e["worker"]: e["worker_pid"] for e in events_named(bridge, "worker_started")}
        assert sorted(started) == list(range(WORKERS))
        assert {child.pid for child in psutil.Process(supervisor).children()} == set(started.values())
        assert http_get(admin_port, "/readyz")[:2] == (200, "ready\n")

        # One accept queue for all workers: while one is stopped (stuck, or busy with other
        # sessions) the other takes every new connection at once, and either can serve.
        # (With a socket per worker, SO_REUSEPORT, the kernel hashed about half of them to
        # the stopped one, where they waited.)
        for busy, free in ((started[0], started[1]), (started[1], started[0])):
            with _stopped(busy):
                assert _served_by(bridge, 6) == {free}

        # A real session through a worker, and the supervisor's /metrics adds up all workers.
        with RawPop3("127.0.0.1", bridge.port) as client:
            client.login(mailbox.user, mailbox.password)
            assert client.command_multiline(b"RETR 1")[0].startswith(b"+OK")
            assert client.command(b"QUIT").startswith(b"+OK")
        ended = wait_for(
            lambda: (s := scrape(admin_port)) and value(s, "bridge_sessions_active") == 0 and s, "sessions ended"
        )
        assert sum(
            count for (name, _labels), count in ended.items() if name == "bridge_sessions_total"
        ) == len(events_named(bridge, "session_end"))
        assert value(ended, "bridge_logins_total", result="ok") == 1
        assert value(ended, "bridge_commands_total", command="RETR", result="ok") == 1

        # SIGHUP reaches every worker.
        bridge.process.send_signal(signal.SIGHUP)
        for index in range(WORKERS):
            wait_for_event(bridge, "config_reloaded", worker=index)

        # Kill worker 0 the hard way; the supervisor starts a new one in its place.
        victim = started[0]
        os.kill(victim, signal.SIGKILL)
        exited = wait_for_event(bridge, "worker_exited", worker_pid=victim)
        assert exited["returncode"] == -signal.SIGKILL
        replacement = wait_for(
            lambda: [e["worker_pid"] for e in events_named(bridge, "worker_started", worker=0) if e["worker_pid"] != victim],
            "worker 0 started again",
        )[0]
        wait_for(lambda: events_named(bridge, "listening", pid=replacement), "the new worker listening")

        # The new worker accepts from the same sockets.
        with _stopped(started[1]):
            assert _served_by(bridge, 2) == {replacement}
        assert value(scrape(admin_port), "bridge_worker_restarts_total") == 1

        # SIGTERM: the supervisor stops every worker and exits 0. While a session drains,
        # new connections are refused, not queued on a socket the supervisor still holds.
        workers_now = {child.pid for child in psutil.Process(supervisor).children()}
        assert workers_now == {replacement, started[1]}
        with RawPop3("127.0.0.1", bridge.port, timeout=10) as draining:
            draining.login(mailbox.user, mailbox.password)
            bridge.process.send_signal(signal.SIGTERM)
            wait_for(lambda: len(events_named(bridge, "shutdown_draining")) == WORKERS, "every worker draining")
            try:
                socket.create_connection(("127.0.0.1", bridge.port), timeout=5).close()
            except ConnectionRefusedError:
                pass
            else:
                raise AssertionError("a new connection was accepted while the workers drained")
            assert draining.command(b"QUIT").startswith(b"+OK")
        assert wait_for_exit(bridge) == 0
    assert not [pid for pid in workers_now if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert {e["worker"] for e in events_named(bridge, "worker_stopped")} == set(range(WORKERS))
    assert {e["worker"] for e in events_named(bridge, "shutdown") if "worker" in e} == set(range(WORKERS))


def test_workers_keep_running_and_stop_when_the_supervisor_dies(mailbox: Mailbox, tmp_path: Path) -> None:
    """The workers of a quiet service are not restarted (they were, every ten seconds, while
    their parent-death signal was tied to a thread Trio lets go after ten idle seconds), and
    a supervisor killed outright takes its workers with it: each shuts down gracefully when
    its lifeline pipe ends."""
    import time

    bridge = SubprocessBridge(
        tmp_path, mailbox.imap_port, env={"BRIDGE_UPSTREAM__TLS": "none", "BRIDGE_SERVER__WORKERS": str(WORKERS)}
    )
    with bridge:
        assert bridge.process is not None
        supervisor = bridge.process.pid
        wait_for(
            lambda: {e["worker"] for e in events_named(bridge, "listening")} == set(range(WORKERS)),
            "every worker listening",
        )
        workers = {child.pid for child in psutil.Process(supervisor).children()}
        # Trio's idle worker threads end after 10 s; the workers must not care.
        time.sleep(13)
        assert {child.pid for child in psutil.Process(supervisor).children()} == workers
        assert not events_named(bridge, "worker_exited")
        _greet_and_quit(bridge.port)
        os.kill(supervisor, signal.SIGKILL)
        bridge.process.wait(10)
        wait_for(
            lambda: not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"],
            "the workers gone after their supervisor",
        )
    assert {e["pid"] for e in events_named(bridge, "supervisor_gone")} == workers


def test_workers_share_a_port_0_listener(mailbox: Mailbox, tmp_path: Path) -> None:
    """The supervisor binds each address once, so `port = 0` means one port the kernel
    chose, served by every worker (each worker's `listening` event names it)."""
    env = {**os.environ, "BRIDGE_POP3__LISTEN": '["127.0.0.1:0"]', "BRIDGE_SERVER__WORKERS": str(WORKERS),
           "BRIDGE_UPSTREAM__HOST": "127.0.0.1", "BRIDGE_UPSTREAM__PORT": str(mailbox.imap_port),
           "BRIDGE_UPSTREAM__TLS": "none", "BRIDGE_LOGGING__FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "bridge.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bridge", "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def listening() -> list[list[str]]:
            lines = log_path.read_text(errors="replace").split("\n")[:-1]
            events = [json.loads(line) for line in lines if line.startswith("{")]
            return [event["addresses"] for event in events if event.get("event") == "listening"]

        addresses = wait_for(lambda: len(found := listening()) == WORKERS and found, "every worker listening")
        assert addresses[0] == addresses[1] and len(addresses[0]) == 1
        host, port = addresses[0][0].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) != 0
        _greet_and_quit(int(port))
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_address_in_use_stops_the_service_with_its_name(workers: str) -> None:
    """With workers the supervisor binds before any worker starts; one process binds as its
    service starts. Either way: one line naming the address, and status 1."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "BRIDGE_POP3__LISTEN": f'["127.0.0.1:{port}"]', "BRIDGE_SERVER__WORKERS": workers}
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "serve"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert done.stderr.strip() == f"pop3-imap-bridge: cannot listen on 127.0.0.1:{port}: Address already in use"
