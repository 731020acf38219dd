"""The suite's own guards, shown to work: a test runs on the engine the suite was started
with (`--engine`), whatever BRIDGE_* variables the shell had; and a bridge that logs an error
event the test did not declare fails the test (a crash inside a session is never silent)."""

from __future__ import annotations

import os
import poplib
import subprocess
import sys
from collections.abc import Callable

import pytest

import tests.harness as harness
from sandbox import Mailbox, numbered_messages
from tests.harness import ThreadedBridge, bridge_settings
from tests.integration.test_e2e_cli import REPO


def _login(bridge: ThreadedBridge, mailbox: Mailbox) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
    pop.user(mailbox.user)
    pop.pass_(mailbox.password)
    return pop


def test_the_suites_engine_is_the_one_in_force(
    request: pytest.FixtureRequest, bridge_factory: Callable[..., ThreadedBridge], mailbox: Mailbox
) -> None:
    assert not [name for name in os.environ if name.upper().startswith("BRIDGE_")]
    bridge = bridge_factory()
    _login(bridge, mailbox).quit()
    engines = {event["engine"] for event in bridge.events() if event["event"] == "upstream_fresh"}
    assert engines == {request.config.getoption("engine")}


def test_a_bridge_variable_in_the_shell_does_not_change_what_tests_run() -> None:
    """Run the test above in a pytest of its own, under BRIDGE_UPSTREAM__ENGINE=aioimaplib:
    without the suite's clean environment it would run on aioimaplib and fail."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_suite_guards.py::test_the_suites_engine_is_the_one_in_force"],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "BRIDGE_UPSTREAM__ENGINE": "aioimaplib"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_a_session_that_crashes_fails_the_test(monkeypatch: pytest.MonkeyPatch, mailbox: Mailbox) -> None:
    mailbox.append(numbered_messages(1))

    async def crash(*_args: object) -> None:
        raise RuntimeError("a bug in the session")

    monkeypatch.setattr("bridge.session.retrieval.Retriever.retrieve", crash)
    bridge = ThreadedBridge(bridge_settings(mailbox.imap_port)).start()
    try:
        pop = _login(bridge, mailbox)
        with pytest.raises((poplib.error_proto, OSError)):
            pop.retr(1)  # the session ends: the client sees the connection close
        pop.close()
    finally:
        with pytest.raises(AssertionError, match="session_crashed"):
            bridge.stop()
    # Declared, the same event is accepted.
    monkeypatch.setattr(harness, "EXPECTED_ERRORS", frozenset({"session_crashed"}))
    harness._check_errors(bridge.events())
