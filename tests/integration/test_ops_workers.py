"""`[server] workers = N`: several processes share the POP3 port; the supervisor restarts a
worker that dies, adds up their metrics, forwards SIGHUP/SIGTERM and exits 0.

Which worker served a connection is observable in the logs: every worker's events carry
`worker` (its index) and `pid`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from bridge.config import load_settings
from bridge.ops.workers import run_supervisor
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


def _serving_pids(bridge: SubprocessBridge) -> set[int]:
    return {event["pid"] for event in events_named(bridge, "session_start")}


def _greet_and_quit(port: int) -> None:
    with RawPop3("127.0.0.1", port) as client:
        assert client.greeting.startswith(b"+OK")
        assert client.command(b"QUIT").startswith(b"+OK")


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

        # The kernel spreads connections over the workers (SO_REUSEPORT hashes each new
        # connection's addresses): 40 connections all landing on one of two workers would
        # happen with probability 2**-39.
        for _ in range(40):
            _greet_and_quit(bridge.port)
        wait_for(lambda: _serving_pids(bridge) == set(started.values()), "sessions served by every worker")

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

        def served_by_replacement() -> bool:
            _greet_and_quit(bridge.port)
            return replacement in _serving_pids(bridge)

        wait_for(served_by_replacement, "a connection served by the new worker")
        assert value(scrape(admin_port), "bridge_worker_restarts_total") == 1

        # SIGTERM: the supervisor stops every worker and exits 0.
        workers_now = {child.pid for child in psutil.Process(supervisor).children()}
        assert workers_now == {replacement, started[1]}
        bridge.process.send_signal(signal.SIGTERM)
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


def test_port_0_cannot_be_shared_by_workers(capsys: object) -> None:
    settings = load_settings(None, {"pop3": {"listen": ["127.0.0.1:0"]}, "server": {"workers": 2}})
    assert run_supervisor(settings, None) == 2
