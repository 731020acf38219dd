"""The `serve` command's process: the POP3 service, the admin listener, and the signals.

SIGTERM or SIGINT begins a graceful shutdown (bridge.net.server), a second one ends the grace
at once; SIGHUP reloads the configuration (bridge.ops.reload). Workers (bridge.ops.workers)
run the same, reporting "ready" and "draining" to their supervisor.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence

import trio

from bridge.config import BridgeSettings
from bridge.net.server import Pop3Service
from bridge.net.sockets import InheritedListener
from bridge.ops import metrics
from bridge.ops.admin import AdminServer
from bridge.ops.admin_api import AdminApi
from bridge.ops.descriptors import raise_descriptor_limit
from bridge.ops.health import BackendHealth
from bridge.ops.helpdesk import LocalHelpdesk
from bridge.ops.logs import get_logger
from bridge.ops.reload import reload_settings
from bridge.ops.worker_admin import open_unix_listener

_log = get_logger()


async def run_until_signalled(
    settings: BridgeSettings,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    *,
    reload: Callable[[], BridgeSettings] | None = None,
    inherited: Sequence[InheritedListener] = (),
    notify: Callable[[str], None] | None = None,
    admin_socket: str | None = None,
) -> None:
    """The `serve` command: run the service (and the admin listener, if configured) until
    SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the configuration with
    `reload()`. `notify` hears "ready" and "draining" (a worker tells its supervisor);
    `admin_socket`: a worker's private socket for the supervisor's admin API
    (bridge.ops.worker_admin); `inherited`: a worker's listening sockets, from its
    supervisor."""
    raise_descriptor_limit(settings)
    service = Pop3Service(settings, inherited=inherited)
    probe = BackendHealth(lambda: service.settings)

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
                api = AdminApi.for_settings(LocalHelpdesk(service.state), lambda: service.settings)
                admin = AdminServer(
                    admin_address, readiness=readiness, metrics=metrics.render,
                    max_connections=settings.admin.max_connections, api=api if settings.admin.api else None,
                    before_metrics=probe.refresh,
                )
                metrics.register_collector(probe)
                nursery.start_soon(_unregister_at_exit, probe)
                await nursery.start(admin.serve)
            if admin_socket is not None:
                private = AdminServer(
                    None, readiness=readiness, metrics=metrics.render,
                    api=AdminApi(LocalHelpdesk(service.state), lambda: None),
                )
                nursery.start_soon(private.serve_listeners, [await open_unix_listener(admin_socket)])
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


async def _unregister_at_exit(collector: BackendHealth) -> None:
    try:
        await trio.sleep_forever()
    finally:
        metrics.unregister_collector(collector)
