"""The admin listener of the real service: probes follow the upstream, bad requests get
precise HTTP answers, and the listener is off unless configured."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

import psutil

from bridge.ops.admin import MAX_REQUEST_HEAD
from sandbox import DovecotSandbox, Mailbox
from tests.harness import SubprocessBridge, free_port
from tests.imap_stub import StubConnection, StubImapServer
from tests.integration.ops_support import events_named, http_get, wait_for


def _admin_bridge(tmp_path: Path, imap_port: int) -> tuple[SubprocessBridge, int]:
    admin_port = free_port()
    return (
        SubprocessBridge(
            tmp_path, imap_port,
            f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nreadiness_cache_seconds = 0\n',
            env={"BRIDGE_UPSTREAM__TLS": "none"},
        ),
        admin_port,
    )


def test_readiness_follows_the_upstream(own_dovecot: DovecotSandbox, tmp_path: Path) -> None:
    bridge, admin_port = _admin_bridge(tmp_path, own_dovecot.imap_port)
    with bridge:
        assert http_get(admin_port, "/readyz")[:2] == (200, "ready\n")

        own_dovecot.stop()
        status, body, _ = http_get(admin_port, "/readyz")
        assert status == 503
        assert body.startswith(f"upstream 127.0.0.1:{own_dovecot.imap_port}: ")
        assert http_get(admin_port, "/healthz")[:2] == (200, "ok\n")  # alive, just not ready

        own_dovecot.start()
        assert http_get(admin_port, "/readyz")[:2] == (200, "ready\n")


def test_readiness_is_false_when_the_upstream_is_not_imap(mailbox: Mailbox, tmp_path: Path) -> None:
    # Dovecot's POP3 port answers, but with "+OK": a misconfigured upstream port.
    bridge, admin_port = _admin_bridge(tmp_path, mailbox.pop3_port)
    with bridge:
        status, body, _ = http_get(admin_port, "/readyz")
        assert (status, body) == (503, f"upstream 127.0.0.1:{mailbox.pop3_port}: no IMAP greeting\n")


def test_bad_requests_get_precise_answers(mailbox: Mailbox, tmp_path: Path) -> None:
    bridge, admin_port = _admin_bridge(tmp_path, mailbox.imap_port)
    with bridge:
        assert http_get(admin_port, "/nothing")[0] == 404
        status, _body, headers = http_get(admin_port, "/metrics", method="POST")
        assert (status, headers["allow"]) == (405, "GET")
        assert http_get(admin_port, "/healthz?verbose=1")[0] == 200

        with socket.create_connection(("127.0.0.1", admin_port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (2 * MAX_REQUEST_HEAD))
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431 ")

        with socket.create_connection(("127.0.0.1", admin_port), timeout=30) as sock:
            sock.sendall(b"this is not HTTP\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")

        # The listener survived all of that.
        assert http_get(admin_port, "/healthz")[:2] == (200, "ok\n")


def test_no_admin_listener_unless_configured(mailbox: Mailbox, tmp_path: Path) -> None:
    with SubprocessBridge(tmp_path, mailbox.imap_port, env={"BRIDGE_UPSTREAM__TLS": "none"}) as bridge:
        assert not [e for e in bridge.events() if e["event"] == "admin_listening"]
        assert [e for e in bridge.events() if e["event"] == "listening"]


def test_the_upstream_check_is_cached(own_dovecot: DovecotSandbox, tmp_path: Path) -> None:
    # Probes every few seconds from every kubelet must not each cost an upstream connection:
    # within readiness_cache_seconds the last answer is reused, even if the upstream went away.
    admin_port = free_port()
    bridge = SubprocessBridge(
        tmp_path, own_dovecot.imap_port,
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nreadiness_cache_seconds = 300\n',
        env={"BRIDGE_UPSTREAM__TLS": "none"},
    )
    with bridge:
        assert http_get(admin_port, "/readyz")[0] == 200
        own_dovecot.stop()
        assert http_get(admin_port, "/readyz")[:2] == (200, "ready\n")


def test_admin_connections_are_capped(mailbox: Mailbox, tmp_path: Path) -> None:
    """Connections beyond admin.max_connections are closed at once: idle ones each hold a
    task for up to the 10 s request timeout, without a cap without bound."""
    admin_port = free_port()
    bridge = SubprocessBridge(
        tmp_path, mailbox.imap_port,
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nmax_connections = 2\n',
        env={"BRIDGE_UPSTREAM__TLS": "none"},
    )
    with bridge:
        idle = [socket.create_connection(("127.0.0.1", admin_port), timeout=30) for _ in range(2)]
        try:
            wait_for(lambda: _admin_connections_held(bridge, admin_port, 2), "both idle connections to be held")
            with socket.create_connection(("127.0.0.1", admin_port), timeout=30) as extra:
                try:
                    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = extra.recv(4096)
                except (ConnectionResetError, BrokenPipeError):
                    answer = b""  # closed before (or while) the request went out
                assert answer == b""
            assert events_named(bridge, "admin_connection_refused")
        finally:
            for sock in idle:
                sock.close()
        # With the idle ones gone, requests are served again.
        wait_for(lambda: _healthz(admin_port) == 200, "the admin listener to serve again")


def _healthz(admin_port: int) -> int | None:
    try:
        return http_get(admin_port, "/healthz")[0]
    except (ConnectionError, http.client.HTTPException):
        return None  # still refused: the closed connections' slots are not free yet


def _admin_connections_held(bridge: SubprocessBridge, admin_port: int, count: int) -> bool:
    """Whether the bridge process holds `count` accepted connections on the admin port."""
    assert bridge.process is not None
    held = [
        c for c in psutil.Process(bridge.process.pid).net_connections(kind="tcp")
        if c.laddr and c.laddr.port == admin_port and c.status == psutil.CONN_ESTABLISHED
    ]
    return len(held) == count


def test_readiness_is_false_when_the_upstream_greets_with_preauth(tmp_path: Path) -> None:
    """Both engines refuse a PREAUTH greeting (tests/integration/test_security_upstream.py),
    so such an upstream cannot serve a login: not ready. A stub, since no configured server
    here pre-authenticates."""

    class Preauth(StubImapServer):
        def greeting(self, connection: StubConnection) -> bytes:
            return b"* PREAUTH welcome\r\n"

    with Preauth() as stub:
        bridge, admin_port = _admin_bridge(tmp_path, stub.port)
        with bridge:
            status, body, _ = http_get(admin_port, "/readyz")
            assert (status, body) == (503, f"upstream 127.0.0.1:{stub.port}: PREAUTH greeting (logins are refused)\n")
