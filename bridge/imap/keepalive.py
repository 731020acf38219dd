"""TCP keepalive on upstream connections (`upstream.tcp_keepalive_seconds`).

A connection parked between two polls, or a session's between two commands, can stay
silent for minutes. NAT gateways and firewalls drop a mapping that is silent for a few
minutes (350 s on some cloud NAT gateways, 4 minutes on some load balancers) without telling
either end: the next command would then wait `upstream.timeout_seconds` for an answer that
cannot come. Keepalive probes count as traffic for such boxes, so the mapping stays; and a
peer that is gone without a FIN or RST (a host that crashed, a path that broke) is noticed
by the kernel within about twice the setting, and the connection is dropped like any other
broken one instead of being handed to the next session.
"""

from __future__ import annotations

import socket

# Unanswered probes before the kernel gives the connection up.
PROBES = 4


def set_tcp_keepalive(sock: socket.socket, seconds: float) -> None:
    """Probe `sock` after `seconds` of silence, then every quarter of that; 0 leaves it off."""
    if seconds <= 0:
        return
    idle = max(1, round(seconds))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if not hasattr(socket, "TCP_KEEPIDLE"):
        return  # not Linux: the system's own timing
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // PROBES))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, PROBES)
