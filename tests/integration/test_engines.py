"""The IMAP engines are chosen by `upstream.engine`, and only the chosen one is loaded: a
bridge serving with the trio engine never imports aioimaplib or trio-asyncio (nor opens their
asyncio loop), and one without OAuth2 logins never imports the token store's crypto library.
Checked on the real command line with Python's own import trace."""

from __future__ import annotations

import poplib
from pathlib import Path

import pytest

from sandbox import Mailbox, numbered_messages
from tests.harness import SubprocessBridge

LIBRARIES = ("aioimaplib", "trio_asyncio")


def imported(log: str) -> set[str]:
    """The top-level packages `-X importtime` reported importing."""
    found = set()
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            found.add(line.rsplit("|", 1)[1].strip().split(".", 1)[0])
    return found


@pytest.mark.parametrize(("engine", "loaded"), [("trio", False), ("aioimaplib", True)])
def test_only_the_configured_engine_is_imported(tmp_path: Path, mailbox: Mailbox, engine: str, loaded: bool) -> None:
    mailbox.append(numbered_messages(2))
    bridge = SubprocessBridge(
        tmp_path, mailbox.imap_port, env={"BRIDGE_UPSTREAM__ENGINE": engine}, interpreter_options=("-X", "importtime")
    )
    with bridge:
        pop = poplib.POP3("127.0.0.1", bridge.port, timeout=30)
        pop.user(mailbox.user)
        pop.pass_(mailbox.password)
        assert pop.stat()[0] == 2
        assert b"Subject" in b"\n".join(pop.retr(1)[1])
        pop.quit()
    modules = imported(bridge.log_path.read_text(errors="replace"))
    assert "trio" in modules and "bridge" in modules  # the trace works
    for library in LIBRARIES:
        assert (library in modules) is loaded, f"{library} imported={library in modules} with engine {engine}"
    # Password logins: the OAuth2 token store and its crypto library are never loaded.
    assert "cryptography" not in modules
