"""Per-back-end health with the real command line: one back end stopped while the other
serves, /readyz reporting each, and the metrics labelled by back end."""

from __future__ import annotations

import poplib
import secrets
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, numbered_messages
from sandbox.cyrus import CyrusSandbox
from tests.harness import SubprocessBridge, free_port
from tests.integration.ops_support import http_get, scrape, value, wait_for


def _stat(port: int, user: str, password: str) -> tuple[int, int]:
    pop = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        pop.user(user)
        pop.pass_(password)
        return pop.stat()
    finally:
        pop.close()


def test_one_back_end_down_fails_only_its_own_accounts(
    own_dovecot: DovecotSandbox, cyrus: CyrusSandbox, tmp_path: Path
) -> None:
    one = own_dovecot.new_mailbox(user=f"o{secrets.token_hex(4)}@one.example")
    two = cyrus.new_mailbox()
    one.append(numbered_messages(1))
    two.append(numbered_messages(2))
    admin_port = free_port()
    routes = (
        # Fresh connections only: a connection parked before the stop is not the subject here.
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nreadiness_cache_seconds = 0\n[pool]\npark_seconds = 0\n'
        f'[[routes]]\nname = "one"\nmatch = "*@one.example"\nport = {own_dovecot.imap_port}\ntimeout_seconds = 2\n'
        f'[[routes]]\nname = "two"\nmatch = "*"\nport = {cyrus.imap_port}\n'
    )
    with SubprocessBridge(tmp_path, free_port(), routes) as bridge:
        status, body, _ = http_get(admin_port, "/readyz")
        assert (status, body.splitlines()) == (200, [
            "ready", f"backend one 127.0.0.1:{own_dovecot.imap_port}: ready", f"backend two 127.0.0.1:{cyrus.imap_port}: ready",
        ])
        assert _stat(bridge.port, one.user, one.password)[0] == 1

        own_dovecot.stop()
        pop = poplib.POP3("127.0.0.1", bridge.port, timeout=60)
        try:
            pop.user(one.user)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                pop.pass_(one.password)
        finally:
            pop.close()
        # The other back end's accounts go on as before.
        assert _stat(bridge.port, two.user, two.password)[0] == 2

        status, body, _ = http_get(admin_port, "/readyz")
        lines = body.splitlines()
        assert status == 200  # still in the load balancer: most accounts are served
        assert lines[0] == "ready: 1 of 2 back ends answer"
        assert lines[1].startswith(f"backend one 127.0.0.1:{own_dovecot.imap_port}: ") and not lines[1].endswith(": ready")
        assert lines[2] == f"backend two 127.0.0.1:{cyrus.imap_port}: ready"

        samples = scrape(admin_port)
        assert value(samples, "bridge_backend_up", backend="one") == 0
        assert value(samples, "bridge_backend_up", backend="two") == 1
        assert value(samples, "bridge_backend_logins_total", backend="one", result="upstream") == 1
        assert value(samples, "bridge_backend_errors_total", backend="one", operation="login") == 1
        assert value(samples, "bridge_backend_logins_total", backend="one", result="ok") == 1
        assert value(samples, "bridge_backend_logins_total", backend="two", result="ok") == 1
        assert ("bridge_backend_connect_seconds_count", frozenset({("backend", "two")})) in samples
        # No label carries an account.
        assert not [key for key in samples if any(one.user in v or two.user in v for _k, v in key[1])]

        own_dovecot.start()
        wait_for(lambda: http_get(admin_port, "/readyz")[1].startswith("ready\n"), "both back ends ready again")
        assert _stat(bridge.port, one.user, one.password)[0] == 1


def test_readiness_fails_only_when_no_back_end_answers(tmp_path: Path) -> None:
    admin_port, first, second = free_port(), free_port(), free_port()
    routes = (
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\nreadiness_cache_seconds = 0\n'
        f'[[routes]]\nmatch = "*@a.example"\nport = {first}\n'
    )
    with SubprocessBridge(tmp_path, second, routes):
        status, body, _ = http_get(admin_port, "/readyz")
        assert status == 503
        # Unnamed routes are route1, route2, ...; [upstream] is "default".
        assert body.splitlines()[0] == "no back end answers"
        assert body.splitlines()[1].startswith(f"backend route1 127.0.0.1:{first}: ")
        assert body.splitlines()[2].startswith(f"backend default 127.0.0.1:{second}: ")
