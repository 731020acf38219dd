"""upstream.tcp_keepalive_seconds as the kernel gets it: the socket options read back."""

from __future__ import annotations

import socket

import pytest

from bridge.net.keepalive import PROBES, set_tcp_keepalive


def options(sock: socket.socket) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.parametrize(("seconds", "idle", "interval"), [(60, 60, 15), (20, 20, 5), (2.6, 3, 1), (0.4, 1, 1)])
def test_probes_after_the_setting_then_every_quarter_of_it(seconds: float, idle: int, interval: int) -> None:
    with socket.socket() as sock:
        set_tcp_keepalive(sock, seconds)
        assert options(sock) == (1, idle, interval, PROBES)


def test_zero_leaves_the_socket_as_the_kernel_made_it() -> None:
    with socket.socket() as untouched, socket.socket() as sock:
        set_tcp_keepalive(sock, 0)
        assert options(sock) == options(untouched)
        assert options(sock)[0] == 0
