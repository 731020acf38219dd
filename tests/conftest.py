"""Shared fixtures: one real Dovecot for the whole run, a fresh mailbox per test.

Tests drive real clients (poplib, imaplib) against real servers. Nothing here
skips: if Dovecot is not installed, every test that needs it errors with a message
naming the Debian packages (scripts/install-deps installs them).
"""

from __future__ import annotations

import contextlib
import os
import poplib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import DovecotSandbox, Mailbox
from sandbox.cyrus import CyrusSandbox
from tests.harness import ENGINES

# poplib rejects lines over 2048 bytes; that is a client-side guard, not a POP3
# rule, and the test corpus deliberately has 20,000-byte lines.
poplib._MAXLINE = 1024 * 1024

_kept_workdirs = pytest.StashKey[list[Path]]()


@contextlib.contextmanager
def running_sandbox(
    make: Callable[[Path], DovecotSandbox | CyrusSandbox], prefix: str, request: pytest.FixtureRequest | None = None
) -> Iterator[DovecotSandbox | CyrusSandbox]:
    """A private server in a fresh temp dir, started, and stopped and removed afterwards.

    Not tmp_path_factory: as root its base (/tmp/pytest-of-root) is mode 0700, which the
    servers' unprivileged processes cannot get through. With `request`, a failed run keeps
    the directory (its log) for whoever investigates.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    sandbox = make(workdir)
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.stop()
        if request is not None and request.session.testsfailed:
            request.config.stash.setdefault(_kept_workdirs, []).append(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(request: pytest.FixtureRequest) -> Iterator[DovecotSandbox]:
    """One Dovecot (IMAP + POP3 on free loopback ports) for the whole test run."""
    with running_sandbox(DovecotSandbox, "bridge-dovecot-", request) as sandbox:
        yield sandbox


@pytest.fixture
def own_dovecot() -> Iterator[DovecotSandbox]:
    """A private Dovecot for tests that stop, restart or break it (the session's must live on)."""
    with running_sandbox(DovecotSandbox, "bridge-dovecot-own-") as sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def cyrus() -> Iterator[CyrusSandbox]:
    """One Cyrus IMAP (Debian cyrus-imapd) on a free loopback port, for the compatibility
    tests that re-run against every supported upstream (tests/integration/test_compat_*)."""
    with running_sandbox(CyrusSandbox, "bridge-cyrus-") as sandbox:
        yield sandbox


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine", choices=("trio", "aioimaplib"), default="trio",
        help="the IMAP engine the bridges of the suite use, unless a test names one (default: trio)",
    )


@pytest.fixture(autouse=True)
def clean_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without BRIDGE_* variables (they would override what it configures:
    the environment wins over a configuration), on the engine --engine names, expecting the
    error-level bridge events its bridge_errors marker declares and no other."""
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)
    import tests.harness as harness

    monkeypatch.setattr(harness, "DEFAULT_ENGINE", request.config.getoption("engine"))
    marker = request.node.get_closest_marker("bridge_errors")
    monkeypatch.setattr(harness, "EXPECTED_ERRORS", frozenset(marker.args) if marker else frozenset())


@pytest.fixture(params=ENGINES)
def on_every_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs once per engine; the bridges it starts use that one (the guarantees of
    docs/operators.md hold on both). Use it as `pytestmark = pytest.mark.usefixtures(...)`,
    or as an argument where a test needs the engine's name."""
    import tests.harness as harness

    monkeypatch.setattr(harness, "DEFAULT_ENGINE", request.param)
    return str(request.param)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for workdir in terminalreporter.config.stash.get(_kept_workdirs, []):
        terminalreporter.write_line(
            f"Dovecot sandbox kept for inspection: {workdir} (log: {workdir / 'dovecot.log'})"
        )


@pytest.fixture
def mailbox_factory(dovecot: DovecotSandbox) -> Iterator[Callable[[], Mailbox]]:
    """Make as many fresh mailboxes as a test needs."""
    made: list[Mailbox] = []

    def make() -> Mailbox:
        box = dovecot.new_mailbox()
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()


@pytest.fixture
def mailbox(mailbox_factory: Callable[[], Mailbox]) -> Mailbox:
    """A fresh user with an empty INBOX on the session's Dovecot."""
    return mailbox_factory()


@pytest.fixture
def native_pop3() -> Iterator[Callable[..., poplib.POP3]]:
    """``native_pop3(mailbox, login=True)``: Dovecot's own POP3 for ``mailbox``."""
    opened: list[poplib.POP3] = []

    def connect(box: Mailbox, *, login: bool = True) -> poplib.POP3:
        pop = box.native_pop3(login=login)
        opened.append(pop)
        return pop

    yield connect
    for pop in opened:
        with contextlib.suppress(Exception):
            pop.close()


# ---------------------------------------------------------------------------
# Bridge fixtures go below this line (owned by whoever writes the bridge
# fixture; the sandbox fixtures above do not depend on the bridge).
# ---------------------------------------------------------------------------


from tests.harness import ThreadedBridge, bridge_settings  # noqa: E402


@pytest.fixture
def bridge_factory(dovecot: DovecotSandbox) -> Iterator[Callable[..., ThreadedBridge]]:
    """``bridge_factory(**sections)``: a bridge on a free loopback port in front of the
    session's Dovecot; keyword arguments override config sections, e.g.
    ``bridge_factory(upstream={"fetch_chunk": 4096})``. Stopped at the end of the test."""
    started: list[ThreadedBridge] = []

    def start(**sections: dict[str, object]) -> ThreadedBridge:
        bridge = ThreadedBridge(bridge_settings(dovecot.imap_port, **sections)).start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


@pytest.fixture
def bridge(bridge_factory: Callable[..., ThreadedBridge]) -> ThreadedBridge:
    """The bridge with test defaults (debug JSON logs captured in ``bridge.log``)."""
    return bridge_factory()


# ---------------------------------------------------------------------------
# TLS (issue 5): certificates made by trustme, and a second Dovecot with TLS on.
# ---------------------------------------------------------------------------

from tests.security_support import TlsFiles, make_tls_files  # noqa: E402


@pytest.fixture(scope="session")
def tls_files() -> Iterator[TlsFiles]:
    """A test CA and, signed by it, a server certificate for localhost, 127.0.0.1 and ::1
    (the bridge's POP3 side) and one for 127.0.0.1 only (the TLS Dovecot), as PEM files."""
    workdir = Path(tempfile.mkdtemp(prefix="bridge-tls-"))
    try:
        yield make_tls_files(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_dovecot(tls_files: TlsFiles) -> Iterator[DovecotSandbox]:
    """A Dovecot with STARTTLS on its IMAP port and IMAPS on ``imaps_port``, its certificate
    naming 127.0.0.1 only (so "localhost" is a host-name mismatch)."""

    def make(workdir: Path) -> DovecotSandbox:
        return DovecotSandbox(workdir, tls_cert=tls_files.upstream_cert, tls_key=tls_files.upstream_key)

    with running_sandbox(make, "bridge-dovecot-tls-") as sandbox:
        yield sandbox


# ---------------------------------------------------------------------------
# OAuth2 (issue 15): an OAuth2 provider on loopback, a Dovecot that checks its bearer tokens
# (oauth2 passdb, introspection), a private Redis for the shared token store.
# ---------------------------------------------------------------------------

from sandbox.oauth2 import OAuth2Dovecot, OAuth2Provider  # noqa: E402
from sandbox.redis import RedisSandbox  # noqa: E402
from tests.oauth2_support import CLIENT_SECRET  # noqa: E402


@pytest.fixture(scope="session")
def oauth2_provider_server() -> Iterator[OAuth2Provider]:
    with OAuth2Provider(client_secret=CLIENT_SECRET) as provider:
        yield provider


@pytest.fixture
def oauth2_provider(oauth2_provider_server: OAuth2Provider) -> Iterator[OAuth2Provider]:
    """The session's OAuth2 provider, its behaviour back to the defaults for each test
    (confidential client, no rotation, one-hour access tokens, no outage)."""
    provider = oauth2_provider_server
    provider.client_secret = CLIENT_SECRET
    provider.rotation = "none"
    provider.access_lifetime = 3600.0
    provider.consent_user = ""
    provider.app_mailbox = ""
    provider.set_outage(None)
    provider.calls.clear()
    yield provider
    provider.set_outage(None)


@pytest.fixture(scope="session")
def oauth2_dovecot(request: pytest.FixtureRequest, oauth2_provider_server: OAuth2Provider) -> Iterator[DovecotSandbox]:
    """A Dovecot whose XOAUTH2/OAUTHBEARER logins are checked by the session's provider (and
    whose PLAIN/LOGIN logins use the users' passwords, for seeding and observing)."""

    def make(workdir: Path) -> DovecotSandbox:
        return OAuth2Dovecot(workdir, oauth2_provider_server.url)

    with running_sandbox(make, "bridge-dovecot-oauth2-", request) as sandbox:
        yield sandbox


@pytest.fixture
def oauth2_store(tmp_path: Path) -> str:
    """A file token store of the test's own."""
    return f"file:{tmp_path / 'oauth2-store'}"


@pytest.fixture
def redis_server() -> Iterator[RedisSandbox]:
    """A private redis-server on a free loopback port (stopped by its pid at the end)."""
    workdir = Path(tempfile.mkdtemp(prefix="bridge-redis-"))
    server = RedisSandbox(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def oauth2_bridge_factory(
    oauth2_dovecot: DovecotSandbox, oauth2_provider: OAuth2Provider, oauth2_store: str
) -> Iterator[Callable[..., ThreadedBridge]]:
    """``oauth2_bridge_factory(**sections)``: a bridge with upstream.auth = "oauth2" in front of
    the OAuth2 Dovecot, its [oauth2] pointing at the provider and the test's file store
    (``oauth2={...}`` overrides keys of that section)."""
    from tests.oauth2_support import oauth2_section

    started: list[ThreadedBridge] = []

    def start(**sections: dict[str, object]) -> ThreadedBridge:
        oauth2 = oauth2_section(oauth2_provider, oauth2_store, **sections.pop("oauth2", {}))
        upstream = {"auth": "oauth2", **sections.pop("upstream", {})}
        bridge = ThreadedBridge(bridge_settings(oauth2_dovecot.imap_port, upstream=upstream, oauth2=oauth2, **sections)).start()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()
