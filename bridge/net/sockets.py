"""Opening the POP3 listeners: the `pop3.listen` and `pop3.tls_listen` addresses.

A single process opens them itself. With `server.workers` > 1 the supervisor binds each
address once (`bind_pop3_sockets`) and every worker inherits the same listening sockets
(`InheritedListener`, `open_pop3_listeners(..., inherited)`): one accept queue per address,
from which whichever worker gets to it first takes the next connection, so a busy worker
takes fewer and a stopped or restarting one strands none.

Not SO_REUSEPORT (a socket of its own per worker, the kernel hashing each new connection to
one of them): the hash ignores how busy a worker is, so sessions queued behind a worker that
was busier at that moment while the other had room (docs/performance.md, At scale, "Workers:
one accept queue for all of them"); connections hashed to a worker that was stuck or
restarting waited for it (or were reset) while the other one was idle; and any process of
the same user could bind the port beside the bridge and receive a share of the connections.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from bridge.config import BridgeSettings
from bridge.net.addresses import parse_listen_address
from bridge.net.listeners import ListenerKind

_LISTEN_BACKLOG = 4096


class ListenError(OSError):
    """A POP3 address could not be bound; `strerror` names it and says why."""

    @classmethod
    def at(cls, kind: ListenerKind, exc: OSError) -> ListenError:
        return cls(exc.errno, f"cannot listen on {kind.configured}: {exc.strerror or exc}")


@dataclass(frozen=True, slots=True)
class InheritedListener:
    """A listening socket a worker inherited from its supervisor, as descriptor `fd`;
    `kind` is the configured address it serves and whether it is implicit TLS."""

    fd: int
    kind: ListenerKind

    def as_argument(self) -> str:
        """The worker's command-line form, read back by `parse`."""
        return f"{self.fd}:{'tls' if self.kind.tls else 'plain'}:{self.kind.configured}"

    @classmethod
    def parse(cls, text: str) -> InheritedListener:
        fd, tls, configured = text.split(":", 2)
        if tls not in ("tls", "plain"):
            raise ValueError(f"listener {text!r}: expected FD:tls|plain:ADDRESS")
        return cls(int(fd), ListenerKind(configured, tls=tls == "tls"))


def configured_listeners(settings: BridgeSettings) -> list[ListenerKind]:
    """Plain listeners first, then implicit TLS (bound_addresses keeps this order)."""
    return [
        *(ListenerKind(item, tls=False) for item in settings.pop3.listen),
        *(ListenerKind(item, tls=True) for item in settings.pop3.tls_listen),
    ]


def bind_pop3_sockets(settings: BridgeSettings) -> list[tuple[socket.socket, ListenerKind]]:
    """Every POP3 address bound and listening, as plain sockets for worker processes to
    inherit (the caller closes them). Raises ListenError naming the address that failed."""
    bound: list[tuple[socket.socket, ListenerKind]] = []
    try:
        for kind in configured_listeners(settings):
            address = parse_listen_address(kind.configured)
            try:
                found = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                for family, sock_type, proto, _name, sockaddr in found:
                    sock = socket.socket(family, sock_type, proto)
                    bound.append((sock, kind))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(sockaddr)
                    sock.listen(_LISTEN_BACKLOG)
            except OSError as exc:
                raise ListenError.at(kind, exc) from exc
    except BaseException:
        for sock, _kind in bound:
            sock.close()
        raise
    return bound


async def open_pop3_listeners(
    settings: BridgeSettings, inherited: Sequence[InheritedListener] = ()
) -> list[tuple[trio.SocketListener, ListenerKind]]:
    """The listeners of this process: the ones it `inherited` from its supervisor (a
    worker), else the configured addresses, opened here."""
    if inherited:
        return [
            (trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=item.fd))), item.kind)
            for item in inherited
        ]
    listeners: list[tuple[trio.SocketListener, ListenerKind]] = []
    try:
        for kind in configured_listeners(settings):
            address = parse_listen_address(kind.configured)
            try:
                opened = await trio.open_tcp_listeners(address.port, host=address.host)
            except OSError as exc:
                raise ListenError.at(kind, exc) from exc
            listeners.extend((listener, kind) for listener in opened)
    except BaseException:
        for listener, _kind in listeners:
            listener.socket.close()
        raise
    return listeners
