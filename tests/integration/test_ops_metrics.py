"""/metrics of the real service after a scripted conversation: exact counter values.

Each test reads the counters, runs POP3 sessions it fully controls, waits until no session is
open, reads them again and checks the differences (the harness's own start-up probe is a
session too, so absolute values would count it)."""

from __future__ import annotations

from pathlib import Path

from sandbox import Mailbox, numbered_messages
from tests.harness import RawPop3, SubprocessBridge, free_port
from tests.integration.ops_support import events_named, quiet_metrics, value


def test_counters_after_a_scripted_session(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(3))
    admin_port = free_port()
    bridge = SubprocessBridge(
        tmp_path, mailbox.imap_port, f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n',
        env={"BRIDGE_UPSTREAM__TLS": "none"},
    )
    with bridge:
        before = quiet_metrics(admin_port)
        received = 0
        with RawPop3("127.0.0.1", bridge.port) as client:
            received += len(client.greeting)
            received += len(client.command(b"USER " + mailbox.user.encode()))
            reply = client.command(b"PASS wrong-" + mailbox.password.encode())
            assert reply.startswith(b"-ERR [AUTH]")
            received += len(reply)
            received += len(client.command(b"QUIT"))
            assert client.at_eof()
        with RawPop3("127.0.0.1", bridge.port) as client:
            received += len(client.greeting)
            for line in (b"USER " + mailbox.user.encode(), b"PASS " + mailbox.password.encode()):
                reply = client.command(line)
                assert reply.startswith(b"+OK")
                received += len(reply)
            for line in (b"RETR 1", b"TOP 2 0", b"LIST"):
                status, body = client.command_multiline(line)
                assert status.startswith(b"+OK")
                received += len(status) + len(body)
            reply = client.command(b"RETR 7")  # no such message: the core answers, no upstream work
            assert reply.startswith(b"-ERR")
            received += len(reply)
            for line in (b"DELE 1", b"QUIT"):
                reply = client.command(line)
                assert reply.startswith(b"+OK")
                received += len(reply)
            assert client.at_eof()
        after = quiet_metrics(admin_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("bridge_sessions_total", outcome="quit") == 2
    assert delta("bridge_logins_total", result="ok") == 1
    assert delta("bridge_logins_total", result="failed") == 1
    assert delta("bridge_login_failures_total", reason="credentials") == 1
    assert delta("bridge_login_failures_total", reason="upstream") == 0
    assert delta("bridge_commands_total", command="RETR", result="ok") == 1
    assert delta("bridge_commands_total", command="RETR", result="err") == 1  # RETR 7
    assert delta("bridge_commands_total", command="TOP", result="ok") == 1
    # One QUIT before login (answered by the core), one applying the DELE.
    assert delta("bridge_commands_total", command="QUIT", result="ok") == 2
    assert delta("bridge_commands_total", command="USER", result="ok") == 2
    assert delta("bridge_commands_total", command="LIST", result="ok") == 1
    assert delta("bridge_commands_total", command="DELE", result="ok") == 1
    assert delta("bridge_retrieve_seconds_count", command="RETR") == 1
    assert delta("bridge_retrieve_seconds_count", command="TOP") == 1
    assert delta("bridge_retrieve_seconds_bucket", command="RETR", le="+Inf") == 1
    assert delta("bridge_bytes_sent_total") == received
    assert delta("bridge_deletions_applied_total", policy="expunge") == 1
    # The failed login's connection is never reused for someone else; the second session
    # therefore needed a connection of its own.
    assert delta("bridge_upstream_connects_total") == 2
    assert delta("bridge_upstream_connection_reuses_total") == 0
    assert value(after, "bridge_sessions_active") == 0
    assert len(mailbox.observer().uids()) == 2


def test_a_down_upstream_counts_as_connect_failure(mailbox: Mailbox, tmp_path: Path) -> None:
    admin_port = free_port()
    dead_port = free_port()  # nothing listens here
    bridge = SubprocessBridge(
        tmp_path, dead_port, f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n',
        env={"BRIDGE_UPSTREAM__TLS": "none", "BRIDGE_UPSTREAM__TIMEOUT_SECONDS": "2"},
    )
    with bridge:
        before = quiet_metrics(admin_port)
        with RawPop3("127.0.0.1", bridge.port) as client:
            assert client.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
            assert client.command(b"PASS " + mailbox.password.encode()).startswith(b"-ERR [SYS/TEMP]")
        after = quiet_metrics(admin_port)
    failures = value(after, "bridge_upstream_connect_failures_total", reason="refused") - value(
        before, "bridge_upstream_connect_failures_total", reason="refused"
    )
    # Each attempt (the first and every retry within upstream.timeout_seconds) was refused.
    assert failures == 1 + len(events_named(bridge, "upstream_retry"))
    assert value(after, "bridge_login_failures_total", reason="upstream") == 1
    assert value(after, "bridge_upstream_connects_total") == 0
