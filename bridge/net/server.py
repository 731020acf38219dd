"""The POP3 service: listeners, the connection cap, a session per connection, orderly shutdown.

Every connection's handler lives in one nursery and catches its own errors (`_handle`): an
error in one connection ends that connection only, never another one or the service. At
shutdown (`begin_shutdown`, from SIGTERM/SIGINT in bridge.ops.service) the accept loops stop
and the listeners close at once (readiness turns false), sessions in progress get
`pop3.shutdown_grace_seconds` to finish, and those still open then are cancelled, which closes
them without applying deletions (they never sent QUIT); `stop_now` cuts the grace short.
A configuration reload (bridge.ops.reload) runs `reload_hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial

import trio

from bridge.config import BridgeSettings, weakened_settings
from bridge.imap.engines import engine_runtime
from bridge.net.addresses import peer_name, socket_name
from bridge.net.client_timeouts import watchdog_tick
from bridge.net.keepalive import set_tcp_keepalive
from bridge.net.listeners import ConnectionAdmission, ListenerKind
from bridge.net.sockets import InheritedListener, open_pop3_listeners
from bridge.net.tls import ServerTls
from bridge.ops.logs import get_logger
from bridge.ops.reload import ReloadHook
from bridge.pop3 import ResponseCode
from bridge.pop3.responses import err
from bridge.session import Pop3Session, SharedServices

_log = get_logger()


class Pop3Service:
    def __init__(self, settings: BridgeSettings, *, inherited: Sequence[InheritedListener] = ()) -> None:
        self.settings = settings
        self.state = SharedServices(settings)
        self.bound_addresses: list[str] = []
        # A worker's listening sockets, inherited from its supervisor (bridge.net.sockets).
        self.inherited = tuple(inherited)
        self.listening = False
        self.terminating = False
        # Run after every SIGHUP reload with the settings now in force (e.g. re-read TLS files).
        self.reload_hooks: list[ReloadHook] = []
        self._acceptors: trio.CancelScope | None = None
        self._sessions: trio.CancelScope | None = None
        # PROXY headers, the per-address cap and implicit TLS (bridge.net.listeners); the
        # certificate is re-read on SIGHUP.
        pop3 = settings.pop3
        self.state.server_tls = (
            ServerTls(pop3.tls_cert, pop3.tls_key, pop3.minimum_tls_version) if pop3.tls_cert else None
        )
        self.admission = ConnectionAdmission(self.state.server_tls)
        for event, fields in weakened_settings(settings):
            _log.warning(event, **fields)
        self.reload_hooks.append(self._reload_security)
        self.reload_hooks.append(self._reload_pool)

    async def _reload_pool(self, settings: BridgeSettings) -> None:
        """SIGHUP: the read-ahead budget takes its new size; connections opened under other
        `[upstream]` settings (another host, TLS mode, CA, mailbox, ...) serve no further session. Only when [upstream] changed: any
        other reload keeps the parked connections and the devices' next polls fast."""
        self.state.readahead_budget.limit = settings.upstream.readahead_max_bytes
        self.state.message_cache.settings = settings.cache
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
            _log.error("connection_failed", peer=peer_name(stream), error=type(exc).__name__, exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream, kind: ListenerKind) -> None:
        peer = peer_name(stream)
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
        set_tcp_keepalive(stream.socket, self.settings.pop3.tcp_keepalive_seconds)
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
        # The engines' runtimes are opened once, for the engines [upstream] and the routes use
        # at start (a reload that needs another one needs a restart: bridge.ops.reload).
        async with AsyncExitStack() as runtimes:
            for name in sorted(self.state.router.table().engines()):
                await runtimes.enter_async_context(engine_runtime(name))
            runtimes.push_async_callback(self.state.router.aclose)
            await runtimes.enter_async_context(self.state.pool.running())
            await self._serve(task_status)

    async def _serve(self, task_status: trio.TaskStatus[list[str]]) -> None:
        opened = await open_pop3_listeners(self.settings, self.inherited)
        listeners = [listener for listener, _kind in opened]
        self.bound_addresses = [socket_name(listener.socket) for listener in listeners]
        _log.info("listening", addresses=self.bound_addresses)
        try:
            async with trio.open_nursery() as watchdog:
                # Sessions' client timeouts (bridge.net.client_timeouts), until the last
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
            self.state.close_stores()
