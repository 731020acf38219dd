"""The admin HTTP listener: /metrics (Prometheus text format), /healthz, /readyz, and with
`admin.api` the admin API (/admin/..., bridge.ops.admin_api).

HTTP/1.1 parsing is h11's (sans-IO, the model for our own POP3 core): a hand-written parser
would be the one piece of this service that reads arbitrary input from the network without
a tested grammar behind it. Around it, this module keeps the surface small: GET only, one
request per connection (answered with `Connection: close`; the admin API's actions are POST
requests without a body), a request head of at most
`MAX_REQUEST_HEAD` bytes, `REQUEST_TIMEOUT_SECONDS` for the whole exchange, and at most
`admin.max_connections` connections at once (more are closed at once), so a slow or hostile
client cannot hold tasks or memory for long.

- /healthz: 200 while the process runs its event loop (liveness).
- /readyz: 200 when the POP3 listeners are open, the service is not shutting down, and a
  back end answers with a greeting; else 503 and the reason. The back ends' check
  (bridge.ops.health) is cached for `admin.readiness_cache_seconds`.
- /metrics: refreshes that check first (`before_metrics`), so `bridge_backend_up` is current.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio

from bridge.net.addresses import ListenAddress, peer_name
from bridge.ops.admin_api import JSON, PREFIX, AdminApi
from bridge.ops.logs import get_logger

_log = get_logger(component="admin")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_SECONDS = 10.0
_LINGER_SECONDS = 1.0
_LINGER_MAX_BYTES = 65536
_TEXT = "text/plain; charset=utf-8"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Readiness = Callable[[], Awaitable[tuple[bool, str]]]


class AdminServer:
    def __init__(
        self, address: ListenAddress | None, *, readiness: Readiness, metrics: Callable[[], bytes], max_connections: int = 64,
        api: AdminApi | None = None, before_metrics: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._address = address
        self._readiness = readiness
        self._metrics = metrics
        self._max_connections = max_connections
        self._api = api
        self._before_metrics = before_metrics
        self._connections = 0
        self.bound_address = ""

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        assert self._address is not None
        listeners = await trio.open_tcp_listeners(self._address.port, host=self._address.host)
        host, port, *_ = listeners[0].socket.getsockname()
        self.bound_address = str(ListenAddress(host, port))
        _log.info("admin_listening", address=self.bound_address)
        task_status.started(self.bound_address)
        await trio.serve_listeners(self._handle, listeners)

    async def serve_listeners(self, listeners: list[trio.SocketListener]) -> None:
        """Serve already opened listeners (a worker's private socket, bridge.ops.worker_admin)."""
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
        if self._api is not None and target.startswith(PREFIX):
            status, body, extra = await self._api.handle(request.method, request.target, request.headers.raw_items(), _client(stream))
            await _respond(stream, connection, status, body, content_type=JSON, extra=extra)
        elif request.method != b"GET":
            await _respond(stream, connection, 405, b"only GET\n", extra=[(b"allow", b"GET")])
        elif target == b"/healthz":
            await _respond(stream, connection, 200, b"ok\n")
        elif target == b"/readyz":
            ready, reason = await self._readiness()
            await _respond(stream, connection, 200 if ready else 503, (reason + "\n").encode())
        elif target == b"/metrics":
            if self._before_metrics is not None:
                await self._before_metrics()
            await _respond(stream, connection, 200, self._metrics(), content_type=PROMETHEUS_CONTENT_TYPE)
        else:
            await _respond(stream, connection, 404, b"not found; try /metrics, /healthz or /readyz\n")


def _client(stream: trio.SocketStream) -> str:
    try:
        return peer_name(stream)
    except (OSError, ValueError, TypeError):
        return "local"  # a Unix socket has no address


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
