"""Helpers for the security tests: trustme certificates, PROXY headers, raw clients that
send something before the greeting (a PROXY header) or come from another loopback address."""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import trustme

from bridge.net.proxy_protocol import V2_SIGNATURE
from tests.harness import RawPop3


@dataclass(frozen=True)
class TlsFiles:
    ca: trustme.CA
    ca_file: str  # the CA that signed both server certificates
    cert: str  # the bridge's: localhost, 127.0.0.1, ::1 (chain included)
    key: str
    upstream_cert: str  # the TLS Dovecot's: 127.0.0.1 only
    upstream_key: str
    other_ca_file: str  # a CA that signed neither

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_tls_files(workdir: Path) -> TlsFiles:
    workdir.chmod(0o755)
    ca = trustme.CA()
    bridge_cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    upstream_cert = ca.issue_cert("127.0.0.1")
    paths = {name: workdir / name for name in ("ca.pem", "cert.pem", "key.pem", "up-cert.pem", "up-key.pem", "other.pem")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    for blob in bridge_cert.cert_chain_pems:
        blob.write_to_path(str(paths["cert.pem"]), append=True)
    bridge_cert.private_key_pem.write_to_path(str(paths["key.pem"]))
    for blob in upstream_cert.cert_chain_pems:
        blob.write_to_path(str(paths["up-cert.pem"]), append=True)
    upstream_cert.private_key_pem.write_to_path(str(paths["up-key.pem"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other.pem"]))
    return TlsFiles(
        ca=ca,
        ca_file=str(paths["ca.pem"]),
        cert=str(paths["cert.pem"]),
        key=str(paths["key.pem"]),
        upstream_cert=str(paths["up-cert.pem"]),
        upstream_key=str(paths["up-key.pem"]),
        other_ca_file=str(paths["other.pem"]),
    )


def bound_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# -- PROXY protocol headers, built independently of bridge.net.proxy_protocol's parser ---------------


def proxy_v1(source: str, source_port: int, destination: str | None = None, destination_port: int = 110) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = destination or ("::1" if family == "TCP6" else "127.0.0.1")
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def proxy_v2(
    source: str | None, source_port: int = 0, destination: str = "127.0.0.1", destination_port: int = 110, *, client_tls: bool = False
) -> bytes:
    if source is None:  # LOCAL: a health check
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    if src.version != dst.version:
        dst = ipaddress.ip_address("::1") if src.version == 6 else ipaddress.ip_address("127.0.0.1")
    body = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
    if client_tls:
        value = bytes([0x01]) + b"\0\0\0\0"
        body += bytes([0x20]) + struct.pack("!H", len(value)) + value
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class RawClient(RawPop3):
    """RawPop3 on a socket we set up ourselves: optionally from another loopback source
    address, with bytes (a PROXY header) sent before the greeting is read, over TLS."""

    def __init__(
        self,
        port: int,
        *,
        prefix: bytes = b"",
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
        read_greeting: bool = True,
        timeout: float = 60.0,
    ) -> None:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        if prefix:
            sock.sendall(prefix)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self._buf = bytearray()
        self.greeting = self.status() if read_greeting else b""

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (a reset counts: the server
        closes without reading what the client had sent)."""
        try:
            return self.at_eof()
        except ConnectionResetError:
            return True

    def start_tls(self, context: ssl.SSLContext) -> None:
        assert not self._buf, "bytes received in the clear would be lost"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")


def plain_initial_response(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def secret_forms(password: str) -> list[str]:
    """A password and the encodings in which a client sends it (AUTH PLAIN, LOGIN)."""
    forms = [password, base64.b64encode(password.encode()).decode()]
    return [form for form in forms if len(form) >= 6]
