"""TCP keepalive on the bridge's IMAP connections (upstream.tcp_keepalive_seconds), as the
kernel shows it: a connection silent between a session's commands, or parked in IDLE, has
a keepalive probe due within the setting (so a NAT gateway does not forget it, and a server
gone without a FIN is noticed); with 0 it has none (the kernel's default: no probes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, wait_for_event

pytestmark = pytest.mark.usefixtures("on_every_engine")

# /proc/net/tcp gives timers in clock ticks of USER_HZ, 100 on Linux.
_TICKS_PER_SECOND = 100
_KEEPALIVE_TIMER = 2


def bridge_connections(dovecot: DovecotSandbox) -> list[tuple[int, int]]:
    """(local port, server port) of every established IMAP connection of this process (the
    in-process bridge's: the test holds none of its own while it looks)."""
    return [
        (conn.laddr.port, conn.raddr.port)
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == dovecot.imap_port and conn.status == psutil.CONN_ESTABLISHED
    ]


def keepalive_due_in(local_port: int, remote_port: int) -> float | None:
    """Seconds until the kernel probes this connection; None: no keepalive timer runs."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (local_port, remote_port):
            timer, due = (int(part, 16) for part in fields[5].split(":"))
            return due / _TICKS_PER_SECOND if timer == _KEEPALIVE_TIMER else None
    raise AssertionError(f"no connection {local_port} -> {remote_port} in /proc/net/tcp")


def probes_due(dovecot: DovecotSandbox) -> list[float | None]:
    connections = bridge_connections(dovecot)
    assert len(connections) == 1, connections
    return [keepalive_due_in(*connection) for connection in connections]


def test_idle_upstream_connections_are_probed_within_the_setting(
    dovecot: DovecotSandbox, mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    mailbox.append(numbered_messages(1))
    bridge = bridge_factory(upstream={"tcp_keepalive_seconds": 20})
    with RawPop3("127.0.0.1", bridge.port) as raw:
        raw.login(mailbox.user, mailbox.password)
        assert raw.command(b"STAT").startswith(b"+OK 1 ")
        # Between two commands: the session's connection is silent.
        [due] = probes_due(dovecot)
        assert due is not None and 0 < due <= 20
        assert raw.command(b"QUIT").startswith(b"+OK")
    # Parked, in IDLE: silent until the server has news.
    wait_for_event(bridge, "pool_parked")
    [due] = probes_due(dovecot)
    assert due is not None and 0 < due <= 20


def test_keepalive_off_leaves_the_kernel_default(
    dovecot: DovecotSandbox, mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    mailbox.append(numbered_messages(1))
    bridge = bridge_factory(upstream={"tcp_keepalive_seconds": 0})
    with RawPop3("127.0.0.1", bridge.port) as raw:
        raw.login(mailbox.user, mailbox.password)
        assert raw.command(b"STAT").startswith(b"+OK 1 ")
        assert probes_due(dovecot) == [None]
        assert raw.command(b"QUIT").startswith(b"+OK")
