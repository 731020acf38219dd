"""Loopback socket checks the sandbox servers share: free ports, greetings, closed ports."""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def pick_free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports.

    All sockets stay open until every port is chosen, so the kernel cannot hand out the same
    port twice; the (small) race with other programs remains, and callers retry start-up.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def greets(host: str, port: int, prefix: bytes, timeout: float = 1.0) -> bool:
    """Whether a server on host:port sends a first line starting with `prefix`."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(1024)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(prefix)
    except OSError:
        return False


def port_closed(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True
