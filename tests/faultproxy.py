"""A TCP proxy for fault-injection tests: it sits between the bridge and its IMAP server on
loopback and breaks the connection on cue.

Threaded and blocking on purpose: it must keep working while the code under test (a Trio
loop in a thread, or a subprocess) is wedged, and it must not share an event loop with it.

    with FaultProxy("127.0.0.1", dovecot.imap_port) as proxy:
        fault = proxy.arm(Fault("cut", on_command=b"UID EXPUNGE"))
        ... point the bridge at proxy.port, make it QUIT ...
        assert fault.fired.wait(10)

A `Fault` fires once by default (`times=None`: every time). Its trigger:
- nothing: at once, on the next connection (or on every live one if `existing=True`);
- `on_command`: a client->server line containing these bytes (IMAP commands are lines);
  `when="before"` acts before the line is forwarded (the server never sees it),
  `when="after"` forwards the line and acts on what the server sends next, once
  `after_bytes` of it have passed (0: before any of the answer reaches the client);
- no `on_command` and `after_bytes` N: after N server->client bytes of the connection
  (cut a FETCH literal in the middle: the byte-N trigger).
Its action: "cut" (FIN both ways), "reset" (RST both ways), "stall" (the sockets stay open
and nothing more passes either way until `release()` or `stop()`), "delay" (hold the data
`seconds`, then carry on), "refuse" (new connections only: accepted, then reset at once).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["cut", "reset", "stall", "delay", "refuse"]
_CHUNK = 65536
# Longest unterminated client->server run held back for matching (APPEND literals are
# forwarded as they come once they pass this).
_MAX_HELD = 1 << 20


@dataclass(eq=False)
class Fault:
    action: Action
    on_command: bytes | None = None
    when: Literal["before", "after"] = "before"
    after_bytes: int = 0
    seconds: float = 0.0
    times: int | None = 1
    existing: bool = False
    fired: threading.Event = field(default_factory=threading.Event)
    fired_count: int = 0
    # Which connection (its index in FaultProxy.connections) it last fired on.
    fired_on: int | None = None

    def __post_init__(self) -> None:
        if self.action == "delay" and self.seconds <= 0:
            raise ValueError("a delay needs seconds > 0")
        if self.action == "refuse" and (self.on_command is not None or self.after_bytes):
            raise ValueError("refuse acts on new connections only")


class _Connection:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: FaultProxy, index: int, client: socket.socket) -> None:
        self.proxy = proxy
        self.index = index
        self.client = client
        self.server: socket.socket | None = None
        self.lines_to_server: list[bytes] = []
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self.closed = threading.Event()
        self._stall_released = threading.Event()
        self._stalled = False
        self._lock = threading.Lock()
        # Faults waiting for their byte budget to run out: [fault, bytes left, on the answer].
        self._pending: list[list[object]] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        thread = threading.Thread(target=self._open, name=f"faultproxy-{self.index}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _open(self) -> None:
        immediate = self.proxy._take(self, lambda f: f.on_command is None, new=True)
        for fault in immediate:
            if fault.action == "refuse":
                self._fire(fault)
                self._reset()
                return
        try:
            self.server = socket.create_connection(self.proxy.upstream, timeout=10)
            self.server.settimeout(None)
        except OSError:
            self._close()
            return
        for fault in immediate:
            self._schedule(fault, on_answer=fault.after_bytes > 0)
        if not self._apply_due():
            return
        reader = threading.Thread(target=self._pump_to_client, name=f"faultproxy-{self.index}-s2c", daemon=True)
        self._threads.append(reader)
        reader.start()
        self._pump_to_server()

    def _close(self) -> None:
        for sock in (self.client, self.server):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._stall_released.set()
        self.closed.set()

    def _reset(self) -> None:
        for sock in (self.client, self.server):
            if sock is None:
                continue
            # Linger 0 makes close() send RST instead of FIN. The socket is only really
            # closed once the other pump's blocked recv() returns: SHUT_RD wakes it without
            # sending anything.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                sock.close()
        self._stall_released.set()
        self.closed.set()

    def release(self) -> None:
        with self._lock:
            self._stalled = False
        self._stall_released.set()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # -- faults --------------------------------------------------------------------------

    def _fire(self, fault: Fault) -> None:
        fault.fired_on = self.index
        fault.fired.set()

    def _schedule(self, fault: Fault, *, on_answer: bool) -> None:
        with self._lock:
            self._pending.append([fault, fault.after_bytes, on_answer])

    def _apply_due(self, *, answer: bool = False) -> bool:
        """Apply pending faults whose byte budget is spent (those waiting for the server's
        answer only when it is arriving); False once the connection is gone."""
        while True:
            with self._lock:
                due = next((p for p in self._pending if p[1] <= 0 and (answer or not p[2])), None)
                if due is not None:
                    self._pending.remove(due)
            if due is None:
                return not self.closed.is_set()
            fault = due[0]
            assert isinstance(fault, Fault)
            if not self._act(fault):
                return False

    def _act(self, fault: Fault) -> bool:
        self._fire(fault)
        if fault.action == "cut":
            self._close()
            return False
        if fault.action == "reset":
            self._reset()
            return False
        if fault.action == "delay":
            time.sleep(fault.seconds)
            return True
        with self._lock:
            self._stalled = True
            self._stall_released.clear()
        return True

    def _wait_if_stalled(self) -> bool:
        while True:
            with self._lock:
                stalled = self._stalled
            if not stalled:
                return not self.closed.is_set()
            self._stall_released.wait()
            if self.closed.is_set():
                return False

    def _budget_cap(self) -> int | None:
        with self._lock:
            budgets = [int(p[1]) for p in self._pending]  # type: ignore[call-overload]
        return min(budgets) if budgets else None

    def _spend(self, count: int) -> None:
        with self._lock:
            for pending in self._pending:
                pending[1] = int(pending[1]) - count  # type: ignore[call-overload]

    # -- pumps ---------------------------------------------------------------------------

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
        except OSError:
            self._close()
            return False
        return True

    def _pump_to_client(self) -> None:
        assert self.server is not None
        while True:
            try:
                data = self.server.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                self._close()
                return
            while data:
                if not self._apply_due(answer=True) or not self._wait_if_stalled():
                    return
                cap = self._budget_cap()
                piece = data if cap is None else data[: max(cap, 1)]
                if not self._send(self.client, piece):
                    return
                self.bytes_to_client += len(piece)
                self._spend(len(piece))
                data = data[len(piece) :]
            if not self._apply_due(answer=True):
                return

    def _pump_to_server(self) -> None:
        assert self.server is not None
        held = b""
        while True:
            try:
                data = self.client.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                self._close()
                return
            held += data
            while held:
                end = held.find(b"\r\n")
                if end < 0:
                    if len(held) < _MAX_HELD:
                        break
                    line, held = held, b""
                else:
                    line, held = held[: end + 2], held[end + 2 :]
                if not self._forward_line(line):
                    return

    def _forward_line(self, line: bytes) -> bool:
        self.lines_to_server.append(line)
        matched = self.proxy._take(self, lambda f: f.on_command is not None and f.on_command in line)
        for fault in matched:
            if fault.when == "before":
                self._schedule(fault, on_answer=False)
        if not self._apply_due() or not self._wait_if_stalled():
            return False
        # Armed before the line goes out, not after: the server may answer (and the other
        # pump forward the whole answer) before this thread gets to run again.
        for fault in matched:
            if fault.when == "after":
                self._schedule(fault, on_answer=True)
        assert self.server is not None
        if not self._send(self.server, line):
            return False
        self.bytes_to_server += len(line)
        return True


class FaultProxy:
    """Listens on 127.0.0.1 (free port) and forwards to `upstream_host:upstream_port`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[_Connection] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping = True
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        for connection in list(self.connections):
            connection._close()
        self._acceptor.join(5)
        for connection in list(self.connections):
            connection.join(5)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return
            with self._lock:
                connection = _Connection(self, len(self.connections), client)
                self.connections.append(connection)
            connection.start()

    # -- controls --------------------------------------------------------------------------

    def arm(self, fault: Fault) -> Fault:
        """Add a fault; an untriggered one with existing=True hits every live connection now."""
        if fault.existing and fault.on_command is None:
            for connection in self.live_connections():
                connection._schedule(fault, on_answer=fault.after_bytes > 0)
                # A pump blocked in recv() applies it with the next data; stall and cut need
                # no data to take effect, so apply them from here.
                connection._apply_due()
            return fault
        with self._lock:
            self._faults.append(fault)
        return fault

    def disarm(self) -> None:
        with self._lock:
            self._faults.clear()

    def release(self) -> None:
        """Let stalled connections carry on."""
        for connection in self.connections:
            connection.release()

    def cut_all(self) -> None:
        for connection in self.connections:
            connection._close()

    def live_connections(self) -> list[_Connection]:
        return [c for c in self.connections if not c.closed.is_set()]

    def lines_to_server(self) -> list[bytes]:
        """Every client->server line of every connection so far, in connection order."""
        return [line for c in list(self.connections) for line in c.lines_to_server]

    def _take(self, connection: _Connection, match: Callable[[Fault], bool], new: bool = False) -> list[Fault]:
        taken = []
        with self._lock:
            for fault in list(self._faults):
                if fault.existing and new:
                    continue
                if fault.action == "refuse" and not new:
                    continue
                if not match(fault):
                    continue
                fault.fired_count += 1
                taken.append(fault)
                if fault.times is not None and fault.fired_count >= fault.times:
                    self._faults.remove(fault)
        return taken
