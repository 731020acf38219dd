"""Several IMAP back ends behind one bridge: static [[routes]] and the lookup service (a real
HTTP server on loopback), with real Dovecot and Cyrus servers at once, different accounts and
TLS modes, and real POP3 clients."""

from __future__ import annotations

import poplib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bridge.ops.reload import reload_settings
from sandbox import DovecotSandbox
from sandbox.cyrus import CyrusSandbox
from tests.harness import ThreadedBridge, bridge_settings, free_port, wait_for_event, wait_until
from tests.integration.routing_support import LookupService
from tests.security_support import TlsFiles

BridgeFactory = Callable[..., ThreadedBridge]


def message(text: str) -> bytes:
    return f"From: routing@example.com\r\nSubject: {text}\r\n\r\n{text}\r\n".encode()


def retrieve_first(bridge: ThreadedBridge, user: str, password: str) -> bytes:
    """RETR 1 of `user`'s maildrop through the bridge, then QUIT."""
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=60)
    try:
        pop.user(user)
        pop.pass_(password)
        lines = pop.retr(1)[1]
        pop.quit()
        return b"\r\n".join(lines)
    finally:
        pop.close()


def refused(bridge: ThreadedBridge, user: str, password: str) -> bytes:
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=60)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto) as caught:
            pop.pass_(password)
        return caught.value.args[0]
    finally:
        pop.close()


def events(bridge: ThreadedBridge, name: str, **fields: Any) -> list[dict[str, Any]]:
    return [e for e in bridge.events() if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]


@pytest.fixture
def bridges() -> Iterator[BridgeFactory]:
    started: list[ThreadedBridge] = []

    def start(imap_port: int, **sections: Any) -> ThreadedBridge:
        bridge = ThreadedBridge(bridge_settings(imap_port, **sections)).start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def test_static_routes_send_each_account_to_its_back_end(
    bridges: BridgeFactory, tls_dovecot: DovecotSandbox, tls_files: TlsFiles, cyrus: CyrusSandbox
) -> None:
    """Dovecot over implicit TLS for one domain, Cyrus in the clear with the local part as its
    login for another: one bridge, each account's mail from its own server."""
    dovecot_box = tls_dovecot.new_mailbox(user=f"d{secrets.token_hex(4)}@dovecot.example")
    cyrus_box = cyrus.new_mailbox()
    cyrus_account = f"{cyrus_box.user}@cyrus.example"
    dovecot_box.append([message("kept on dovecot")])
    cyrus_box.append([message("kept on cyrus")])
    bridge = bridges(
        free_port(),  # [upstream] itself serves nobody here: a closed port
        routes=[
            {"name": "dovecot", "match": "*@dovecot.example", "host": "127.0.0.1", "port": tls_dovecot.imaps_port,
             "tls": "implicit", "ca_file": tls_files.ca_file},
            {"name": "cyrus", "match": ["*@cyrus.example", "*@cyrus.example.org"], "port": cyrus.imap_port,
             "tls": "none", "login": "{local}"},
        ],
    )
    assert b"kept on dovecot" in retrieve_first(bridge, dovecot_box.user, dovecot_box.password)
    # The account is matched case-insensitively; the upstream login is its local part.
    assert b"kept on cyrus" in retrieve_first(bridge, cyrus_account.upper().replace("@CYRUS", "@cyrus"), cyrus_box.password)
    assert wait_for_event(bridge, "login_ok", account=dovecot_box.user)["backend"] == "dovecot"
    assert wait_for_event(bridge, "upstream_fresh", backend="cyrus")
    # Each back end refuses the other's account: the route decides where the password is checked.
    assert refused(bridge, f"{cyrus_box.user}@dovecot.example", cyrus_box.password).startswith(b"-ERR [AUTH]")
    # An account no route matches goes to [upstream], which is down: only that login fails.
    assert refused(bridge, "nobody@elsewhere.example", "x").startswith(b"-ERR [SYS/TEMP]")


def test_the_lookup_service_routes_logins_with_nginx_headers(
    bridges: BridgeFactory, tls_dovecot: DovecotSandbox, tls_files: TlsFiles, cyrus: CyrusSandbox
) -> None:
    dovecot_box = tls_dovecot.new_mailbox(user=f"d{secrets.token_hex(4)}@lookup.example")
    cyrus_box = cyrus.new_mailbox()
    cyrus_account = f"{cyrus_box.user}@lookup.example"
    dovecot_box.append([message("dovecot by lookup")])
    cyrus_box.append([message("cyrus by lookup")])
    with LookupService() as service:
        service.route(dovecot_box.user, tls_dovecot.imaps_port, tls="implicit")
        service.route(cyrus_account, cyrus.imap_port, login=cyrus_box.user)
        bridge = bridges(
            free_port(),
            upstream={"ca_file": tls_files.ca_file},
            routing={"lookup_url": service.url, "secret": "shared secret of the directory", "cache_seconds": 300},
        )
        assert b"dovecot by lookup" in retrieve_first(bridge, dovecot_box.user, dovecot_box.password)
        assert b"cyrus by lookup" in retrieve_first(bridge, f"{cyrus_account}#phone", cyrus_box.password)
        assert b"cyrus by lookup" in retrieve_first(bridge, cyrus_account, cyrus_box.password)

        (first,) = service.requests_for(dovecot_box.user)
        assert first["Auth-Protocol"] == "pop3"
        assert first["Auth-Method"] == "plain"
        assert first["Auth-Login-Attempt"] == "1"
        assert first["Client-IP"] == "127.0.0.1"
        assert first["X-Auth-Key"] == "shared secret of the directory"
        assert "Auth-Pass" not in first  # routing.send_password is off
        # The device is not part of the account; the second login came from the cache.
        assert len(service.requests_for(cyrus_account)) == 1
        backends = {e["account"]: e["backend"] for e in events(bridge, "login_ok")}
        assert backends == {
            dovecot_box.user: f"127.0.0.1:{tls_dovecot.imaps_port}", cyrus_account: f"127.0.0.1:{cyrus.imap_port}",
        }


def test_a_lookup_refusal_reaches_the_client_after_auth_wait(bridges: BridgeFactory, dovecot: DovecotSandbox) -> None:
    with LookupService() as service:
        # Control characters are blanked and the text cut: it is shown to the client as is.
        status = "Account suspended,\tcall support " + "x" * 300
        service.answers["suspended@example.com"] = {"Auth-Status": status, "Auth-Wait": "2"}
        bridge = bridges(
            dovecot.imap_port, routing={"lookup_url": service.url, "send_password": True},
            login_limits={"failure_delay_seconds": 0},
        )
        answer = refused(bridge, "suspended@example.com", "pass word%")
        assert answer == b"-ERR [AUTH] " + ("Account suspended, call support " + "x" * 300)[:200].encode()
        failed = wait_for_event(bridge, "login_failed", reason="lookup_refused")
        assert failed["delay"] == 2.0
        # With send_password the password goes along, escaped as nginx escapes it.
        assert service.requests[0]["Auth-Pass"] == "pass%20word%25"
        # Refusals are not cached: the next attempt asks again (attempt 2 on this connection
        # would say 2; a new connection starts at 1).
        refused(bridge, "suspended@example.com", "pass word%")
        assert len(service.requests) == 2


@pytest.mark.parametrize("failure", ["hang", "http_500", "closed_port"])
def test_a_lookup_that_fails_answers_sys_temp(bridges: BridgeFactory, dovecot: DovecotSandbox, failure: str) -> None:
    with LookupService() as service:
        service.hang = failure == "hang"
        service.http_status = 500 if failure == "http_500" else 200
        url = f"http://127.0.0.1:{free_port()}/" if failure == "closed_port" else service.url
        box = dovecot.new_mailbox()
        service.route(box.user, dovecot.imap_port)
        bridge = bridges(dovecot.imap_port, routing={"lookup_url": url, "timeout_seconds": 1})
        assert refused(bridge, box.user, box.password).startswith(b"-ERR [SYS/TEMP]")
        assert wait_for_event(bridge, "login_failed", reason="lookup")


def test_a_route_change_never_hands_a_parked_connection_to_the_old_server(
    bridges: BridgeFactory, dovecot: DovecotSandbox, own_dovecot: DovecotSandbox
) -> None:
    """The same account and password on two servers (a migration): the lookup moves it while
    a connection to the old server is parked; the next login must read the new server."""
    user, password = f"m{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    old_box = dovecot.new_mailbox(user=user, password=password)
    new_box = own_dovecot.new_mailbox(user=user, password=password)
    old_box.append([message("on the old server")])
    new_box.append([message("on the new server")])
    with LookupService() as service:
        service.route(user, dovecot.imap_port)
        bridge = bridges(dovecot.imap_port, routing={"lookup_url": service.url, "cache_seconds": 0})
        assert b"on the old server" in retrieve_first(bridge, user, password)
        wait_for_event(bridge, "pool_parked")

        service.route(user, own_dovecot.imap_port)
        assert b"on the new server" in retrieve_first(bridge, user, password)
        assert wait_for_event(bridge, "pool_connection_closed", reason="route_changed")
        assert wait_for_event(bridge, "upstream_fresh", backend=f"127.0.0.1:{own_dovecot.imap_port}")

        # Back to the old server: its connection was retired, not kept for later.
        service.route(user, dovecot.imap_port)
        assert b"on the old server" in retrieve_first(bridge, user, password)
        fresh = [e["backend"] for e in events(bridge, "upstream_fresh")]
        assert fresh == ["default", f"127.0.0.1:{own_dovecot.imap_port}", "default"]
        assert not events(bridge, "upstream_reused")


def test_a_reload_changing_one_route_retires_only_that_back_ends_connections(
    bridges: BridgeFactory, dovecot: DovecotSandbox
) -> None:
    one = dovecot.new_mailbox(user=f"one{secrets.token_hex(4)}")
    two = dovecot.new_mailbox(user=f"two{secrets.token_hex(4)}")
    for box in (one, two):
        box.append([message(box.user)])
    routes = [
        {"name": "first", "match": "one*", "port": dovecot.imap_port},
        {"name": "second", "match": "two*", "port": dovecot.imap_port},
    ]
    bridge = bridges(dovecot.imap_port, routes=routes)
    for box in (one, two):
        retrieve_first(bridge, box.user, box.password)
    wait_until(lambda: len(events(bridge, "pool_parked")) == 2, "both connections parked")

    changed = [dict(routes[0], timeout_seconds=9), routes[1]]
    new_settings = bridge_settings(dovecot.imap_port, routes=changed)
    assert bridge.service is not None
    trio.from_thread.run(reload_settings, bridge.service, lambda: new_settings, trio_token=bridge.trio_token)
    assert wait_for_event(bridge, "pool_evicted")["connections"] == 1
    assert wait_for_event(bridge, "pool_connection_closed", reason="upstream_changed")["backend"] == "first"

    for box in (one, two):
        retrieve_first(bridge, box.user, box.password)
    assert events(bridge, "upstream_reused", backend="second")
    assert not events(bridge, "upstream_reused", backend="first")


def test_engine_runtimes_open_for_every_engine_a_route_uses(bridges: BridgeFactory, dovecot: DovecotSandbox) -> None:
    """[upstream] on the trio engine, one route on aioimaplib: both serve (the aioimaplib
    engine needs its asyncio loop, opened at start because a route uses it)."""
    trio_box = dovecot.new_mailbox(user=f"t{secrets.token_hex(4)}")
    aio_box = dovecot.new_mailbox(user=f"a{secrets.token_hex(4)}")
    for box in (trio_box, aio_box):
        box.append([message(box.user)])
    bridge = bridges(
        dovecot.imap_port, upstream={"engine": "trio"},
        routes=[{"name": "aio", "match": "a*", "engine": "aioimaplib"}],
    )
    for box in (trio_box, aio_box):
        assert box.user.encode() in retrieve_first(bridge, box.user, box.password)
    assert {e["engine"] for e in events(bridge, "upstream_fresh")} == {"trio", "aioimaplib"}


def test_check_config_names_the_route_and_key_of_an_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "bridge.toml"
    config.write_text('[[routes]]\nname = "legacy"\nmatch = "*@legacy.example"\nport = 99999\nlogin = "{user}"\n')
    result = subprocess.run([sys.executable, "-m", "bridge", "check-config", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "routes[0] (legacy).port: Input should be less than or equal to 65535" in result.stderr
    assert "routes[0] (legacy).login: unknown placeholder {user}" in result.stderr


async def test_lookup_answers_are_reused_for_cache_seconds(mock_clock: trio.testing.MockClock) -> None:
    """The cache's time is Trio's (a clock that moves only when told); the service is real."""
    from bridge.config import load_settings
    from bridge.routing.lookup import LookupClient, LookupRequest

    with LookupService() as service:
        service.route("alice@example.com", 143)
        routing = load_settings(None, {"routing": {"lookup_url": service.url, "cache_seconds": 60}}).routing
        client = LookupClient(routing)
        try:
            await client.ask(LookupRequest("alice@example.com"))
            await client.ask(LookupRequest("ALICE@example.com"))  # one account, however it is spelt
            assert len(service.requests) == 1
            mock_clock.jump(59.5)
            await client.ask(LookupRequest("alice@example.com"))
            assert len(service.requests) == 1
            mock_clock.jump(1)
            answer = await client.ask(LookupRequest("alice@example.com"))
            assert len(service.requests) == 2 and answer.port == 143
        finally:
            await client.aclose()


def test_the_lookup_hears_the_proxy_protocol_addresses(bridges: BridgeFactory, dovecot: DovecotSandbox) -> None:
    """Behind a PROXY balancer the service is told the real client and the address it reached."""
    from tests.harness import RawPop3
    from tests.security_support import proxy_v1

    box = dovecot.new_mailbox()
    with LookupService() as service:
        service.route(box.user, dovecot.imap_port)
        bridge = bridges(
            dovecot.imap_port, routing={"lookup_url": service.url, "cache_seconds": 0},
            login_limits={"failure_delay_seconds": 0},
            pop3={"listen": ["127.0.0.1:0"], "proxy_protocol": ["127.0.0.1:0"], "proxy_trusted": ["127.0.0.1"],
                  "allow_plaintext_auth": "always"},
        )
        import socket

        sock = socket.create_connection(("127.0.0.1", bridge.port), timeout=30)
        sock.sendall(proxy_v1("192.0.2.7", 40000, "198.51.100.1", 110))
        client = RawPop3.__new__(RawPop3)
        client.sock, client._buf = sock, bytearray()
        try:
            assert client.status().startswith(b"+OK")
            assert client.command(b"USER " + box.user.encode()).startswith(b"+OK")
            assert client.command(b"PASS wrong password").startswith(b"-ERR [AUTH]")
            assert client.command(b"USER " + box.user.encode()).startswith(b"+OK")
            assert client.command(b"PASS " + box.password.encode()).startswith(b"+OK")
        finally:
            sock.close()
        first, second = service.requests_for(box.user)
        assert first["Client-IP"] == "192.0.2.7"
        assert (first["Proxy-Protocol-Addr"], first["Proxy-Protocol-Port"]) == ("192.0.2.7", "40000")
        assert (first["Proxy-Protocol-Server-Addr"], first["Proxy-Protocol-Server-Port"]) == ("198.51.100.1", "110")
        # The second login attempt on the connection says so.
        assert second["Auth-Login-Attempt"] == "2"
