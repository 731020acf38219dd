"""The benchmark's count of a server's connections (bench.proc.server_connections), which
the 10,000-session row holds against pool.max_connections: real loopback connections."""

from __future__ import annotations

import socket

from bench.proc import server_connections


def test_counts_the_established_connections_of_one_listener_only() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_server(("127.0.0.1", 0)) as other:
        host, port = server.getsockname()
        clients = [socket.create_connection((host, port)) for _ in range(5)]
        elsewhere = [socket.create_connection(other.getsockname()) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            assert server_connections(host, port) == 5
            # The server closes two (as on LOGOUT): they are no longer established on its side.
            for sock in accepted[:2]:
                sock.close()
            assert server_connections(host, port) == 3
        finally:
            for sock in clients + elsewhere + accepted:
                sock.close()
