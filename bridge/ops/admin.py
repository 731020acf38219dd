"""The admin HTTP listener: /metrics (Prometheus text format), /healthz, /readyz.

HTTP/1.1 parsing is h11's (sans-IO, the model for our own POP3 core): a hand-written parser
would be the one piece of this service that reads arbitrary input from the network without
a tested grammar behind it. Around it, this module keeps the surface small: GET only, one
request per connection (answered with `Connection: close`), a request head of at most
`MAX_REQUEST_HEAD` bytes, `REQUEST_TIMEOUT_SECONDS` for the whole exchange, and at most
`admin.max_connections` connections at once (more are closed at once), so a slow or hostile
client cannot hold tasks or memory for long.

- /healthz: 200 while the process runs its event loop (liveness).
- /readyz: 200 when the POP3 listeners are open, the service is not shutting down, and the
  upstream IMAP server answers with a greeting; else 503 and the reason. The upstream check
  (`UpstreamProbe`) is cached for `admin.readiness_cache_seconds`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio

from bridge.config import BridgeSettings
from bridge.net.addresses import ListenAddress
from bridge.ops.logs import get_logger

_log = get_logger(component="admin")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_SECONDS = 10.0
_PROBE_TIMEOUT_SECONDS = 5.0
_LINGER_SECONDS = 1.0
_LINGER_MAX_BYTES = 65536
_GREETING_LIMIT = 1024
_TEXT = "text/plain; charset=utf-8"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Readiness = Callable[[], Awaitable[tuple[bool, str]]]


class UpstreamProbe:
    """Is the upstream IMAP server there? A TCP connect and an IMAP greeting (`* OK`) within a
    few seconds; the answer is reused for `readiness_cache_seconds`. A `* PREAUTH` greeting
    is not ready: the engines refuse it (`bridge.imap.errors.PreauthGreeting`)."""

    def __init__(self, settings: Callable[[], BridgeSettings]) -> None:
        self._settings = settings
        self._lock = trio.Lock()
        self._checked_at: float | None = None
        self._answer: tuple[bool, str] = (False, "not checked yet")

    def _fresh(self) -> bool:
        max_age = self._settings().admin.readiness_cache_seconds
        return self._checked_at is not None and trio.current_time() - self._checked_at < max_age

    async def check(self) -> tuple[bool, str]:
        if self._fresh():
            return self._answer
        async with self._lock:  # concurrent probes share one check
            if not self._fresh():
                self._answer = await self._probe()
                self._checked_at = trio.current_time()
            return self._answer

    async def _probe(self) -> tuple[bool, str]:
        upstream = self._settings().upstream
        where = f"upstream {upstream.host}:{upstream.port}"
        timeout = min(upstream.timeout_seconds, _PROBE_TIMEOUT_SECONDS)
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(upstream.host, upstream.port)
                async with stream:
                    greeting = b""
                    while b"\r\n" not in greeting and len(greeting) < _GREETING_LIMIT:
                        data = await stream.receive_some(_GREETING_LIMIT)
                        if not data:
                            break
                        greeting += data
        except trio.TooSlowError:
            return False, f"{where}: no greeting within {timeout:g} s"
        except OSError as exc:
            return False, f"{where}: {exc.strerror or type(exc).__name__}"
        except trio.BrokenResourceError:
            return False, f"{where}: connection reset"
        if greeting.upper().startswith(b"* OK"):
            return True, "ready"
        if greeting.upper().startswith(b"* PREAUTH"):
            return False, f"{where}: PREAUTH greeting (logins are refused)"
        return False, f"{where}: no IMAP greeting"


class AdminServer:
    def __init__(
        self, address: ListenAddress, *, readiness: Readiness, metrics: Callable[[], bytes], max_connections: int = 64
    ) -> None:
        self._address = address
        self._readiness = readiness
        self._metrics = metrics
        self._max_connections = max_connections
        self._connections = 0
        self.bound_address = ""

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self._address.port, host=self._address.host)
        host, port, *_ = listeners[0].socket.getsockname()
        self.bound_address = str(ListenAddress(host, port))
        _log.info("admin_listening", address=self.bound_address)
        task_status.started(self.bound_address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._connections >= self._max_connections:
            _log.warning("admin_connection_refused", reason="max_connections")
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        try:
            await self._serve(stream)
        finally:
            self._connections -= 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
                await self._exchange(stream, connection)
            await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to answer
        except Exception:  # a handler error must never stop the listener
            _log.exception("admin_request_failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, connection: h11.Connection) -> None:
        try:
            request = await _read_request(stream, connection)
        except h11.RemoteProtocolError as exc:
            await _respond(stream, connection, exc.error_status_hint, b"bad request\n")
            return
        if request is None:
            return
        target = request.target.split(b"?", 1)[0]
        if request.method != b"GET":
            await _respond(stream, connection, 405, b"only GET\n", extra=[(b"allow", b"GET")])
        elif target == b"/healthz":
            await _respond(stream, connection, 200, b"ok\n")
        elif target == b"/readyz":
            ready, reason = await self._readiness()
            await _respond(stream, connection, 200 if ready else 503, (reason + "\n").encode())
        elif target == b"/metrics":
            await _respond(stream, connection, 200, self._metrics(), content_type=PROMETHEUS_CONTENT_TYPE)
        else:
            await _respond(stream, connection, 404, b"not found; try /metrics, /healthz or /readyz\n")


async def _linger(stream: trio.SocketStream) -> None:
    """Close gently: closing with unread request bytes would reset the connection (RST), and
    the client might lose our answer, e.g. the 431 for an oversized header, before reading it."""
    with trio.move_on_after(_LINGER_SECONDS):
        await stream.send_eof()
        discarded = 0
        while discarded < _LINGER_MAX_BYTES and (data := await stream.receive_some(MAX_REQUEST_HEAD)):
            discarded += len(data)


async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_REQUEST_HEAD))
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed before a request: nothing to answer


async def _respond(
    stream: trio.SocketStream,
    connection: h11.Connection,
    status: int,
    body: bytes,
    *,
    content_type: str = _TEXT,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
        *(extra or []),
    ]
    data = connection.send(h11.Response(status_code=status, headers=headers))
    data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
