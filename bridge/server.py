"""The Trio service: POP3 listeners, the connection cap, and orderly shutdown.

Every connection's handler lives in one nursery and catches its own errors (`_handle`): an
error in one connection ends that connection only, never another one or the service. On
SIGTERM/SIGINT the accept loops stop and the listeners close at once (readiness turns false),
sessions in progress get
`pop3.shutdown_grace_seconds` to finish, and those still open then are cancelled, which closes
them without applying deletions (they never sent QUIT). A second signal cuts the grace short.
SIGHUP reloads the configuration (`bridge.lifecycle`).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from functools import partial

import trio

from bridge import metrics
from bridge.admin import AdminServer, UpstreamProbe
from bridge.client_timeouts import watchdog_tick
from bridge.config import BridgeSettings, parse_listen_address
from bridge.lifecycle import ReloadHook, reload_settings
from bridge.listeners import ConnectionAdmission, ListenerKind, format_peer
from bridge.observability import get_logger
from bridge.pop3 import ResponseCode
from bridge.pop3.responses import err
from bridge.session import Pop3Session, ServiceState
from bridge.tls import ServerTls, warn_about_weakened_settings
from bridge.upstream import upstream_runtime

_log = get_logger()


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return format_peer(host, port)


def _bound_address(listener: trio.SocketListener) -> str:
    host, port, *_ = listener.socket.getsockname()
    return format_peer(host, port)


async def _open_listeners(
    settings: BridgeSettings, reuse_port: bool = False
) -> list[tuple[trio.SocketListener, ListenerKind]]:
    from bridge.workers import open_shared_tcp_listeners

    # Several worker processes share each address through SO_REUSEPORT (bridge.workers).
    open_tcp_listeners = open_shared_tcp_listeners if reuse_port else trio.open_tcp_listeners
    listeners: list[tuple[trio.SocketListener, ListenerKind]] = []
    # Plain listeners first, then implicit TLS (bound_addresses keeps this order).
    for configured, tls in [*((item, False) for item in settings.pop3.listen), *((item, True) for item in settings.pop3.tls_listen)]:
        address = parse_listen_address(configured)
        kind = ListenerKind(configured, tls=tls)
        listeners.extend((listener, kind) for listener in await open_tcp_listeners(address.port, host=address.host))
    return listeners


class Pop3Service:
    def __init__(self, settings: BridgeSettings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.state = ServiceState(settings)
        self.bound_addresses: list[str] = []
        self.reuse_port = reuse_port
        self.listening = False
        self.terminating = False
        # Run after every SIGHUP reload with the settings now in force (e.g. re-read TLS files).
        self.reload_hooks: list[ReloadHook] = []
        self._acceptors: trio.CancelScope | None = None
        self._sessions: trio.CancelScope | None = None
        # PROXY headers, the per-address cap and implicit TLS (bridge.listeners); the
        # certificate is re-read on SIGHUP.
        pop3 = settings.pop3
        self.state.server_tls = (
            ServerTls(pop3.tls_cert, pop3.tls_key, pop3.minimum_tls_version) if pop3.tls_cert else None
        )
        self.admission = ConnectionAdmission(self.state.server_tls)
        warn_about_weakened_settings(settings)
        self.reload_hooks.append(self._reload_security)
        self.reload_hooks.append(self._reload_pool)

    async def _reload_pool(self, settings: BridgeSettings) -> None:
        """SIGHUP: connections opened under other `[upstream]` settings (another host, TLS
        mode, CA, mailbox, ...) serve no further session. Only when [upstream] changed: any
        other reload keeps the parked connections and the devices' next polls fast."""
        evicted = self.state.pool.retire_stale()
        if evicted:
            _log.info("pool_evicted", reason="upstream_changed", connections=evicted)

    async def _reload_security(self, settings: BridgeSettings) -> None:
        """SIGHUP: re-read the certificate and key (new connections use them, established
        sessions keep theirs) and apply the new login limits."""
        self.state.login_limiter.settings = settings.login_limits
        pop3 = settings.pop3
        if not pop3.tls_cert:
            return
        server_tls = self.state.server_tls
        if server_tls is None:
            server_tls = ServerTls(pop3.tls_cert, pop3.tls_key, pop3.minimum_tls_version)
            self.state.server_tls = self.admission.server_tls = server_tls
        else:
            server_tls.reload(pop3.tls_cert, pop3.tls_key, pop3.minimum_tls_version)

    def use_settings(self, settings: BridgeSettings) -> None:
        """Sessions that start from now on use `settings` (a reload)."""
        self.settings = settings
        self.state.settings = settings

    def begin_shutdown(self) -> None:
        """Stop accepting now; sessions get `pop3.shutdown_grace_seconds` to end by themselves."""
        self.terminating = True
        if self._acceptors is not None:
            self._acceptors.cancel()
        if self._sessions is not None:
            deadline = trio.current_time() + self.settings.pop3.shutdown_grace_seconds
            self._sessions.deadline = min(self._sessions.deadline, deadline)

    def stop_now(self) -> None:
        """Close every session now, none applying its deletions."""
        self.terminating = True
        if self._acceptors is not None:
            self._acceptors.cancel()
        if self._sessions is not None:
            self._sessions.cancel()

    async def _handle(self, stream: trio.SocketStream, kind: ListenerKind | None = None) -> None:
        """One connection, from accept to close. Nothing that goes wrong in it may leave it:
        an error escaping here would reach the sessions' nursery and end every session and
        the service. Cancellation (shutdown) still goes through."""
        try:
            await self._serve_connection(stream, kind or ListenerKind(""))
        except Exception as exc:
            _log.error("connection_failed", peer=_peer_name(stream), error=type(exc).__name__, exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream, kind: ListenerKind) -> None:
        peer = _peer_name(stream)
        state = self.state
        if state.active_sessions >= self.settings.pop3.max_connections:
            _log.warning("connection_refused", peer=peer, reason="max_connections")
            # Under overload an implicit-TLS client is not worth a handshake: it is just closed.
            with trio.move_on_after(1):
                try:
                    if not kind.tls:
                        await stream.send_all(err("too many connections, try again later", ResponseCode.SYS_TEMP))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return
        # Counted from accept on: connections still in their PROXY header or TLS handshake
        # hold a slot of pop3.max_connections too.
        state.active_sessions += 1
        try:
            async with self.admission.admit(stream, kind, self.settings.pop3) as client:
                if client is not None:
                    await Pop3Session(client.stream, client.peer, state, client).run()
        finally:
            state.active_sessions -= 1

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; reports the bound addresses (host:port) once listening."""
        async with upstream_runtime(), self.state.pool.running():
            opened = await _open_listeners(self.settings, self.reuse_port)
            listeners = [listener for listener, _kind in opened]
            self.bound_addresses = [_bound_address(listener) for listener in listeners]
            _log.info("listening", addresses=self.bound_addresses)
            try:
                async with trio.open_nursery() as watchdog:
                    # Sessions' client timeouts (bridge.client_timeouts), until the last
                    # session is over.
                    watchdog.start_soon(self.state.watchdog.run, lambda: watchdog_tick(self.state.settings))
                    async with trio.open_nursery() as sessions:
                        self._sessions = sessions.cancel_scope
                        async with trio.open_nursery() as acceptors:
                            self._acceptors = acceptors.cancel_scope
                            for listener, kind in opened:
                                serve = partial(
                                    trio.serve_listeners, partial(self._handle, kind=kind), [listener],
                                    handler_nursery=sessions,
                                )
                                acceptors.start_soon(serve)
                            self.listening = True
                            task_status.started(self.bound_addresses)
                        # Only begin_shutdown()/stop_now() end the accept loops. Closing the sockets
                        # now makes the kernel refuse new connections instead of queueing them.
                        self.listening = False
                        for listener in listeners:
                            await trio.aclose_forcefully(listener)
                        _log.info("shutdown_draining", sessions=self.state.active_sessions)
                    watchdog.cancel_scope.cancel()
                    if sessions.cancel_scope.cancelled_caught:
                        _log.warning("shutdown_sessions_closed", grace_seconds=self.settings.pop3.shutdown_grace_seconds)
            finally:
                self.listening = False
                for listener in listeners:
                    await trio.aclose_forcefully(listener)


async def run_until_signalled(
    settings: BridgeSettings,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    *,
    reload: Callable[[], BridgeSettings] | None = None,
    reuse_port: bool = False,
    notify: Callable[[str], None] | None = None,
) -> None:
    """The `serve` command: run the service (and the admin listener, if configured) until
    SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the configuration with
    `reload()`. `notify` hears "ready" and "draining" (a worker tells its supervisor)."""
    service = Pop3Service(settings, reuse_port=reuse_port)
    probe = UpstreamProbe(lambda: service.settings)

    async def readiness() -> tuple[bool, str]:
        if service.terminating:
            return False, "shutting down"
        if not service.listening:
            return False, "POP3 listeners not open"
        return await probe.check()

    with trio.open_signal_receiver(*signals, signal.SIGHUP) as received:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
                await service.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # the sessions are done: stop the admin listener too

            await nursery.start(serve_then_stop)
            admin_address = settings.admin.listen_address
            if admin_address is not None:
                admin = AdminServer(
                    admin_address, readiness=readiness, metrics=metrics.render,
                    max_connections=settings.admin.max_connections,
                )
                await nursery.start(admin.serve)
            if notify is not None:
                notify("ready")
            async for signum in received:
                if signum == signal.SIGHUP:
                    await reload_settings(service, reload)
                elif not service.terminating:
                    _log.info(
                        "shutdown",
                        signal=signal.Signals(signum).name,
                        sessions=service.state.active_sessions,
                        grace_seconds=service.settings.pop3.shutdown_grace_seconds,
                    )
                    service.begin_shutdown()
                    if notify is not None:
                        notify("draining")
                else:
                    _log.warning("shutdown_now", signal=signal.Signals(signum).name)
                    service.stop_now()
