"""Several worker processes on one host: `[server] workers = N`.

The parent process is a supervisor; it serves no POP3 itself. It starts N copies of
`python -m bridge serve --worker-index I --notify-fd FD`. The supervisor binds the POP3
addresses once and every worker inherits the same listening sockets (bridge.net.sockets):
whichever worker is free first takes the next connection, and a worker that dies takes only
its own connections with it (the ones waiting to be accepted go to the others).

The supervisor
- holds the listening sockets for workers it restarts, and closes them when it begins to
  shut down, so that new connections are refused once the workers have closed theirs;
- restarts a worker that exits while the service runs (after 1 s, doubling up to 30 s while
  it keeps crashing, so a broken configuration does not spin the CPU);
- forwards SIGTERM/SIGINT (graceful shutdown, see bridge.net.server) and SIGHUP (reload) to the
  workers, reloads its own settings, and exits 0 once every worker has exited;
- serves the admin listener for all of them: /metrics adds up the workers' metrics
  (prometheus_client's multiprocess mode, one file per process in a private directory),
  /readyz is true while at least one worker says it is listening and the upstream answers.

Workers run in their own process group (a Ctrl-C in a terminal reaches only the supervisor,
which then shuts them down in order) and shut down as on SIGTERM if the supervisor dies: each
holds the read end of a pipe only the supervisor writes to (`--lifeline-fd`), which ends when
the supervisor does, however it ends. (Not PR_SET_PDEATHSIG: Trio starts processes from a
worker thread, and the kernel sends that signal when the *thread* ends, which Trio's thread
cache does after ten idle seconds: the workers were stopped every ten seconds.)
Every log event of a worker carries `worker` (its index) and `pid`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from bridge.config import BridgeSettings, load_settings
from bridge.net.listeners import ListenerKind
from bridge.net.sockets import InheritedListener, bind_pop3_sockets
from bridge.ops import metrics
from bridge.ops.admin import AdminServer
from bridge.ops.admin_api import AdminApi
from bridge.ops.health import BackendHealth
from bridge.ops.logs import get_logger
from bridge.ops.reload import ReloadHook, reload_settings
from bridge.ops.worker_admin import WorkersHelpdesk, socket_path

_log = get_logger(component="supervisor")

_RESTART_DELAY_SECONDS = 1.0
_MAX_RESTART_DELAY_SECONDS = 30.0
_STABLE_AFTER_SECONDS = 60.0  # a worker that ran this long starts the delay afresh
# After the workers' own grace period, how long to wait before killing them.
_KILL_AFTER_GRACE_SECONDS = 15.0




# -- the worker side ---------------------------------------------------------------------


def run_worker(
    settings: BridgeSettings, config_path: Path | None, index: int, notify_fd: int | None, admin_socket: str | None = None,
    lifeline_fd: int | None = None, inherited: Sequence[InheritedListener] = (),
) -> int:
    """A worker process: the ordinary service on the listening sockets it `inherited` from
    the supervisor, reporting to it."""
    from bridge.ops.service import run_until_signalled

    structlog.contextvars.bind_contextvars(worker=index, pid=os.getpid())
    notify_file = os.fdopen(notify_fd, "wb", buffering=0) if notify_fd is not None else None

    def notify(state: str) -> None:
        if notify_file is not None:
            try:
                notify_file.write(state.encode() + b"\n")
            except OSError:
                pass  # the supervisor is gone; the lifeline says so too

    serving = partial(
        run_until_signalled,
        settings,
        reload=partial(load_settings, config_path),
        inherited=inherited,
        notify=notify,
        admin_socket=admin_socket,
    )

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            if lifeline_fd is not None:
                nursery.start_soon(_stop_when_the_supervisor_is_gone, lifeline_fd)
            await serving()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        if notify_file is not None:
            notify_file.close()
    return 0


async def _stop_when_the_supervisor_is_gone(lifeline_fd: int) -> None:
    """The lifeline pipe ends when the supervisor does: shut down as on its SIGTERM."""
    async with trio.lowlevel.FdStream(lifeline_fd) as lifeline:
        while await lifeline.receive_some(64):
            pass
    _log.warning("supervisor_gone")
    os.kill(os.getpid(), signal.SIGTERM)


# -- the supervisor side -----------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    pid: int = 0
    ready: bool = False
    process: trio.Process | None = None


class Supervisor:
    def __init__(
        self, settings: BridgeSettings, config_path: Path | None, metrics_dir: str,
        listeners: Sequence[tuple[socket.socket, ListenerKind]] = (),
    ) -> None:
        self.settings = settings
        # The POP3 listening sockets every worker inherits; closed when shutdown begins.
        self._listeners = list(listeners)
        # Held while a worker process is being started with the listeners' descriptors, so
        # that they are not closed (and their numbers reused) in the middle of it.
        self._starting = trio.Lock()
        self.reload_hooks: list[ReloadHook] = []
        self._config_path = config_path
        self._metrics_dir = metrics_dir
        self._workers = [_Worker(index) for index in range(settings.server.workers)]
        self._terminating = False
        self._stopping = trio.Event()
        self._registry = metrics.aggregated_registry(metrics_dir)
        self._restarts = metrics.supervisor_metrics(self._registry)
        self._render = partial(metrics.render, self._registry)
        self._probe = BackendHealth(lambda: self.settings)
        metrics.register_collector(self._probe, self._registry)

    def use_settings(self, settings: BridgeSettings) -> None:
        self.settings = settings

    def _worker_command(self, index: int, notify_fd: int, lifeline_fd: int) -> list[str]:
        command = [sys.executable, "-m", "bridge", "serve"]
        if self._config_path is not None:
            command += ["--config", str(self._config_path)]
        if self.settings.admin.api:
            command += ["--admin-socket", socket_path(self._metrics_dir, index)]
        for sock, kind in self._listeners:
            command += ["--listener", InheritedListener(sock.fileno(), kind).as_argument()]
        return command + [
            "--worker-index", str(index), "--notify-fd", str(notify_fd), "--lifeline-fd", str(lifeline_fd),
        ]

    def _worker_environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
            # The supervisor serves the admin listener for every worker.
            "BRIDGE_ADMIN__LISTEN": "",
            # Workers keep the addresses the supervisor started with, whatever a reload says.
            "BRIDGE_POP3__LISTEN": json.dumps(self.settings.pop3.listen),
        }

    async def readiness(self) -> tuple[bool, str]:
        if self._terminating:
            return False, "shutting down"
        if not any(worker.ready for worker in self._workers):
            return False, "no worker is listening"
        return await self._probe.check()

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
            async with trio.open_nursery() as nursery:
                running = len(self._workers)

                async def supervise(worker: _Worker) -> None:
                    nonlocal running
                    await self._keep_running(worker)
                    running -= 1
                    if running == 0:
                        nursery.cancel_scope.cancel()

                for worker in self._workers:
                    nursery.start_soon(supervise, worker)
                admin_address = self.settings.admin.listen_address
                if admin_address is not None:
                    helpdesk = WorkersHelpdesk([socket_path(self._metrics_dir, w.index) for w in self._workers])
                    admin = AdminServer(
                        admin_address, readiness=self.readiness, metrics=self._render,
                        max_connections=self.settings.admin.max_connections, before_metrics=self._probe.refresh,
                        api=AdminApi.for_settings(helpdesk, lambda: self.settings) if self.settings.admin.api else None,
                    )
                    await nursery.start(admin.serve)
                async for signum in received:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        await reload_settings(self, partial(load_settings, self._config_path))
                        self._signal_workers(signal.SIGHUP)
                        continue
                    if not self._terminating:
                        _log.info("shutdown", signal=name, workers=len(self._workers))
                        self._terminating = True
                        self._stopping.set()
                        nursery.start_soon(self._kill_stragglers)
                        await self._close_listeners()
                    self._signal_workers(signal.SIGTERM)

    async def _close_listeners(self) -> None:
        # The workers close their own copies as they begin to drain; once the last copy is
        # closed the kernel refuses new connections instead of queueing them.
        async with self._starting:
            for sock, _kind in self._listeners:
                sock.close()
            self._listeners.clear()

    def _signal_workers(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _kill_stragglers(self) -> None:
        await trio.sleep(self.settings.pop3.shutdown_grace_seconds + _KILL_AFTER_GRACE_SECONDS)
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                _log.warning("worker_killed", worker=worker.index, worker_pid=worker.pid)
                worker.process.kill()

    async def _keep_running(self, worker: _Worker) -> None:
        delay = _RESTART_DELAY_SECONDS
        while not self._terminating:
            started = trio.current_time()
            returncode = await self._run_once(worker)
            if returncode is None:  # shutdown began before the worker started
                return
            metrics.forget_process(worker.pid, self._metrics_dir)
            if self._terminating:
                _log.info("worker_stopped", worker=worker.index, worker_pid=worker.pid, returncode=returncode)
                return
            self._restarts.inc()
            if trio.current_time() - started >= _STABLE_AFTER_SECONDS:
                delay = _RESTART_DELAY_SECONDS
            _log.warning(
                "worker_exited", worker=worker.index, worker_pid=worker.pid, returncode=returncode,
                restart_in_seconds=delay,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()
            delay = min(delay * 2, _MAX_RESTART_DELAY_SECONDS)

    async def _run_once(self, worker: _Worker) -> int | None:
        """The worker's exit status; None if shutdown began before it could start."""
        async with self._starting:
            if self._terminating:
                return None
            read_end, write_end = os.pipe()
            # The worker's lifeline: this process holds the write end until the worker is done;
            # if this process dies, the kernel closes it and the worker reads the end.
            lifeline_read, lifeline_write = os.pipe()
            try:
                process = await trio.lowlevel.open_process(
                    self._worker_command(worker.index, write_end, lifeline_read),
                    pass_fds=(write_end, lifeline_read, *(sock.fileno() for sock, _kind in self._listeners)),
                    env=self._worker_environment(),
                    process_group=0,
                )
            except BaseException:
                os.close(read_end)
                os.close(lifeline_write)
                raise
            finally:
                os.close(write_end)
                os.close(lifeline_read)
        worker.process, worker.pid, worker.ready = process, process.pid, False
        _log.info("worker_started", worker=worker.index, worker_pid=process.pid)
        try:
            async with trio.lowlevel.FdStream(read_end) as notifications:
                buffer = b""
                # The pipe ends when the worker exits (it is the only writer).
                while data := await notifications.receive_some(4096):
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        worker.ready = line == b"ready"
            return await process.wait()
        finally:
            worker.ready = False
            if process.returncode is None:  # cancelled: never leave a worker behind
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            os.close(lifeline_write)


def run_supervisor(settings: BridgeSettings, config_path: Path | None) -> int:
    """The `serve` command with workers > 1; returns the exit status. Raises ListenError
    before any worker starts if an address cannot be bound."""
    # Bound once, here: every worker serves the same sockets (a port 0 included).
    listeners = bind_pop3_sockets(settings)
    metrics_dir = tempfile.mkdtemp(prefix="pop3-imap-bridge-metrics-")
    try:
        trio.run(Supervisor(settings, config_path, metrics_dir, listeners).run)
    finally:
        for sock, _kind in listeners:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
