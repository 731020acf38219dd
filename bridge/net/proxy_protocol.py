"""PROXY protocol headers, versions 1 (text) and 2 (binary), as HAProxy defines them.

A load balancer in front of the bridge opens its own TCP connection, so the bridge would see
the balancer's address instead of the client's. With the PROXY protocol the balancer sends one
header first, naming the client; logs, the per-address connection cap and the login rate
limits then use that address. Only a listener configured for it expects the header, and only
connections from trusted balancers may send one (see `bridge.net.listeners`).

Pure functions, no I/O. `bytes_needed` tells the caller how many more bytes to read, never more
than the header still needs, so whatever the client sends after the header (POP3, or a TLS
ClientHello) stays unread in the socket for the next layer. `parse_proxy_header` returns None
until the header is complete, then the header and its length; a malformed header raises
`ProxyProtocolError` as soon as it is recognisably wrong.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "bytes_needed",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the spec's worst case, "PROXY TCP6 <39> <39> 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
# The shortest header of either version ("PROXY UNKNOWN\r\n"); reading this much first can
# never swallow a byte that follows a header.
_MIN_HEADER_LENGTH = 15

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM = 0x0, 0x1
_ADDRESS_LENGTHS = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
PP2_TYPE_SSL = 0x20
PP2_CLIENT_SSL = 0x01


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the balancer told us.

    ``source``/``destination`` are (address, port) of the client's original connection, or None
    when the header carries none. ``local`` (v2 LOCAL) is the balancer speaking for itself,
    e.g. its health check: there is no client behind it. A header that is not LOCAL and still
    names no address (v1 UNKNOWN, v2 PROXY with an unspecified or UNIX-socket family) relays
    a client the bridge cannot tell apart from any other (`bridge.net.listeners` refuses it).
    ``client_tls`` is v2's PP2_TYPE_SSL flag: the client reached the balancer over TLS.
    """

    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    client_tls: bool = False
    tlvs: tuple[tuple[int, bytes], ...] = field(default=(), repr=False)
    local: bool = False


def _is_prefix(data: bytes, of: bytes) -> bool:
    return of.startswith(data[: len(of)])


def bytes_needed(buffer: bytes) -> int:
    """How many more bytes to read at most before calling `parse_proxy_header` again."""
    if len(buffer) < _MIN_HEADER_LENGTH:
        return _MIN_HEADER_LENGTH - len(buffer)
    if buffer.startswith(V2_SIGNATURE):
        if len(buffer) < V2_FIXED_LENGTH:
            return V2_FIXED_LENGTH - len(buffer)
        total = V2_FIXED_LENGTH + int.from_bytes(buffer[14:16], "big")
        return max(total - len(buffer), 1)
    # v1 ends at a CRLF we cannot see coming: one byte at a time (107 at most).
    return 1


def parse_proxy_header(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``buffer`` and its length, or None if more bytes are needed."""
    if _is_prefix(buffer, V2_SIGNATURE):
        return _parse_v2(buffer) if len(buffer) >= len(V2_SIGNATURE) else None
    if _is_prefix(buffer, V1_PREFIX):
        return _parse_v1(buffer) if len(buffer) >= len(V1_PREFIX) else None
    raise ProxyProtocolError("not a PROXY protocol header")


# -- version 1 ------------------------------------------------------------------------------


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError("v1: bad port")
    return int(text)


def _address(text: bytes, family: bytes) -> str:
    try:
        decoded = text.decode("ascii")
        address = ipaddress.IPv4Address(decoded) if family == b"TCP4" else ipaddress.IPv6Address(decoded)
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"v1: bad {family.decode()} address") from None
    return str(address)


def _parse_v1(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if b"\n" in buffer[:V1_MAX_LENGTH]:
            raise ProxyProtocolError("v1: line not terminated by CRLF")
        if len(buffer) >= V1_MAX_LENGTH:
            raise ProxyProtocolError("v1: header longer than 107 bytes")
        return None
    line = buffer[:end]
    if b"\n" in line or b"\r" in line or not line.isascii():
        raise ProxyProtocolError("v1: invalid character in header")
    parts = line.split(b" ")
    family = parts[1]
    if family == b"UNKNOWN":
        # Whatever follows UNKNOWN is to be ignored: a relayed client without an address.
        return ProxyHeader(version=1), end + 2
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("v1: unknown protocol family")
    if len(parts) != 6:
        raise ProxyProtocolError("v1: expected 'PROXY family source destination sport dport'")
    source = (_address(parts[2], family), _port(parts[4]))
    destination = (_address(parts[3], family), _port(parts[5]))
    return ProxyHeader(version=1, source=source, destination=destination), end + 2


# -- version 2 ------------------------------------------------------------------------------


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyProtocolError("v2: truncated TLV")
        kind = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        value = data[pos + 3 : pos + 3 + length]
        if len(value) != length:
            raise ProxyProtocolError("v2: TLV longer than the header")
        tlvs.append((kind, value))
        pos += 3 + length
    return tuple(tlvs)


def _v2_addresses(family: int, block: bytes) -> tuple[tuple[str, int], tuple[str, int]] | None:
    if family == _AF_INET:
        source_ip, dest_ip = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        ports = block[8:12]
    elif family == _AF_INET6:
        source_ip, dest_ip = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        ports = block[32:36]
    else:
        return None  # AF_UNIX paths name no client we could log or limit
    return (
        (str(source_ip), int.from_bytes(ports[0:2], "big")),
        (str(dest_ip), int.from_bytes(ports[2:4], "big")),
    )


def _parse_v2(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    if len(buffer) < V2_FIXED_LENGTH:
        return None
    version, command = buffer[12] >> 4, buffer[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError("v2: unsupported version")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError("v2: unknown command")
    family, transport = buffer[13] >> 4, buffer[13] & 0x0F
    total = V2_FIXED_LENGTH + int.from_bytes(buffer[14:16], "big")
    if family not in (_AF_UNSPEC, *_ADDRESS_LENGTHS) or transport > 2:
        raise ProxyProtocolError("v2: unknown address family or transport")
    if command == _V2_PROXY and family in (_AF_INET, _AF_INET6) and transport != _PROTO_STREAM:
        raise ProxyProtocolError("v2: only TCP (STREAM) connections can be proxied to POP3")
    address_length = _ADDRESS_LENGTHS.get(family, 0)
    if total - V2_FIXED_LENGTH < address_length:
        raise ProxyProtocolError("v2: header too short for its address family")
    if len(buffer) < total:
        return None
    body = buffer[V2_FIXED_LENGTH:total]
    if command == _V2_LOCAL:
        # The balancer talking for itself (health checks): addresses and TLVs are to be ignored.
        return ProxyHeader(version=2, local=True), total
    tlvs = _parse_tlvs(body[address_length:])
    ssl_values = [value for kind, value in tlvs if kind == PP2_TYPE_SSL]
    if any(len(value) < 5 for value in ssl_values):
        raise ProxyProtocolError("v2: PP2_TYPE_SSL TLV shorter than 5 bytes")
    client_tls = any(value[0] & PP2_CLIENT_SSL for value in ssl_values)
    addresses = _v2_addresses(family, body[:address_length])
    if addresses is None:
        return ProxyHeader(version=2, client_tls=client_tls, tlvs=tlvs), total
    return ProxyHeader(version=2, source=addresses[0], destination=addresses[1], client_tls=client_tls, tlvs=tlvs), total
