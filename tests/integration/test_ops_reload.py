"""SIGHUP: the real service re-reads bridge.toml and the environment.

TLS certificate reload is not tested here: TLS listeners come from another change, which
plugs into `Pop3Service.reload_hooks` and adds its own SIGHUP test (certificate swapped on
disk, new handshakes see the new certificate).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.harness import RawPop3, SubprocessBridge, free_port
from tests.integration.ops_support import events_named, wait_for_event


def _retr_and_quit(bridge: SubprocessBridge, mailbox: Mailbox) -> bytes:
    with RawPop3("127.0.0.1", bridge.port) as client:
        client.login(mailbox.user, mailbox.password)
        assert client.command_multiline(b"RETR 1")[0].startswith(b"+OK")
        capa = client.command_multiline(b"CAPA")[1]
        assert client.command(b"QUIT").startswith(b"+OK")
        return capa


def test_sighup_applies_live_settings_and_names_those_needing_a_restart(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(1))
    bridge = SubprocessBridge(tmp_path, mailbox.imap_port, env={"BRIDGE_UPSTREAM__TLS": "none"})
    with bridge:
        assert bridge.process is not None
        capa = _retr_and_quit(bridge, mailbox)
        assert b"IMPLEMENTATION pop3-imap-bridge\r\n" in capa
        assert not events_named(bridge, "command")  # info level: no per-command events

        text = bridge.config_path.read_text()
        text = text.replace('level = "info"', 'level = "debug"')
        text = text.replace(f'"127.0.0.1:{bridge.port}"', f'"127.0.0.1:{free_port()}"')
        text += '[server]\nworkers = 3\n'
        bridge.config_path.write_text(text)
        bridge.process.send_signal(signal.SIGHUP)

        reloaded = wait_for_event(bridge, "config_reloaded")
        assert reloaded["changed"] == ["logging.level"]
        restart = wait_for_event(bridge, "config_reload_needs_restart")
        assert restart["keys"] == ["pop3.listen", "server.workers"]

        # Debug logging is on now; the old listener is still the one serving.
        _retr_and_quit(bridge, mailbox)
        wait_for_event(bridge, "command", command="RETR")

        # A live key for new sessions: the CAPA IMPLEMENTATION name (pop3.implementation).
        text = bridge.config_path.read_text().replace("[pop3]\n", '[pop3]\nimplementation = "renamed-bridge"\n')
        bridge.config_path.write_text(text)
        bridge.process.send_signal(signal.SIGHUP)
        wait_for_event(bridge, "config_reloaded", changed=["pop3.implementation"])
        assert b"IMPLEMENTATION renamed-bridge\r\n" in _retr_and_quit(bridge, mailbox)
        assert bridge.process.poll() is None


@pytest.mark.bridge_errors("config_reload_failed")
def test_a_broken_file_on_sighup_keeps_the_running_configuration(mailbox: Mailbox, tmp_path: Path) -> None:
    mailbox.append(numbered_messages(1))
    bridge = SubprocessBridge(tmp_path, mailbox.imap_port, env={"BRIDGE_UPSTREAM__TLS": "none"})
    with bridge:
        assert bridge.process is not None
        bridge.config_path.write_text(bridge.config_path.read_text() + "[admin]\nreadiness_cache_seconds = -1\n")
        bridge.process.send_signal(signal.SIGHUP)
        failed = wait_for_event(bridge, "config_reload_failed")
        assert failed["error"].startswith("admin.readiness_cache_seconds: ")
        assert not events_named(bridge, "config_reloaded")
        _retr_and_quit(bridge, mailbox)  # still serving with the old settings


def _stat(bridge: SubprocessBridge, user: str, password: str) -> bytes:
    with RawPop3("127.0.0.1", bridge.port) as client:
        client.login(user, password)
        stat = client.command(b"STAT")
        assert client.command(b"QUIT").startswith(b"+OK")
        return stat


def test_sighup_changing_upstream_retires_parked_connections(
    mailbox: Mailbox, own_dovecot: DovecotSandbox, tmp_path: Path
) -> None:
    """A parked connection to the old upstream must not serve a session after a reload that
    points the bridge elsewhere (another host, TLS mode, CA, mailbox, ...): here the same
    user on a second Dovecot, holding other mail."""
    mailbox.append(numbered_messages(1))
    moved = own_dovecot.new_mailbox(mailbox.user, mailbox.password)
    moved.append(numbered_messages(3))
    bridge = SubprocessBridge(tmp_path, mailbox.imap_port, env={"BRIDGE_UPSTREAM__TLS": "none"})
    with bridge:
        assert bridge.process is not None
        assert _stat(bridge, mailbox.user, mailbox.password).startswith(b"+OK 1 ")
        wait_for_event(bridge, "session_end")  # its connection is parked

        # A reload that changes nothing upstream keeps it.
        text = bridge.config_path.read_text().replace("[pop3]\n", '[pop3]\nimplementation = "renamed-bridge"\n')
        bridge.config_path.write_text(text)
        bridge.process.send_signal(signal.SIGHUP)
        wait_for_event(bridge, "config_reloaded", changed=["pop3.implementation"])
        assert not events_named(bridge, "pool_evicted")

        text = text.replace(f"port = {mailbox.imap_port}\n", f"port = {own_dovecot.imap_port}\n")
        bridge.config_path.write_text(text)
        bridge.process.send_signal(signal.SIGHUP)
        wait_for_event(bridge, "config_reloaded", changed=["upstream.port"])
        # The next session is served by the new upstream.
        assert _stat(bridge, mailbox.user, mailbox.password).startswith(b"+OK 3 ")
        assert wait_for_event(bridge, "pool_evicted")["connections"] == 1
        assert bridge.process.poll() is None


def test_a_session_open_across_a_policy_change_keeps_the_policy_it_started_with(
    mailbox: Mailbox, tmp_path: Path
) -> None:
    """docs/operators.md ("Signals"): a reload applies to sessions that start after it; one in
    progress finishes with the settings it started with."""
    uids = mailbox.append(numbered_messages(2)).uids
    bridge = SubprocessBridge(tmp_path, mailbox.imap_port, extra_toml='[delete]\npolicy = "keep"\n')
    with bridge:
        assert bridge.process is not None
        with RawPop3("127.0.0.1", bridge.port) as before:
            before.login(mailbox.user, mailbox.password)
            assert before.command(b"DELE 1").startswith(b"+OK")
            bridge.config_path.write_text(bridge.config_path.read_text().replace('policy = "keep"', 'policy = "expunge"'))
            bridge.process.send_signal(signal.SIGHUP)
            wait_for_event(bridge, "config_reloaded", changed=["delete.policy"])
            # Quit after the reload: still "keep", so message 1 stays, marked \Seen.
            assert before.command(b"QUIT").startswith(b"+OK")
        observer = mailbox.observer()
        assert observer.uids() == uids
        assert "\\Seen" in observer.flags(uids[0])
        # A session that starts after the reload expunges.
        with RawPop3("127.0.0.1", bridge.port) as after:
            after.login(mailbox.user, mailbox.password)
            assert after.command(b"DELE 2").startswith(b"+OK")
            assert after.command(b"QUIT").startswith(b"+OK")
        assert mailbox.observer().uids() == [uids[0]]
