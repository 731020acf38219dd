"""Addresses, one spelling and one set of rules for all: `host:port` as the configuration
writes it (IPv6 in brackets), client addresses as IPs (zone and IPv4-mapped form taken off),
and the unit a client is counted by (an IPv4 address, or the /64 of an IPv6 one)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import trio

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Parse `host:port` or `[v6-address]:port`; ValueError says what is wrong."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6-address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:1110)")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:1110")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return ListenAddress(host, int(port_text))


def format_peer(host: str, port: int) -> str:
    """"host:port", IPv6 in brackets: the same spelling as the listen addresses in the config."""
    return str(ListenAddress(host, port))


def host_of_peer(peer: str) -> str:
    """The host part of "host:port" / "[v6]:port"."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def socket_peer(stream: trio.SocketStream) -> tuple[str, int]:
    """The connected peer's (host, port), or ("unknown", 0) once the socket has gone."""
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "unknown", 0
    return str(host), int(port)


def peer_name(stream: trio.SocketStream) -> str:
    """The connected peer as "host:port", or "unknown" once the socket has gone."""
    host, port = socket_peer(stream)
    return "unknown" if host == "unknown" else format_peer(host, port)


def socket_name(sock: trio.socket.SocketType) -> str:
    """The address a socket is bound to, as "host:port"."""
    host, port, *_ = sock.getsockname()
    return format_peer(host, port)


def client_ip(address: str) -> IpAddress | None:
    """The IP of a client address, IPv4-mapped IPv6 as IPv4 and without a zone; None for
    what is not an IP (a UNIX socket, "unknown")."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(address: str) -> bool:
    ip = client_ip(address)
    return ip is not None and ip.is_loopback


def is_loopback_host(host: str) -> bool:
    """A configured host name or address that stays on this machine."""
    return host.lower() in ("localhost", "localhost.localdomain") or is_loopback(host)


def in_networks(address: str, networks: Iterable[str]) -> bool:
    ip = client_ip(address)
    return ip is not None and any(ip in ipaddress.ip_network(item, strict=False) for item in networks)


def address_key(address: str) -> str:
    """The unit a client is counted by: the IPv4 address, or the /64 of an IPv6 address
    (which one subscriber usually has whole)."""
    ip = client_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
