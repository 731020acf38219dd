"""PROXY protocol end to end on a real listener: v1 and v2 from a trusted balancer, malformed
headers, untrusted sources, and the real client address in logs, caps and the plaintext rule."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import pytest

from bridge.net.proxy_protocol import V2_SIGNATURE
from sandbox import Mailbox
from tests.harness import ThreadedBridge, wait_for_event, wait_until
from tests.security_support import RawClient, TlsFiles, bound_port, proxy_v1, proxy_v2

PROXIED = {"listen": ["127.0.0.1:0"], "proxy_protocol": ["127.0.0.1:0"], "proxy_trusted": ["127.0.0.0/8"]}


def proxied(**pop3: object) -> dict[str, object]:
    return {**PROXIED, **pop3}


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (proxy_v1("203.0.113.7", 51234), "203.0.113.7:51234"),
        (proxy_v2("203.0.113.7", 51234), "203.0.113.7:51234"),
        (proxy_v1("2001:db8::7", 4242), "[2001:db8::7]:4242"),
        (proxy_v2("2001:db8::7", 4242), "[2001:db8::7]:4242"),
    ],
    ids=["v1", "v2", "v1-ipv6", "v2-ipv6"],
)
def test_logs_show_the_client_behind_the_balancer(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, header: bytes, peer: str
) -> None:
    bridge = bridge_factory(pop3=proxied(allow_plaintext_auth="always"))
    with RawClient(bridge.port, prefix=header) as client:
        assert client.greeting.startswith(b"+OK")
        client.login(mailbox.user, mailbox.password)
    login = wait_for_event(bridge, "login_ok", user=mailbox.user)
    assert login["peer"] == peer
    assert login["tls"] is False
    start = wait_for_event(bridge, "session_start", peer=peer)
    assert start["proxied_by"].startswith("127.0.0.1:")


def test_header_and_first_command_in_one_packet(bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = bridge_factory(pop3=proxied())
    with RawClient(bridge.port, prefix=proxy_v2("203.0.113.9", 1) + b"CAPA\r\n") as client:
        status, body = client.multiline()
        assert status.startswith(b"+OK capability list follows")
        assert b"\r\nTOP\r\n" in b"\r\n" + body


def test_local_health_check_uses_the_balancer_address(bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = bridge_factory(pop3=proxied())
    with RawClient(bridge.port, prefix=proxy_v2(None)) as client:
        assert client.command(b"QUIT") == b"+OK bye\r\n"
    assert wait_for_event(bridge, "session_end")["peer"].startswith("127.0.0.1:")


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.7 not-an-ip 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 2\r\n",
        b"PROXY " + b"9" * 120,
        b"USER alice\r\n",
        proxy_v2("203.0.113.7", 1)[:12] + b"\x31" + proxy_v2("203.0.113.7", 1)[13:],
    ],
    ids=["v1-bad-address", "v1-bad-port", "v1-too-long", "no-header", "v2-bad-version"],
)
def test_malformed_headers_close_the_connection(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, header: bytes
) -> None:
    bridge = bridge_factory(pop3=proxied())
    with RawClient(bridge.port, prefix=header, read_greeting=False) as client:
        wait_until(client.closed_by_server, "the bridge to close the connection")
    event = wait_for_event(bridge, "proxy_header_invalid")
    assert event["peer"].startswith("127.0.0.1:") and event["error"]
    # The listener goes on serving.
    with RawClient(bridge.port, prefix=proxy_v1("203.0.113.8", 2)) as client:
        assert client.greeting.startswith(b"+OK")


def test_incomplete_header_times_out(bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = bridge_factory(pop3=proxied(handshake_timeout_seconds=0.5))
    with RawClient(bridge.port, prefix=b"PROXY TCP4 203.0", read_greeting=False) as client:
        wait_until(client.closed_by_server, "the bridge to give up on the header")
    wait_for_event(bridge, "connection_dropped", reason="handshake_timeout")


def test_untrusted_source_is_refused(bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = bridge_factory(pop3=proxied(proxy_trusted=["192.0.2.0/24", "127.0.0.2"]))
    # From 127.0.0.1, not trusted: even a well-formed header is not believed.
    with RawClient(bridge.port, prefix=proxy_v1("203.0.113.7", 1), read_greeting=False) as client:
        assert client.status() == b"-ERR [SYS/PERM] connection not accepted\r\n"
        wait_until(client.closed_by_server, "the bridge to close the connection")
    assert wait_for_event(bridge, "proxy_untrusted")["peer"].startswith("127.0.0.1:")
    # From a trusted address it works.
    with RawClient(bridge.port, prefix=proxy_v1("203.0.113.7", 1), source="127.0.0.2") as client:
        assert client.greeting.startswith(b"+OK")


def test_listener_without_proxy_protocol_treats_a_header_as_a_command(
    bridge_factory: Callable[..., ThreadedBridge],
) -> None:
    bridge = bridge_factory(pop3={"proxy_trusted": ["127.0.0.0/8"]})
    with RawClient(bridge.port) as client:
        assert client.command(proxy_v1("203.0.113.7", 1).rstrip(b"\r\n")) == b"-ERR unknown command\r\n"


def test_plaintext_rule_and_limits_use_the_real_client(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    bridge = bridge_factory(pop3=proxied(max_connections_per_address=1))
    remote = proxy_v1("203.0.113.7", 1)
    with RawClient(bridge.port, prefix=remote) as client:
        # Not loopback: the default "loopback" rule refuses plaintext logins.
        assert client.command(b"USER " + mailbox.user.encode()).startswith(b"-ERR [AUTH] plaintext authentication")
        status, body = client.command_multiline(b"CAPA")
        assert b"USER\r\n" not in body and b"SASL" not in body
        # A second connection from the same real client is over its cap...
        with RawClient(bridge.port, prefix=proxy_v1("203.0.113.7", 2), read_greeting=False) as second:
            assert second.status().startswith(b"-ERR [SYS/TEMP] too many connections from your address")
        # ...while another client behind the same balancer is served.
        with RawClient(bridge.port, prefix=proxy_v1("203.0.113.99", 3)) as third:
            assert third.greeting.startswith(b"+OK")
    # TLS terminated at the balancer (v2 SSL flag) counts as an encrypted connection.
    with RawClient(bridge.port, prefix=proxy_v2("203.0.113.50", 4, client_tls=True)) as client:
        client.login(mailbox.user, mailbox.password)
    assert wait_for_event(bridge, "login_ok", user=mailbox.user)["tls"] is True


def test_proxy_header_before_implicit_tls(
    bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox
) -> None:
    bridge = bridge_factory(
        pop3={
            "tls_cert": tls_files.cert,
            "tls_key": tls_files.key,
            "tls_listen": ["127.0.0.1:0"],
            "proxy_protocol": ["127.0.0.1:0"],
            "proxy_trusted": ["127.0.0.1"],
        }
    )
    tls_port = bound_port(bridge.addresses[-1])
    with RawClient(tls_port, prefix=proxy_v2("198.51.100.4", 999), tls=tls_files.client_context()) as client:
        client.login(mailbox.user, mailbox.password)
    login = wait_for_event(bridge, "login_ok", user=mailbox.user)
    assert login["peer"] == "198.51.100.4:999" and login["tls"] is True


def _reset_after(bridge: ThreadedBridge, data: bytes, *, port: int = 0, event: str = "proxy_header_incomplete") -> None:
    """Connect, send `data` (maybe nothing), and once the bridge has accepted the connection
    (it is reading the PROXY header), close with SO_LINGER 0: the kernel sends a TCP reset
    instead of a FIN, as load balancers' TCP health checks do. Returns once the bridge has
    logged `event` for it and stopped counting it (or died of the reset)."""
    assert bridge.service is not None
    state = bridge.service.state
    before = state.active_sessions
    seen = len(_events(bridge, event))
    sock = socket.create_connection(("127.0.0.1", port or bridge.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if data:
        sock.sendall(data)
    wait_until(lambda: bridge.crashed() or state.active_sessions > before, "the bridge to accept the connection")
    sock.close()
    wait_until(lambda: bridge.crashed() or len(_events(bridge, event)) > seen, "the bridge to see the reset")
    # The connection is counted until its handler ends, a moment after the event: the next
    # call's `before` must not include it (it waited for a count that was never reached).
    wait_until(lambda: bridge.crashed() or state.active_sessions <= before, "the bridge to let the connection go")


def _events(bridge: ThreadedBridge, name: str) -> list[dict[str, object]]:
    return [e for e in bridge.events() if e.get("event") == name]


@pytest.mark.parametrize("data", [b"", b"PROXY TCP4 1.2."], ids=["no-bytes", "mid-header"])
def test_a_reset_during_the_proxy_header_ends_only_that_connection(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, data: bytes
) -> None:
    """The review's reproduction: a trusted peer that resets its connection while the bridge
    reads the PROXY header must not take other sessions or the service with it."""
    bridge = bridge_factory(pop3=proxied(allow_plaintext_auth="always"))
    with RawClient(bridge.port, prefix=proxy_v1("203.0.113.7", 1)) as bystander:
        bystander.login(mailbox.user, mailbox.password)
        for _ in range(3):
            _reset_after(bridge, data)
        # The session that was open when the resets came is still served...
        assert bystander.command(b"STAT") == b"+OK 0 0\r\n"
    # ...and so is a new one.
    with RawClient(bridge.port, prefix=proxy_v1("203.0.113.8", 2)) as client:
        client.login(mailbox.user, mailbox.password)
        assert client.command(b"QUIT").startswith(b"+OK")
    assert not [e for e in bridge.events() if e.get("event") == "session_end" and e.get("outcome") == "shutdown"]
    assert [e["reason"] for e in _events(bridge, "proxy_header_incomplete")] == ["connection_reset"] * 3


def test_a_reset_during_the_tls_handshake_ends_only_that_connection(
    bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox
) -> None:
    bridge = bridge_factory(
        pop3={
            "tls_cert": tls_files.cert,
            "tls_key": tls_files.key,
            "tls_listen": ["127.0.0.1:0"],
            "proxy_protocol": ["127.0.0.1:0"],
            "proxy_trusted": ["127.0.0.1"],
        }
    )
    tls_port = bound_port(bridge.addresses[-1])
    # The start of a TLS ClientHello after a good header, then a reset.
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    _reset_after(bridge, proxy_v2("198.51.100.4", 999) + hello, port=tls_port, event="tls_handshake_failed")
    with RawClient(tls_port, prefix=proxy_v2("198.51.100.5", 1000), tls=tls_files.client_context()) as client:
        client.login(mailbox.user, mailbox.password)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 203.0.113.7 192.0.2.1 1 2\r\n",
        V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0),  # PROXY, AF_UNSPEC
        V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"/run/client".ljust(216, b"\0"),  # AF_UNIX
    ],
    ids=["v1-unknown", "v1-unknown-with-addresses", "v2-unspec", "v2-unix"],
)
def test_a_header_without_a_client_address_is_refused(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox, header: bytes
) -> None:
    """Such a header relays a client the bridge cannot tell apart from any other: served
    under the balancer's (loopback) address it would log in in plaintext and share one login
    limit with every other client."""
    bridge = bridge_factory(pop3=proxied())
    with RawClient(bridge.port, prefix=header, read_greeting=False) as client:
        assert client.status() == b"-ERR [SYS/PERM] connection not accepted\r\n"
        wait_until(client.closed_by_server, "the bridge to close the connection")
    assert wait_for_event(bridge, "proxy_source_unknown")["peer"].startswith("127.0.0.1:")
    assert not [e for e in bridge.events() if e.get("event") == "session_start"]


def test_a_local_health_check_is_not_a_loopback_client(
    bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    """A v2 LOCAL header from a balancer on loopback: served (it is the balancer's health
    check), but no plaintext login, whose rule would otherwise see a loopback address."""
    bridge = bridge_factory(pop3=proxied())
    with RawClient(bridge.port, prefix=proxy_v2(None)) as client:
        assert client.greeting.startswith(b"+OK")
        assert client.command(b"USER " + mailbox.user.encode()).startswith(b"-ERR [AUTH] plaintext authentication")
        _status, body = client.command_multiline(b"CAPA")
        assert b"USER\r\n" not in body and b"SASL" not in body
        assert client.command(b"QUIT") == b"+OK bye\r\n"
