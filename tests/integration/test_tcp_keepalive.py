"""TCP keepalive (bridge.net.keepalive) as the kernel shows it in /proc/net/tcp. On the IMAP
side (upstream.tcp_keepalive_seconds): a connection silent between a session's commands, or
parked in IDLE, has a probe due within the setting, so a NAT gateway does not forget it and
a server gone without a FIN is noticed. On the POP3 side (pop3.tcp_keepalive_seconds): a
client's connection between two commands has one too, so a device that vanished stops
holding its maildrop. With 0, none (the kernel's default: no probes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, wait_for_event, wait_until

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


def _row(local_port: int, remote_port: int) -> list[str]:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (local_port, remote_port):
            return fields
    raise AssertionError(f"no connection {local_port} -> {remote_port} in /proc/net/tcp")


def keepalive_due_in(local_port: int, remote_port: int) -> float | None:
    """Seconds until the kernel probes this connection once the peer has acknowledged all it
    was sent (until then the retransmission timer runs instead; a client's ACK may be
    delayed); None: no keepalive timer runs."""

    def settled() -> list[str] | None:
        fields = _row(local_port, remote_port)
        unacknowledged = int(fields[4].split(":")[0], 16)
        return fields if unacknowledged == 0 else None

    fields = wait_until(settled, f"the peer of {local_port} -> {remote_port} to acknowledge all it was sent")
    timer, due = (int(part, 16) for part in fields[5].split(":"))
    return due / _TICKS_PER_SECOND if timer == _KEEPALIVE_TIMER else None


def client_probe_due(bridge: ThreadedBridge, client: RawPop3) -> float | None:
    """The probe due on the bridge's end of `client`'s connection."""
    return keepalive_due_in(bridge.port, client.sock.getsockname()[1])


def probes_due(dovecot: DovecotSandbox) -> list[float | None]:
    connections = bridge_connections(dovecot)
    assert len(connections) == 1, connections
    return [keepalive_due_in(*connection) for connection in connections]


def test_silent_connections_on_both_sides_are_probed_within_their_setting(
    dovecot: DovecotSandbox, mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    mailbox.append(numbered_messages(1))
    bridge = bridge_factory(upstream={"tcp_keepalive_seconds": 20}, pop3={"tcp_keepalive_seconds": 30})
    with RawPop3("127.0.0.1", bridge.port) as raw:
        raw.login(mailbox.user, mailbox.password)
        assert raw.command(b"STAT").startswith(b"+OK 1 ")
        # Between two commands: the session's connection is silent, and so is its client's.
        [due] = probes_due(dovecot)
        assert due is not None and 0 < due <= 20
        due = client_probe_due(bridge, raw)
        assert due is not None and 20 < due <= 30
        assert raw.command(b"QUIT").startswith(b"+OK")
    # Parked, in IDLE: silent until the server has news.
    wait_for_event(bridge, "pool_parked")
    [due] = probes_due(dovecot)
    assert due is not None and 0 < due <= 20


def test_keepalive_off_leaves_the_kernel_default(
    dovecot: DovecotSandbox, mailbox: Mailbox, bridge_factory: Callable[..., ThreadedBridge]
) -> None:
    mailbox.append(numbered_messages(1))
    bridge = bridge_factory(upstream={"tcp_keepalive_seconds": 0}, pop3={"tcp_keepalive_seconds": 0})
    with RawPop3("127.0.0.1", bridge.port) as raw:
        raw.login(mailbox.user, mailbox.password)
        assert raw.command(b"STAT").startswith(b"+OK 1 ")
        assert probes_due(dovecot) == [None]
        assert client_probe_due(bridge, raw) is None
        assert raw.command(b"QUIT").startswith(b"+OK")
