"""TLS on both sides, over real TLS: STLS and POP3S with poplib against the bridge, and the
bridge's upstream implicit TLS and STARTTLS against a Dovecot with TLS on. Certificates come
from trustme (tests/conftest.py: tls_files, tls_dovecot)."""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509

from sandbox import DovecotSandbox, Mailbox
from tests.harness import (
    ENGINES,
    SubprocessBridge,
    ThreadedBridge,
    bridge_settings,
    wait_for_event,
    wait_until,
)
from tests.security_support import RawClient, TlsFiles, bound_port

MESSAGE = b"Subject: over TLS\r\n\r\nsecret body\r\n"


@pytest.fixture
def tls_bridge_factory(tls_files: TlsFiles, dovecot: DovecotSandbox) -> Callable[..., ThreadedBridge]:
    """A bridge with the test certificate, STLS on its plain listener and one implicit-TLS
    listener; keyword arguments override config sections as for bridge_factory."""
    started: list[ThreadedBridge] = []

    def start(imap_port: int | None = None, **sections: dict[str, object]) -> ThreadedBridge:
        pop3: dict[str, object] = {
            "tls_cert": tls_files.cert,
            "tls_key": tls_files.key,
            "stls": True,
            "tls_listen": ["127.0.0.1:0"],
        }
        pop3.update(sections.pop("pop3", {}))
        bridge = ThreadedBridge(bridge_settings(imap_port or dovecot.imap_port, pop3=pop3, **sections)).start()
        started.append(bridge)
        return bridge

    yield start  # type: ignore[misc]
    for bridge in started:
        bridge.stop()


def tls_port(bridge: ThreadedBridge) -> int:
    return bound_port(bridge.addresses[-1])


# -- POP3 side --------------------------------------------------------------------------------


def test_stls_with_poplib(tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox) -> None:
    mailbox.append([MESSAGE])
    bridge = tls_bridge_factory(pop3={"allow_plaintext_auth": "never"})
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    try:
        before = pop.capa()
        assert "STLS" in before and "USER" not in before and "SASL" not in before
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\].*use STLS first"):
            pop.user(mailbox.user)
        pop.stls(tls_files.client_context())
        after = pop.capa()  # RFC 2595: the client asks again; the list is the TLS one
        assert "STLS" not in after and "USER" in after and after["SASL"] == ["PLAIN", "LOGIN"]
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
        assert b"\r\n".join(pop.retr(1)[1]) + b"\r\n" == MESSAGE
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()
    login = wait_for_event(bridge, "login_ok", user=mailbox.user)
    assert login["tls"] is True and login["mechanism"] == "USER"
    wait_for_event(bridge, "stls_started")


def test_pop3s_with_poplib(tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox) -> None:
    mailbox.append([MESSAGE])
    bridge = tls_bridge_factory(pop3={"allow_plaintext_auth": "never"})
    pop = poplib.POP3_SSL("127.0.0.1", tls_port(bridge), timeout=30, context=tls_files.client_context())
    try:
        caps = pop.capa()
        assert "STLS" not in caps and "USER" in caps
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
        assert pop.stat() == (1, len(MESSAGE))
        assert b"\r\n".join(pop.retr(1)[1]) + b"\r\n" == MESSAGE
        with pytest.raises(poplib.error_proto, match="already logged in"):
            pop._shortcmd("STLS")
        pop.quit()
    finally:
        pop.close()
    login = wait_for_event(bridge, "login_ok", user=mailbox.user)
    assert login["tls"] is True


def test_pop3s_auth_plain(tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox) -> None:
    from tests.security_support import plain_initial_response

    bridge = tls_bridge_factory(pop3={"allow_plaintext_auth": "never"})
    with RawClient(tls_port(bridge), tls=tls_files.client_context()) as client:
        reply = client.command(b"AUTH PLAIN " + plain_initial_response(mailbox.user, mailbox.password))
        assert reply == b"+OK logged in.\r\n"
        assert client.command(b"STAT") == b"+OK 0 0\r\n"
    assert wait_for_event(bridge, "login_ok", user=mailbox.user)["mechanism"] == "PLAIN"


def test_stls_discards_commands_injected_before_the_handshake(
    tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox
) -> None:
    bridge = tls_bridge_factory()
    with RawClient(bridge.port) as client:
        # An attacker on the path appends commands to the client's STLS in the clear.
        client.send(b"STLS\r\nUSER " + mailbox.user.encode() + b"\r\n")
        assert client.status() == b"+OK begin TLS negotiation\r\n"
        client.start_tls(tls_files.client_context())
        # Had the injected USER run, this PASS would log in.
        assert client.command(b"PASS " + mailbox.password.encode()) == b"-ERR send USER first\r\n"
        client.login(mailbox.user, mailbox.password)
    assert wait_for_event(bridge, "login_ok", user=mailbox.user)["tls"] is True


def test_failed_stls_handshake_ends_only_that_session(
    tls_bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    bridge = tls_bridge_factory()
    with RawClient(bridge.port) as client:
        assert client.command(b"STLS") == b"+OK begin TLS negotiation\r\n"
        client.send(b"this is not a TLS ClientHello\r\n")
        wait_until(client.closed_by_server, "the bridge to close the connection")
    wait_for_event(bridge, "session_end", outcome="tls_failed")
    with RawClient(bridge.port) as other:
        other.login(mailbox.user, mailbox.password)


def test_plain_tls_listener_client_gets_no_session(tls_bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = tls_bridge_factory()
    with RawClient(tls_port(bridge), read_greeting=False) as client:
        client.send(b"USER plaintext\r\n")
        wait_until(client.closed_by_server, "the bridge to close the connection")
    wait_for_event(bridge, "tls_handshake_failed")


def test_untrusting_client_sees_the_certificate_rejected(tls_bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = tls_bridge_factory()
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL("127.0.0.1", tls_port(bridge), timeout=30, context=ssl.create_default_context())


def _legacy_client(maximum: ssl.TLSVersion) -> Callable[[TlsFiles], ssl.SSLContext]:
    def make(files: TlsFiles) -> ssl.SSLContext:
        context = files.client_context()
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    return make


def test_tls_1_1_refused_by_default(tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles) -> None:
    bridge = tls_bridge_factory()
    context = _legacy_client(ssl.TLSVersion.TLSv1_1)(tls_files)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        poplib.POP3_SSL("127.0.0.1", tls_port(bridge), timeout=30, context=context)


def test_tls_1_0_when_lowered_for_legacy_devices(
    tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox
) -> None:
    bridge = tls_bridge_factory(pop3={"minimum_tls_version": "TLSv1"})
    assert wait_for_event(bridge, "tls_legacy_versions_enabled")["level"] == "warning"
    context = _legacy_client(ssl.TLSVersion.TLSv1)(tls_files)
    pop = poplib.POP3_SSL("127.0.0.1", tls_port(bridge), timeout=30, context=context)
    try:
        assert pop.sock.version() == "TLSv1"
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
    finally:
        pop.close()


@pytest.mark.bridge_errors("config_reload_failed")
def test_sighup_reloads_the_certificate_without_dropping_sessions(
    tmp_path: Path, tls_files: TlsFiles, mailbox: Mailbox, dovecot: DovecotSandbox
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(Path(tls_files.cert).read_bytes())
    key.write_bytes(Path(tls_files.key).read_bytes())
    tls_listen = f"127.0.0.1:{_free_port()}"
    env = {
        "BRIDGE_POP3__TLS_CERT": str(cert),
        "BRIDGE_POP3__TLS_KEY": str(key),
        "BRIDGE_POP3__TLS_LISTEN": f'["{tls_listen}"]',
    }
    with SubprocessBridge(tmp_path, dovecot.imap_port, env=env) as bridge:
        port = bound_port(tls_listen)
        context = tls_files.client_context()
        established = poplib.POP3_SSL("127.0.0.1", port, timeout=30, context=context)
        try:
            established.user(mailbox.user)
            established.pass_(mailbox.password)
            first_serial = established.sock.getpeercert()["serialNumber"]
            # A renewed certificate from the same CA replaces the files, then SIGHUP.
            renewed = tls_files.ca.issue_cert("localhost", "127.0.0.1")
            cert.write_bytes(b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
            key.write_bytes(renewed.private_key_pem.bytes())
            assert bridge.process is not None
            os.kill(bridge.process.pid, signal.SIGHUP)
            wait_until(lambda: b'"tls_reloaded"' in bridge.log_path.read_bytes(), "the certificate reload")
            # The session opened before the reload goes on undisturbed...
            assert established.stat() == (0, 0)
            # ...and new connections get the new certificate.
            fresh = poplib.POP3_SSL("127.0.0.1", port, timeout=30, context=context)
            try:
                assert fresh.sock.getpeercert()["serialNumber"] != first_serial
            finally:
                fresh.close()
            # A broken file on the next reload keeps the current certificate in service.
            key.write_bytes(b"not a key")
            os.kill(bridge.process.pid, signal.SIGHUP)
            # (config validation catches it first: the running configuration stays in force)
            wait_until(lambda: b'"config_reload_failed"' in bridge.log_path.read_bytes(), "the failed reload")
            assert b"pop3.tls_key" in bridge.log_path.read_bytes()
            again = poplib.POP3_SSL("127.0.0.1", port, timeout=30, context=context)
            try:
                # The renewed certificate, which the failed reload left in service.
                assert int(again.sock.getpeercert()["serialNumber"], 16) == renewed_serial(renewed)
            finally:
                again.close()
            assert established.noop().startswith(b"+OK")
        finally:
            established.close()


def renewed_serial(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


@pytest.mark.bridge_errors("tls_reload_failed")
def test_a_certificate_reload_that_fails_keeps_the_certificate_in_service(
    tmp_path: Path, tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox
) -> None:
    """The reload hook itself failing (files valid when the configuration was checked, broken
    by the time the hook reads them): tls_reload_failed, and new connections still get the
    certificate that was in service."""
    bridge = tls_bridge_factory()
    context = tls_files.client_context()
    before = poplib.POP3_SSL("127.0.0.1", tls_port(bridge), timeout=30, context=context)
    serial = before.sock.getpeercert()["serialNumber"]
    before.close()
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    assert bridge.service is not None
    service = bridge.service
    settings = service.settings
    reloaded = settings.model_copy(
        update={"pop3": settings.pop3.model_copy(update={"tls_cert": str(broken), "tls_key": str(broken)})}
    )
    trio.from_thread.run(service.reload_hooks[0], reloaded, trio_token=bridge.trio_token)
    assert [e["event"] for e in bridge.events() if e["event"] in ("tls_reload_failed", "tls_reloaded")] == ["tls_reload_failed"]
    after = poplib.POP3_SSL("127.0.0.1", tls_port(bridge), timeout=30, context=context)
    try:
        assert after.sock.getpeercert()["serialNumber"] == serial
        after.user(mailbox.user)
        after.pass_(mailbox.password)
    finally:
        after.close()


def _free_port() -> int:
    from tests.harness import free_port

    return free_port()


# -- upstream side ----------------------------------------------------------------------------


def _dovecot_login_lines(sandbox: DovecotSandbox, user: str) -> list[str]:
    return [
        line
        for line in sandbox.log_path.read_text(errors="replace").splitlines()
        if "imap-login:" in line and "Login:" in line and f"user=<{user}>" in line
    ]


# Both IMAP engines implement upstream TLS; "trio" is the default engine.


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_upstream_tls(tls_dovecot: DovecotSandbox, tls_files: TlsFiles, mode: str, engine: str) -> None:
    box = tls_dovecot.new_mailbox()
    try:
        box.append([MESSAGE])
        port = tls_dovecot.imaps_port if mode == "implicit" else tls_dovecot.imap_port
        assert port is not None
        settings = bridge_settings(
            port, upstream={"tls": mode, "ca_file": tls_files.ca_file, "engine": engine}
        )
        with ThreadedBridge(settings) as bridge, RawClient(bridge.port) as client:
            client.login(box.user, box.password)
            status, body = client.command_multiline(b"RETR 1")
            assert status.startswith(b"+OK") and body == MESSAGE + b".\r\n"
        # Dovecot itself says the bridge's login came over TLS (the seeding's, before it, did not).
        lines = wait_until(lambda: _dovecot_login_lines(tls_dovecot, box.user)[1:], "the bridge's login in Dovecot's log")
        assert not re.search(r"\bTLS\b", _dovecot_login_lines(tls_dovecot, box.user)[0])
        assert re.search(r"\bTLS\b", lines[-1]), lines
    finally:
        box.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_upstream_without_starttls_is_an_error_not_a_downgrade(
    dovecot: DovecotSandbox, mailbox: Mailbox, engine: str
) -> None:
    # The session's Dovecot has TLS off, so it does not offer STARTTLS.
    settings = bridge_settings(dovecot.imap_port, upstream={"tls": "starttls", "engine": engine})
    with ThreadedBridge(settings) as bridge, RawClient(bridge.port) as client:
        assert client.command(b"USER " + mailbox.user.encode()).startswith(b"+OK")
        assert client.command(b"PASS " + mailbox.password.encode()) == (
            b"-ERR [SYS/TEMP] mail server unavailable, try again later\r\n"
        )
        failure = wait_for_event(bridge, "login_failed", user=mailbox.user)
        assert "does not offer STARTTLS" in failure["error"]
    # The password never went to the server in the clear.
    assert f"user=<{mailbox.user}>" not in dovecot.log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("upstream", "why"),
    [
        ({"ca_file": "other"}, "certificate verify failed|certificate verification failed"),
        ({"ca_file": ""}, "certificate verif"),  # the system CAs do not know the test CA
        ({"ca_file": "ours", "host": "localhost"}, "mismatch|not valid for"),
    ],
    ids=["wrong-ca", "system-cas", "wrong-hostname"],
)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_upstream_certificate_verification_fails(
    tls_dovecot: DovecotSandbox, tls_files: TlsFiles, upstream: dict[str, str], why: str, mode: str, engine: str
) -> None:
    box = tls_dovecot.new_mailbox()
    try:
        ca_file = {"other": tls_files.other_ca_file, "ours": tls_files.ca_file, "": ""}[upstream["ca_file"]]
        port = tls_dovecot.imaps_port if mode == "implicit" else tls_dovecot.imap_port
        assert port is not None
        overrides = {"tls": mode, "ca_file": ca_file, "engine": engine}
        if "host" in upstream:
            overrides["host"] = upstream["host"]
        with ThreadedBridge(bridge_settings(port, upstream=overrides)) as bridge, RawClient(bridge.port) as client:
            client.command(b"USER " + box.user.encode())
            assert client.command(b"PASS " + box.password.encode()).startswith(b"-ERR [SYS/TEMP]")
            failure = wait_for_event(bridge, "login_failed", user=box.user)
            assert re.search(why, failure["error"]), failure["error"]
        assert f"user=<{box.user}>" not in tls_dovecot.log_path.read_text(errors="replace")
    finally:
        box.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_upstream_verify_false_accepts_an_unknown_certificate_with_a_warning(
    tls_dovecot: DovecotSandbox, tls_files: TlsFiles, engine: str
) -> None:
    box = tls_dovecot.new_mailbox()
    try:
        assert tls_dovecot.imaps_port is not None
        settings = bridge_settings(
            tls_dovecot.imaps_port,
            upstream={"tls": "implicit", "verify": False, "ca_file": tls_files.other_ca_file, "engine": engine},
        )
        with ThreadedBridge(settings) as bridge, RawClient(bridge.port) as client:
            client.login(box.user, box.password)
            assert wait_for_event(bridge, "upstream_tls_unverified")["level"] == "warning"
    finally:
        box.close()


def test_bad_certificate_files_are_config_errors(tmp_path: Path, tls_files: TlsFiles) -> None:
    from bridge.config import ConfigError, load_settings

    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    cases = [
        ({"tls_cert": tls_files.cert, "tls_key": str(other_key)}, "pop3.tls_key:"),
        ({"tls_cert": str(tmp_path / "missing.pem"), "tls_key": tls_files.key}, "pop3.tls_cert:"),
        ({"stls": True}, "pop3.stls: needs pop3.tls_cert"),
        ({"tls_listen": ["127.0.0.1:995"]}, "pop3.tls_listen: needs pop3.tls_cert"),
    ]
    for pop3, message in cases:
        with pytest.raises(ConfigError) as caught:
            load_settings(None, {"pop3": pop3})
        assert str(caught.value).startswith(message), str(caught.value)
    with pytest.raises(ConfigError, match="upstream.ca_file:"):
        load_settings(None, {"upstream": {"ca_file": tls_files.key}})


# -- the limits on TLS listeners ----------------------------------------------------------------


def _stalled_tls_client(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A client on the implicit-TLS listener that connects and never starts its handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return sock


def test_an_implicit_tls_handshake_that_never_comes_is_cut_off(tls_bridge_factory: Callable[..., ThreadedBridge]) -> None:
    bridge = tls_bridge_factory(pop3={"handshake_timeout_seconds": 1})
    with _stalled_tls_client(tls_port(bridge)) as silent:
        dropped = wait_for_event(bridge, "connection_dropped", reason="handshake_timeout")
        assert dropped["peer"].startswith("127.0.0.1:")
        assert silent.recv(100) == b""  # closed, without a word in the clear


def test_a_full_bridge_closes_new_tls_connections_without_a_handshake(
    tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles
) -> None:
    bridge = tls_bridge_factory(pop3={"max_connections": 1})
    context = tls_files.client_context()
    with RawClient(tls_port(bridge), tls=context):
        with socket.create_connection(("127.0.0.1", tls_port(bridge)), timeout=30) as refused:
            # Nothing in the clear (it would only be a TLS error to the client): just closed.
            assert refused.recv(100) == b""
        assert wait_for_event(bridge, "connection_refused")["reason"] == "max_connections"


def test_handshakes_in_progress_count_towards_the_per_address_cap(
    tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles
) -> None:
    bridge = tls_bridge_factory(pop3={"max_connections_per_address": 1})
    with _stalled_tls_client(tls_port(bridge), "127.0.0.2"):
        wait_until(lambda: bridge.service is not None and bridge.service.state.active_sessions == 1, "the stalled handshake")
        with socket.create_connection(("127.0.0.1", tls_port(bridge)), timeout=30, source_address=("127.0.0.2", 0)) as second:
            assert second.recv(100) == b""
        assert wait_for_event(bridge, "connection_refused")["reason"] == "max_connections_per_address"
        # Another address is not affected.
        with RawClient(tls_port(bridge), tls=tls_files.client_context(), source="127.0.0.3") as other:
            assert other.greeting.startswith(b"+OK")


def test_a_tls_client_that_stops_reading_is_disconnected(
    tls_bridge_factory: Callable[..., ThreadedBridge], tls_files: TlsFiles, mailbox: Mailbox
) -> None:
    # Far more than the socket buffers between the bridge and the client can hold.
    mailbox.append([b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * ((32 << 20) // 72)])
    bridge = tls_bridge_factory(pop3={"send_timeout_seconds": 1})
    client = RawClient(tls_port(bridge), tls=tls_files.client_context())
    try:
        client.login(mailbox.user, mailbox.password)
        client.send(b"RETR 1\r\n")
        # ...and never reads again.
        end = wait_for_event(bridge, "session_end", user=mailbox.user)
        assert end["outcome"] == "send_timeout"
        assert wait_for_event(bridge, "client_not_reading")["seconds"] == 1
    finally:
        client.sock.close()
