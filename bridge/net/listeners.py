"""From an accepted socket to a POP3 client: PROXY header, per-address cap, implicit TLS.

`server.py` accepts connections and applies the global cap; everything that has to happen
before a session can greet its client lives here:

1. On a listener named in `pop3.proxy_protocol`, the peer must be a trusted balancer
   (`pop3.proxy_trusted`); its PROXY header (v1 or v2, `bridge.net.proxy_protocol`) names the real
   client, which from then on is *the* client address for logs, caps and login limits. A v2
   LOCAL header is the balancer's own health check: served under the balancer's address, but
   never as a loopback client for `allow_plaintext_auth = "loopback"`. A header that relays a
   client without naming its address (v1 UNKNOWN, v2 PROXY with AF_UNSPEC or AF_UNIX) is
   refused: the bridge could not tell that client from any other.
2. The per-address cap (`pop3.max_connections_per_address`, IPv6 by /64), counted before the
   TLS handshake so stalled handshakes from one address cannot pile up.
3. On an implicit-TLS listener (`pop3.tls_listen`), the TLS handshake.

Steps 1 and 3 must finish within `pop3.handshake_timeout_seconds`. Every refusal is logged with a
stable event name; a plain-text listener answers it with -ERR, an implicit-TLS listener just
closes (a refusal in clear text would only be a TLS error to the client). A peer that closes
or resets its connection during these steps ends that connection only (load balancers' TCP
health checks connect and reset).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from bridge.config import Pop3Settings
from bridge.net.addresses import address_key, format_peer, in_networks, is_loopback, socket_peer
from bridge.net.proxy_protocol import (
    ProxyHeader,
    ProxyProtocolError,
    bytes_needed,
    parse_proxy_header,
)
from bridge.net.tls import HandshakeFailed, ServerTls, accept_tls
from bridge.ops.logs import get_logger
from bridge.pop3 import ResponseCode
from bridge.pop3.responses import err

__all__ = ["ClientConnection", "ConnectionAdmission", "ListenerKind", "plaintext_auth_allowed"]

_log = get_logger()


@dataclass(frozen=True, slots=True)
class ListenerKind:
    """``configured``: the address as written in the configuration (proxy_protocol names it)."""

    configured: str
    tls: bool = False


@dataclass(frozen=True, slots=True)
class ClientConnection:
    """A client ready for its greeting.

    ``address``/``peer``: the real client (behind a balancer, the one its PROXY header named).
    ``tls_active``: the client's connection is encrypted: TLS with us, or (PROXY v2 SSL flag)
    TLS with the trusted balancer. ``proxied_by``: the balancer's address, if any.
    ``balancer_local``: a PROXY v2 LOCAL connection, the balancer speaking for itself (its
    health check); ``address`` is then the balancer's. ``proxy_source``/``proxy_destination``:
    the addresses the PROXY header named (for the routing lookup service).
    """

    stream: trio.abc.Stream
    address: str
    peer: str
    tls_active: bool = False
    proxied_by: str | None = None
    balancer_local: bool = False
    proxy_source: tuple[str, int] | None = None
    proxy_destination: tuple[str, int] | None = None


def plaintext_auth_allowed(policy: str, address: str, *, balancer_local: bool = False) -> bool:
    """`pop3.allow_plaintext_auth` for a client at ``address`` on an unencrypted connection.
    A balancer's own health check (PROXY v2 LOCAL) is never a loopback client."""
    if policy == "always":
        return True
    if policy == "loopback":
        return is_loopback(address) and not balancer_local
    return False


class _Refused(Exception):
    """The connection is not served; ``reply`` (plain listeners only) says why."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply


async def read_proxy_header(stream: trio.abc.ReceiveStream) -> ProxyHeader:
    """Read exactly one PROXY header, not a byte more. Raises ProxyProtocolError, EOFError, or
    the stream's errors (trio.BrokenResourceError for a reset)."""
    buffer = b""
    while True:
        parsed = parse_proxy_header(buffer)
        if parsed is not None:
            return parsed[0]
        chunk = await stream.receive_some(bytes_needed(buffer))
        if not chunk:
            raise EOFError("connection closed inside the PROXY header")
        buffer += chunk


class ConnectionAdmission:
    """Per-address connection counts and the steps before the greeting (module docstring)."""

    def __init__(self, server_tls: ServerTls | None = None) -> None:
        self.server_tls = server_tls
        self._per_address: Counter[str] = Counter()

    @asynccontextmanager
    async def admit(
        self, stream: trio.SocketStream, kind: ListenerKind, settings: Pop3Settings
    ) -> AsyncIterator[ClientConnection | None]:
        """Yields the client, or None when the connection was refused (and is closed)."""
        host, port = socket_peer(stream)
        key: str | None = None
        refused: _Refused | None = None
        try:
            with trio.fail_after(settings.handshake_timeout_seconds):
                client = await self._proxy(stream, kind, settings, host, port)
                if self._per_address[address_key(client.address)] >= settings.max_connections_per_address:
                    _log.warning("connection_refused", peer=client.peer, reason="max_connections_per_address")
                    raise _Refused(err("too many connections from your address, try again later", ResponseCode.SYS_TEMP))
                key = address_key(client.address)
                self._per_address[key] += 1
                if kind.tls:
                    client = await self._start_tls(client)
        except trio.TooSlowError:
            _log.info("connection_dropped", peer=format_peer(host, port), reason="handshake_timeout")
            refused = _Refused()
        except _Refused as exc:
            refused = exc
        if refused is not None:
            await self._refuse(stream, None if kind.tls else refused.reply)
            if key is not None:
                self._release(key)
            yield None
            return
        assert key is not None
        try:
            yield client
        finally:
            self._release(key)

    def _release(self, key: str) -> None:
        self._per_address[key] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]

    async def _proxy(
        self, stream: trio.SocketStream, kind: ListenerKind, settings: Pop3Settings, host: str, port: int
    ) -> ClientConnection:
        direct = ClientConnection(stream, host, format_peer(host, port))
        if kind.configured not in settings.proxy_protocol:
            return direct
        if not in_networks(host, settings.proxy_trusted):
            _log.warning("proxy_untrusted", peer=direct.peer)
            raise _Refused(err("connection not accepted", ResponseCode.SYS_PERM))
        try:
            header = await read_proxy_header(stream)
        except ProxyProtocolError as exc:
            _log.warning("proxy_header_invalid", peer=direct.peer, error=str(exc))
            raise _Refused() from None
        except EOFError:
            _log.info("proxy_header_incomplete", peer=direct.peer, reason="closed")
            raise _Refused() from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # A TCP reset: what a balancer's TCP health check does.
            _log.info("proxy_header_incomplete", peer=direct.peer, reason="connection_reset")
            raise _Refused() from None
        if header.local:
            # The balancer speaks for itself (a health check).
            return ClientConnection(stream, host, direct.peer, proxied_by=direct.peer, balancer_local=True)
        if header.source is None:
            # The spec now reserves UNKNOWN for when the sender cannot fill the line; an
            # older sender may still use it for its health checks (v2 sends LOCAL, served above).
            _log.info("proxy_source_unknown", peer=direct.peer, version=header.version)
            raise _Refused(err("connection not accepted", ResponseCode.SYS_PERM))
        client_host, client_port = header.source
        return ClientConnection(
            stream,
            client_host,
            format_peer(client_host, client_port),
            tls_active=header.client_tls,
            proxied_by=direct.peer,
            proxy_source=header.source,
            proxy_destination=header.destination,
        )

    async def _start_tls(self, client: ClientConnection) -> ClientConnection:
        if self.server_tls is None:  # pragma: no cover - config validation requires a certificate
            raise _Refused()
        try:
            tls_stream = await accept_tls(client.stream, self.server_tls.context)
        except HandshakeFailed as exc:
            _log.info("tls_handshake_failed", peer=client.peer, reason=str(exc))
            raise _Refused() from None
        return replace(client, stream=tls_stream, tls_active=True)

    @staticmethod
    async def _refuse(stream: trio.SocketStream, reply: bytes | None) -> None:
        if reply is not None:
            with trio.move_on_after(1):
                try:
                    await stream.send_all(reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        await trio.aclose_forcefully(stream)
