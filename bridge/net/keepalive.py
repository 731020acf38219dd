"""TCP keepalive: the kernel probes a connection that has been silent for a while.

Both sides of the bridge hold connections that stay silent for minutes: an IMAP connection
parked between two polls or a session's between two commands (`upstream.tcp_keepalive_seconds`),
and a POP3 client between two commands (`pop3.tcp_keepalive_seconds`). NAT gateways and
stateful firewalls forget a connection that is silent for a few minutes without telling
either end, and a peer can vanish without a FIN or RST (a host that crashed, a phone that
changed networks). Probes count as traffic for such boxes, so the mapping stays, and a peer
that is gone is noticed by the kernel within about twice the setting: the connection then
fails like any other broken one, instead of an IMAP command waiting out
`upstream.timeout_seconds` on it, or a vanished device holding its maildrop ([IN-USE]) and
its connection slot until `pop3.autologout_seconds`.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Protocol

# Unanswered probes before the kernel gives the connection up.
PROBES = 4


class TcpSocket(Protocol):
    """A socket of the standard library or of Trio."""

    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def set_tcp_keepalive(sock: TcpSocket, seconds: float) -> None:
    """Probe `sock` after `seconds` of silence, then every quarter of that; 0 leaves it off
    (as does a socket that is not TCP)."""
    if seconds <= 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, round(seconds))
    # A connection reset already may refuse: its next read or write says so.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # else (not Linux) the system's own timing
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // PROBES))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, PROBES)
