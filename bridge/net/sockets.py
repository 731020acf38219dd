"""Opening the POP3 listeners: the `pop3.listen` and `pop3.tls_listen` addresses, each once
per process, or (`server.workers` > 1) shared by every worker through SO_REUSEPORT, so the
kernel spreads incoming connections over them."""

from __future__ import annotations

import socket

import trio

from bridge.config import BridgeSettings
from bridge.net.addresses import parse_listen_address
from bridge.net.listeners import ListenerKind

_LISTEN_BACKLOG = 4096


async def open_shared_tcp_listeners(port: int, *, host: str | None = None) -> list[trio.SocketListener]:
    """Like trio.open_tcp_listeners, with SO_REUSEPORT so several processes share the address."""
    addresses = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _name, sockaddr in addresses:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(_LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def open_pop3_listeners(
    settings: BridgeSettings, reuse_port: bool = False
) -> list[tuple[trio.SocketListener, ListenerKind]]:
    # Several worker processes share each address through SO_REUSEPORT (bridge.ops.workers).
    open_tcp_listeners = open_shared_tcp_listeners if reuse_port else trio.open_tcp_listeners
    listeners: list[tuple[trio.SocketListener, ListenerKind]] = []
    # Plain listeners first, then implicit TLS (bound_addresses keeps this order).
    for configured, tls in [*((item, False) for item in settings.pop3.listen), *((item, True) for item in settings.pop3.tls_listen)]:
        address = parse_listen_address(configured)
        kind = ListenerKind(configured, tls=tls)
        listeners.extend((listener, kind) for listener in await open_tcp_listeners(address.port, host=address.host))
    return listeners
