"""The Trio service: POP3 listeners, the connection cap, and orderly shutdown.

Every connection's handler lives in one nursery and catches its own errors (a handler
exception must never take down the listeners). On shutdown the accept loop stops first; the
sessions still running are then cancelled, which closes them without applying deletions (they
never sent QUIT).
"""

from __future__ import annotations

import signal
from functools import partial
from collections.abc import Sequence

import trio

from bridge.config import BridgeSettings
from bridge.observability import get_logger
from bridge.pop3 import ResponseCode
from bridge.pop3.responses import err
from bridge.session import Pop3Session, ServiceState
from bridge.upstream import upstream_runtime

_log = get_logger()


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound_address(listener: trio.SocketListener) -> str:
    host, port, *_ = listener.socket.getsockname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _open_listeners(settings: BridgeSettings) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for address in settings.pop3.listen_addresses:
        listeners.extend(await trio.open_tcp_listeners(address.port, host=address.host))
    return listeners


class Pop3Service:
    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.state = ServiceState(settings)
        self.bound_addresses: list[str] = []

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        state = self.state
        if state.active_sessions >= self.settings.pop3.max_connections:
            _log.warning("connection_refused", peer=peer, reason="max_connections")
            with trio.move_on_after(1):
                try:
                    await stream.send_all(err("too many connections, try again later", ResponseCode.SYS_TEMP))
                except trio.BrokenResourceError:
                    pass
            await trio.aclose_forcefully(stream)
            return
        state.active_sessions += 1
        try:
            await Pop3Session(stream, peer, state).run()
        finally:
            state.active_sessions -= 1

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; reports the bound addresses (host:port) once listening."""
        async with upstream_runtime():
            listeners = await _open_listeners(self.settings)
            self.bound_addresses = [_bound_address(listener) for listener in listeners]
            _log.info("listening", addresses=self.bound_addresses)
            try:
                async with trio.open_nursery() as sessions:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(
                                partial(trio.serve_listeners, self._handle, [listener], handler_nursery=sessions)
                            )
                        task_status.started(self.bound_addresses)
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)


async def run_until_signalled(settings: BridgeSettings, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """The `serve` command: run the service until SIGTERM or SIGINT, then stop cleanly."""
    service = Pop3Service(settings)
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            async for signum in received:
                _log.info("shutdown", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
