"""Connecting the trio engine: TCP, implicit TLS or STARTTLS, the greeting.

`open_channel` returns a `TrioChannel` ready for the login (`bridge.imap.mailbox`). A server
that is not listening is `UpstreamNotListening` (the pool retries it), one that cannot be
reached or does not greet in time `UpstreamUnavailable`, a TLS failure or a refusal that
retrying cannot mend a plain `UpstreamError`. TLS is never given up for plaintext: a server
without STARTTLS, or one that refuses it, is an error.
"""

from __future__ import annotations

import ssl

import trio

from bridge.config import UpstreamSettings
from bridge.imap.channel import Command
from bridge.imap.errors import (
    PreauthGreeting,
    UpstreamError,
    UpstreamNotListening,
    UpstreamUnavailable,
)
from bridge.imap.trio_engine.channel import ConnectionBroken, TrioChannel
from bridge.net.keepalive import set_tcp_keepalive
from bridge.net.tls import load_client_context
from bridge.ops import metrics


class _TlsFailed(Exception):
    """TLS could not be set up; retrying cannot help until the certificate or configuration
    changes, so this is an UpstreamError, not UpstreamUnavailable."""


_contexts: dict[tuple[str, bool], ssl.SSLContext] = {}


def _client_context(settings: UpstreamSettings) -> ssl.SSLContext:
    # Loading the system CA store costs milliseconds; one context per configuration.
    key = (settings.ca_file, settings.verify)
    if key not in _contexts:
        _contexts[key] = load_client_context(settings.ca_file, verify=settings.verify)
    return _contexts[key]


async def _start_tls(stream: trio.abc.Stream, settings: UpstreamSettings) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, _client_context(settings), server_hostname=settings.host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise _TlsFailed(f"tls: certificate verification failed: {cause.verify_message}") from None
        if isinstance(cause, ssl.SSLError):
            raise _TlsFailed(f"tls: handshake failed: {cause.reason or type(cause).__name__}") from None
        raise
    return tls


def _connection_refused(exc: BaseException) -> bool:
    """trio.open_tcp_stream reports "all attempts failed" with the per-address errors as
    its cause (an exception group when there were several addresses)."""
    seen: list[BaseException] = [exc]
    while seen:
        error = seen.pop()
        if isinstance(error, ConnectionRefusedError):
            return True
        if isinstance(error, BaseExceptionGroup):
            seen.extend(error.exceptions)
        if error.__cause__ is not None:
            seen.append(error.__cause__)
    return False


async def _connect(settings: UpstreamSettings) -> trio.abc.Stream:
    try:
        with trio.fail_after(settings.timeout_seconds):
            tcp = await trio.open_tcp_stream(settings.host, settings.port)
            set_tcp_keepalive(tcp.socket, settings.tcp_keepalive_seconds)
            stream: trio.abc.Stream = tcp
            if settings.tls == "implicit":
                stream = await _start_tls(stream, settings)
            return stream
    except trio.TooSlowError:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("timeout").inc()
        raise UpstreamUnavailable(f"connect: no connection within {settings.timeout_seconds:g} s") from None
    except _TlsFailed as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
        raise UpstreamError(str(exc)) from None
    except (OSError, trio.BrokenResourceError) as exc:
        metrics.UPSTREAM_CONNECT_FAILURES.labels("refused").inc()
        if _connection_refused(exc):
            raise UpstreamNotListening("connect: connection refused") from None
        raise UpstreamUnavailable(f"connect: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """What went wrong, in the system's words: trio.open_tcp_stream reports its attempts' own
    errors (e.g. "Too many open files") only as the cause of its "all attempts failed"."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            if isinstance(inner, OSError) and inner.strerror:
                return inner.strerror
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(exc).__name__


async def _greeting(channel: TrioChannel, settings: UpstreamSettings) -> None:
    try:
        with trio.fail_after(settings.timeout_seconds):
            response = await channel.response()
    except (trio.TooSlowError, ConnectionBroken, trio.BrokenResourceError, OSError):
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable("connect: no IMAP greeting") from None
    status = response.text[:12].upper()
    if status.startswith(b"* BYE"):
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable("connect: server refused the session")
    if status.startswith(b"* PREAUTH"):
        metrics.UPSTREAM_CONNECT_FAILURES.labels("preauth").inc()
        raise PreauthGreeting()
    if not status.startswith(b"* OK"):
        metrics.UPSTREAM_CONNECT_FAILURES.labels("greeting").inc()
        raise UpstreamUnavailable("connect: not an IMAP greeting")
    channel.view.status(response.text[2:])


async def _starttls(channel: TrioChannel, settings: UpstreamSettings) -> None:
    if not channel.view.capabilities:
        (await channel.run("capability", Command(b"CAPABILITY"))).require("capability")
    if "STARTTLS" not in channel.view.capabilities:
        # Never fall back to plaintext when TLS was asked for.
        raise _TlsFailed('starttls: the server does not offer STARTTLS (upstream.tls = "starttls")')
    if not (await channel.run("starttls", Command(b"STARTTLS"))).ok:
        raise _TlsFailed('starttls: the server refused STARTTLS (upstream.tls = "starttls")')
    if channel.reader.buffered:
        # Bytes sent before the handshake would be trusted as if they came over TLS.
        raise _TlsFailed("starttls: server sent data before the TLS handshake")
    with trio.fail_after(settings.timeout_seconds):
        channel.stream = await _start_tls(channel.stream, settings)
    # RFC 3501: capabilities learnt before TLS must be forgotten.
    channel.view.capabilities = frozenset()
    (await channel.run("capability", Command(b"CAPABILITY"))).require("capability")


async def open_channel(settings: UpstreamSettings) -> TrioChannel:
    """A connection to `upstream.host`, TLS set up as configured, greeted, not logged in yet."""
    stream = await _connect(settings)
    channel = TrioChannel(stream, settings)
    try:
        await _greeting(channel, settings)
        if settings.tls == "starttls":
            try:
                await _starttls(channel, settings)
            except _TlsFailed as exc:
                metrics.UPSTREAM_CONNECT_FAILURES.labels("tls").inc()
                raise UpstreamError(str(exc)) from None
            except trio.TooSlowError:
                raise UpstreamUnavailable("starttls: no answer") from None
            except (trio.BrokenResourceError, OSError):
                raise UpstreamUnavailable("starttls: connection lost") from None
        metrics.UPSTREAM_CONNECTS.inc()
    except BaseException:
        channel.close()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        raise
    return channel
