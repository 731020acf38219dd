"""deploy/kubernetes as one set, with real traffic.

The bridge runs as `serve` on the ConfigMap's bridge.toml under the pod's environment (the
image's ENV, then the Deployment's env), the TLS Secret holding a test certificate where the
Deployment mounts it (tests/deploy_support.py). Only what a test machine needs differs: every
listener on a free loopback port, the upstream the test Dovecot (set the way a Deployment sets
single keys, BRIDGE_UPSTREAM__*), and pop3.proxy_trusted naming the balancer's address
(127.0.0.1 here): the edit the ConfigMap asks for.

- Every port of every Service, and every HAProxy frontend, reaches a listener that expects
  what arrives there: plain POP3 with STLS, POP3 over TLS, HTTP; a PROXY v2 header first where
  haproxy.cfg sends one, none where the Service sends none.
- A real haproxy (Debian's), its config derived from the shipped haproxy.cfg with addresses
  moved to loopback ports: the bridge logs the original client's address and counts failed
  logins per original client, not per balancer. Clients connect from 127.0.0.2 and 127.0.0.3;
  haproxy connects to the bridge from 127.0.0.1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox
from tests.deploy_support import (
    HAPROXY_CONFIG,
    HTTP,
    POP3,
    POP3S,
    PROTOCOL_OF_PORT,
    Haproxy,
    LoopbackPod,
    PodBridge,
    container_ports,
    haproxy_routes,
    loopback_haproxy_config,
    loopback_pod,
    of_kind,
)
from tests.harness import free_port
from tests.integration.ops_support import http_get, wait_for_event
from tests.security_support import RawClient, TlsFiles, proxy_v2

BALANCER = "127.0.0.1"  # where the test's balancers (haproxy, or the test itself) connect from
CLIENT = "203.0.113.7"  # a client a PROXY header names
# Connections a test needs at once are a handful; haproxy's -n keeps the shipped maxconn from
# asking for more file descriptors than this machine allows.
HAPROXY_MAXCONN = 1000

PodStarter = Callable[..., tuple[PodBridge, LoopbackPod]]


@pytest.fixture
def start_pod(dovecot: DovecotSandbox, tls_files: TlsFiles, tmp_path: Path) -> Iterator[PodStarter]:
    """``start_pod(**env)``: the pod's bridge, with ``env`` as extra BRIDGE_* variables."""
    started: list[PodBridge] = []

    def start(**env: str) -> tuple[PodBridge, LoopbackPod]:
        workdir = tmp_path / f"pod{len(started)}"
        workdir.mkdir()
        pod = loopback_pod(workdir, Path(tls_files.cert), Path(tls_files.key))
        overrides = {
            "BRIDGE_UPSTREAM__HOST": "127.0.0.1",
            "BRIDGE_UPSTREAM__PORT": str(dovecot.imap_port),
            "BRIDGE_UPSTREAM__TLS": "none",
            "BRIDGE_POP3__PROXY_TRUSTED": f'["{BALANCER}"]',
            **env,
        }
        plain = container_ports()["pop3"]
        assert plain in pod.ports, f"the pod's bridge does not listen on its pop3 port {plain}"
        bridge = PodBridge(workdir, pod, pod.ports[plain], overrides)
        started.append(bridge)
        bridge.start()
        return bridge, pod

    try:
        yield start
    finally:
        for bridge in started:
            bridge.stop()


def pop3_client(
    port: int, protocol: str, tls_files: TlsFiles, *, prefix: bytes = b"", source: str | None = None
) -> RawClient:
    """A client greeted and encrypted the way a mail client does it on ``protocol``: POP3S is
    TLS from the first byte; POP3 reads CAPA, which must offer STLS, and issues it."""
    context = tls_files.client_context()
    client = RawClient(port, prefix=prefix, source=source, tls=context if protocol == POP3S else None)
    try:
        assert client.greeting.startswith(b"+OK"), client.greeting
        if protocol == POP3:
            status, capabilities = client.command_multiline(b"CAPA")
            assert status.startswith(b"+OK") and b"\r\nSTLS\r\n" in b"\r\n" + capabilities, capabilities
            assert client.command(b"STLS").startswith(b"+OK")
            client.start_tls(context)
    except BaseException:
        client.close()
        raise
    return client


def pop3_session(
    port: int, protocol: str, tls_files: TlsFiles, mailbox: Mailbox, *, prefix: bytes = b"", source: str | None = None
) -> str:
    """Log in, STAT, QUIT; returns the client's own address as "host:port"."""
    with pop3_client(port, protocol, tls_files, prefix=prefix, source=source) as client:
        host, own_port = client.sock.getsockname()[:2]
        client.login(mailbox.user, mailbox.password)
        assert client.command(b"STAT").startswith(b"+OK")
        assert client.command(b"QUIT").startswith(b"+OK")
    return f"{host}:{own_port}"


def test_every_service_and_haproxy_port_reaches_a_listener_expecting_what_is_sent(
    start_pod: PodStarter, mailbox: Mailbox, tls_files: TlsFiles
) -> None:
    bridge, pod = start_pod()
    ports = container_ports()
    checked = []
    for service in of_kind("Service"):
        annotations = service["metadata"].get("annotations", {})
        # A load balancer told to send PROXY headers would put one before the client's bytes.
        assert not [name for name in annotations if "proxy-protocol" in name], annotations
        for service_port in service["spec"]["ports"]:
            where = f"Service {service['metadata']['name']} port {service_port['port']}"
            protocol = PROTOCOL_OF_PORT.get(service_port["port"], "")
            assert protocol, f"{where}: which protocol do clients speak there? (tests/deploy_support.py)"
            target = ports[service_port["targetPort"]]
            assert target in pod.ports, f"{where} -> container port {target}: the bridge does not listen there"
            if protocol == HTTP:
                status, body, _ = http_get(pod.ports[target], "/healthz")
                assert status == 200, (where, body)
            else:
                client = pop3_session(pod.ports[target], protocol, tls_files, mailbox)
                assert wait_for_event(bridge, "login_ok", peer=client)["tls"] is True, where
            checked.append(where)

    source_ports = itertools.count(40001)
    for route in haproxy_routes(HAPROXY_CONFIG.read_text()):
        protocol = PROTOCOL_OF_PORT.get(route.bind_port, "")
        assert protocol, f"haproxy frontend {route.frontend}: which protocol do clients speak on {route.bind_port}?"
        for target, sends_proxy in sorted(set(route.servers)):
            where = f"haproxy frontend {route.frontend} (:{route.bind_port}) -> port {target}"
            assert target in pod.ports, f"{where}: the bridge does not listen there"
            source_port = next(source_ports)
            header = proxy_v2(CLIENT, source_port) if sends_proxy else b""
            client = pop3_session(pod.ports[target], protocol, tls_files, mailbox, prefix=header)
            peer = f"{CLIENT}:{source_port}" if sends_proxy else client
            assert wait_for_event(bridge, "login_ok", peer=peer)["tls"] is True, where
            checked.append(where)
    assert len(checked) >= 5, checked  # pop3, pop3s, admin; haproxy's two frontends


HaproxyStarter = Callable[[LoopbackPod], dict[int, int]]


def _greets(port: int) -> bool:
    try:
        with RawClient(port, timeout=5) as client:
            return client.greeting.startswith(b"+OK")
    except (OSError, ConnectionError):
        return False


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[HaproxyStarter]:
    """``start_haproxy(pod)``: haproxy on the shipped haproxy.cfg moved to loopback; returns
    its frontends (shipped bind port -> loopback port). Stopped by pid at the end."""
    started: list[Haproxy] = []

    def start(pod: LoopbackPod) -> dict[int, int]:
        text = HAPROXY_CONFIG.read_text()
        frontends = {route.bind_port: free_port() for route in haproxy_routes(text)}
        config = tmp_path / "haproxy.cfg"
        config.write_text(loopback_haproxy_config(text, pod, frontends))
        haproxy = Haproxy(config, tmp_path / "haproxy.log", HAPROXY_MAXCONN)
        started.append(haproxy)
        haproxy.start(lambda: _greets(frontends[110]))
        return frontends

    try:
        yield start
    finally:
        for haproxy in started:
            haproxy.stop()


def test_haproxy_hands_the_bridge_the_original_client_address(
    start_pod: PodStarter, start_haproxy: HaproxyStarter, mailbox: Mailbox, tls_files: TlsFiles
) -> None:
    bridge, pod = start_pod()
    frontends = start_haproxy(pod)
    for bind_port, source in ((110, "127.0.0.2"), (995, "127.0.0.3")):
        client = pop3_session(frontends[bind_port], PROTOCOL_OF_PORT[bind_port], tls_files, mailbox, source=source)
        assert client.startswith(f"{source}:")
        start = wait_for_event(bridge, "session_start", peer=client)
        assert start["proxied_by"].startswith(f"{BALANCER}:"), start
        login = wait_for_event(bridge, "login_ok", peer=client)
        assert login["tls"] is True and login["user"] == mailbox.user


def test_failed_logins_through_haproxy_count_per_original_client(
    start_pod: PodStarter, start_haproxy: HaproxyStarter, mailbox: Mailbox, tls_files: TlsFiles
) -> None:
    bridge, pod = start_pod(
        BRIDGE_LOGIN_LIMITS__ADDRESS_BLOCK_AFTER="3",
        BRIDGE_LOGIN_LIMITS__ACCOUNT_BLOCK_AFTER="0",
        BRIDGE_LOGIN_LIMITS__FAILURE_DELAY_SECONDS="0",
    )
    frontends = start_haproxy(pod)
    with pop3_client(frontends[110], POP3, tls_files, source="127.0.0.2") as attacker:
        for _ in range(3):
            assert attacker.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
            assert attacker.command(b"PASS wrong-password").startswith(b"-ERR [AUTH]")
        # Now even the right password is refused from this client's address.
        attacker.command(b"USER " + mailbox.user.encode())
        assert attacker.command(b"PASS " + mailbox.password.encode()).startswith(b"-ERR [SYS/TEMP]")
    blocked = wait_for_event(bridge, "login_blocked")
    assert blocked["peer"].startswith("127.0.0.2:"), blocked
    # Another client through the same haproxy is not blocked: the count was not haproxy's.
    client = pop3_session(frontends[110], POP3, tls_files, mailbox, source="127.0.0.3")
    assert wait_for_event(bridge, "session_start", peer=client)["proxied_by"].startswith(f"{BALANCER}:")
    assert wait_for_event(bridge, "login_ok", peer=client)["user"] == mailbox.user
