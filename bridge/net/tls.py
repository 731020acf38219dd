"""TLS contexts: the POP3 side's server certificate (reloadable) and the upstream side's trust.

POP3 side: `ServerTls` holds the `ssl.SSLContext` built from `pop3.tls_cert`/`pop3.tls_key`.
New connections (implicit-TLS listeners and STLS alike) take `ServerTls.context` at the moment
they start TLS; `reload()` (SIGHUP) builds a fresh context from the files and swaps it in, so
renewed certificates apply to new connections while established sessions keep the one they
negotiated and are not dropped. A reload that fails (a half-written file, a key that does not
match) is logged and the old context stays.

Defaults are TLS 1.2 or newer with Python's (OpenSSL's) default cipher list. Operators with
legacy devices may lower `pop3.minimum_tls_version` down to TLS 1.0; OpenSSL 3 refuses those
protocol versions at its default security level, so that setting also lowers the level to 0,
and the bridge logs a warning at start-up.

Upstream side: `load_client_context` verifies the server's certificate against the system CAs
or `upstream.ca_file` and checks the host name; `upstream.verify = false` switches both off
(with a warning at start-up).
"""

from __future__ import annotations

import ssl

import trio

from bridge.ops.logs import get_logger

__all__ = [
    "TLS_VERSIONS",
    "HandshakeFailed",
    "accept_tls",
    "ServerTls",
    "TlsConfigError",
    "load_client_context",
    "load_server_context",
]

_log = get_logger(component="tls")

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_LEGACY = frozenset({"TLSv1", "TLSv1.1"})


class TlsConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message says which and why."""


def _reason(exc: Exception) -> str:
    # ssl errors carry OpenSSL's reason ("KEY_VALUES_MISMATCH"); OSError its strerror.
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def load_server_context(cert_file: str, key_file: str, minimum_version: str) -> ssl.SSLContext:
    """A server context for the POP3 side. Raises TlsConfigError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"cannot load certificate {cert_file!r} with key {key_file!r}: {_reason(exc)}") from None
    if minimum_version in _LEGACY:
        # OpenSSL 3 allows TLS 1.0/1.1 (and their SHA-1 signatures) only at security level 0.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = TLS_VERSIONS[minimum_version]
    return context


def load_client_context(ca_file: str, *, verify: bool) -> ssl.SSLContext:
    """A client context for the upstream side. Raises TlsConfigError."""
    context = ssl.create_default_context()
    if ca_file:
        # A configured CA file replaces the system CAs: trusting both would let any public CA
        # vouch for a private mail server's name.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"cannot load CA certificates from {ca_file!r}: {_reason(exc)}") from None
        if not context.get_ca_certs():
            raise TlsConfigError(f"{ca_file!r} contains no CA certificate")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ServerTls:
    """The POP3 side's current server context; `reload()` swaps in a new one."""

    def __init__(self, cert_file: str, key_file: str, minimum_version: str) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._minimum_version = minimum_version
        self._context = load_server_context(cert_file, key_file, minimum_version)
        self.generation = 1  # how many contexts were loaded (tests and logs)
        if minimum_version in _LEGACY:
            _log.warning(
                "tls_legacy_versions_enabled",
                minimum_tls_version=minimum_version,
                note="TLS 1.0/1.1 are obsolete (RFC 8996); allow them only for devices that need them",
            )

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def reload(
        self, cert_file: str | None = None, key_file: str | None = None, minimum_version: str | None = None
    ) -> bool:
        """Re-read the certificate and key (from new paths, if given); the current context
        stays if they cannot be used."""
        cert_file = cert_file or self._cert_file
        key_file = key_file or self._key_file
        minimum_version = minimum_version or self._minimum_version
        try:
            context = load_server_context(cert_file, key_file, minimum_version)
        except TlsConfigError as exc:
            _log.error("tls_reload_failed", error=str(exc))
            return False
        self._cert_file, self._key_file, self._minimum_version = cert_file, key_file, minimum_version
        self._context = context
        self.generation += 1
        _log.info("tls_reloaded", cert=self._cert_file, generation=self.generation)
        return True


class HandshakeFailed(Exception):
    """A client's TLS handshake failed; the message is the reason (OpenSSL's, or what broke)."""


async def accept_tls(stream: trio.abc.Stream, context: ssl.SSLContext) -> trio.SSLStream[trio.abc.Stream]:
    """The server side of a TLS handshake (implicit TLS and STLS alike); the caller bounds
    it in time. Raises HandshakeFailed, whatever the client did (a reset included)."""
    tls_stream = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        cause = exc.__cause__
        reason = cause.reason if isinstance(cause, ssl.SSLError) and cause.reason else type(cause or exc).__name__
        raise HandshakeFailed(str(reason)) from None
    return tls_stream
