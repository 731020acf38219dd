"""OAuth2 across processes and against what can go wrong: two bridge processes sharing a real
Redis store refresh an account once between them; a copy of the store is useless without
the device password; the metrics and /readyz; Microsoft 365's failure without a challenge."""

from __future__ import annotations

import base64
import stat
import threading
from pathlib import Path

import pytest

from bridge.oauth2.records import AccountRecord, Keys, RecordDamaged, WrongPassword, derive_keys
from sandbox import DovecotSandbox
from sandbox.oauth2 import OAuth2Provider
from sandbox.redis import RedisSandbox
from sandbox.seeding import numbered_messages
from tests.harness import (
    ENGINES,
    Pop3Client,
    RawPop3,
    SubprocessBridge,
    ThreadedBridge,
    bridge_settings,
    free_port,
    wait_for_event,
)
from tests.imap_stub import StubConnection, StubImapServer, stub_settings
from tests.integration.ops_support import http_get, scrape, value, wait_for
from tests.integration.ops_support import wait_for_event as wait_for_process_event
from tests.oauth2_support import DEVICE_PASSWORD, enrol, oauth2_section, oauth2_toml, stored_tokens


def _bridge_process(workdir: Path, dovecot: DovecotSandbox, provider: OAuth2Provider, store: str, extra: str = "") -> SubprocessBridge:
    workdir.mkdir(exist_ok=True)
    return SubprocessBridge(
        workdir, dovecot.imap_port, oauth2_toml(provider, store) + extra,
        env={"BRIDGE_UPSTREAM__AUTH": "oauth2", "BRIDGE_LOGGING__LEVEL": "debug", "BRIDGE_POOL__PARK_SECONDS": "0"},
    )


def test_two_bridge_processes_sharing_redis_refresh_an_account_once(
    oauth2_dovecot: DovecotSandbox, oauth2_provider: OAuth2Provider, redis_server: RedisSandbox, tmp_path: Path
) -> None:
    # Strict rotation: a second refresh with the same refresh token would be refused (and the
    # account lost), so the test cannot pass by luck if both processes refreshed.
    oauth2_provider.rotation = "strict"
    box = oauth2_dovecot.new_mailbox()
    box.append(list(numbered_messages(2)))
    enrol(redis_server.url, box.user, oauth2_provider.consent(box.user))
    with (
        _bridge_process(tmp_path / "a", oauth2_dovecot, oauth2_provider, redis_server.url) as first,
        _bridge_process(tmp_path / "b", oauth2_dovecot, oauth2_provider, redis_server.url) as second,
    ):
        # The first token request is held at the provider until the other process is
        # waiting for the account's lock: the two refreshes are truly at once.
        oauth2_provider.hold_tokens()
        results: dict[str, int] = {}

        def log_in(name: str, bridge: SubprocessBridge) -> None:
            with Pop3Client(bridge.port, box.user, DEVICE_PASSWORD) as pop:
                results[name] = pop.stat()[0]

        threads = [threading.Thread(target=log_in, args=(n, b)) for n, b in (("first", first), ("second", second))]
        for thread in threads:
            thread.start()
        wait_for(lambda: oauth2_provider.token_calls() == 1, "the first token request")
        wait_for(
            lambda: any(e.get("event") == "oauth2_store_lock_busy" for b in (first, second) for e in b.events()),
            "the other process waiting for the account's lock",
        )
        oauth2_provider.release_tokens()
        for thread in threads:
            thread.join(60)
        assert results == {"first": 2, "second": 2}
        assert oauth2_provider.token_calls() == 1
        refreshed = [b for b in (first, second) for e in b.events() if e.get("event") == "oauth2_token_refreshed"]
        assert len(refreshed) == 1


def test_a_stolen_store_file_is_useless_without_the_device_password(
    oauth2_bridge_factory, oauth2_provider: OAuth2Provider, oauth2_dovecot: DovecotSandbox, oauth2_store: str  # type: ignore[no-untyped-def]
) -> None:
    box = oauth2_dovecot.new_mailbox()
    refresh_token = oauth2_provider.consent(box.user)
    enrol(oauth2_store, box.user, refresh_token)
    bridge = oauth2_bridge_factory()
    with Pop3Client(bridge.port, box.user, DEVICE_PASSWORD) as pop:
        pop.stat()
    access_token = stored_tokens(oauth2_store, box.user).access_token
    assert access_token
    directory = Path(oauth2_store.removeprefix("file:"))
    (stolen,) = directory.glob("*.json")
    data = stolen.read_bytes()
    # Neither token nor the device password is in the file, in any form a thief could use.
    for secret in (refresh_token, access_token, DEVICE_PASSWORD):
        assert secret.encode() not in data
    assert stat.S_IMODE(stolen.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    record = AccountRecord.loads(data)
    guess = derive_keys("a guessed password", record.kdf)
    with pytest.raises(WrongPassword):
        record.unseal(guess)
    # Skipping the verifier does not help: the sealing key is wrong too.
    with pytest.raises(RecordDamaged):
        record.unseal(Keys(record.verifier, guess.sealing, record.kdf.salt))


def test_metrics_count_refreshes_and_accounts_to_re_enrol_and_readyz_stays_ready(
    oauth2_dovecot: DovecotSandbox, oauth2_provider: OAuth2Provider, oauth2_store: str, tmp_path: Path
) -> None:
    admin = free_port()
    good, revoked = oauth2_dovecot.new_mailbox(), oauth2_dovecot.new_mailbox()
    for box in (good, revoked):
        enrol(oauth2_store, box.user, oauth2_provider.consent(box.user))
    oauth2_provider.revoke_user(revoked.user)
    with _bridge_process(tmp_path / "m", oauth2_dovecot, oauth2_provider, oauth2_store, f'[admin]\nlisten = "127.0.0.1:{admin}"\n') as bridge:
        with Pop3Client(bridge.port, good.user, DEVICE_PASSWORD) as pop:
            pop.stat()
        with RawPop3("127.0.0.1", bridge.port) as pop:
            pop.command(b"USER " + revoked.user.encode())
            assert pop.command(b"PASS " + DEVICE_PASSWORD.encode()).startswith(b"-ERR [AUTH] re-authorisation needed")
        wait_for_process_event(bridge, "oauth2_reenrolment_needed", account=revoked.user)
        samples = wait_for(lambda: (s := scrape(admin)) and value(s, "bridge_oauth2_refreshes_total", outcome="invalid_grant") == 1 and s, "the metrics")
        assert value(samples, "bridge_oauth2_refreshes_total", outcome="ok") == 1
        assert value(samples, "bridge_oauth2_accounts_needing_reenrolment") == 1
        assert value(samples, "bridge_login_failures_total", reason="reauthorisation") == 1
        # One account's dead grant (or the token endpoint) is no reason to take the bridge
        # out of a load balancer.
        oauth2_provider.set_outage("http503")
        assert http_get(admin, "/readyz")[0] == 200
        # No label names an account (bounded series).
        assert revoked.user not in http_get(admin, "/metrics")[1]


class _Microsoft365(StubImapServer):
    """Microsoft 365's shape, which no local server produces: XOAUTH2 with SASL-IR only, and
    a refused token answered `NO AUTHENTICATE failed.` at once, with no error challenge.
    The first `refuse` AUTHENTICATEs are refused (a token revoked meanwhile), later ones
    accepted."""

    capabilities = b"IMAP4rev1 AUTH=XOAUTH2 SASL-IR IDLE MOVE"

    def __init__(self, messages: list[bytes], refuse: int) -> None:
        super().__init__(messages)
        self.refuse = refuse
        self.tokens: list[str] = []
        self.other_lines = 0

    def answer(self, connection: StubConnection, tag: bytes, command: bytes) -> bytes | None:
        if command.upper().startswith(b"AUTHENTICATE XOAUTH2 "):
            sent = base64.b64decode(command.split(b" ")[2]).decode()
            fields = dict(part.split("=", 1) for part in sent.split("\x01") if "=" in part)
            self.tokens.append(fields["auth"].removeprefix("Bearer "))
            if len(self.tokens) <= self.refuse:
                return tag + b" NO AUTHENTICATE failed.\r\n"
            connection.user = fields["user"]
            return tag + b" OK [CAPABILITY " + self.capabilities + b"] AUTHENTICATE completed.\r\n"
        if not command or command in (b"*", b"AQ=="):
            self.other_lines += 1  # an answer to a challenge that was never sent
        return super().answer(connection, tag, command)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("refused", [1, 2])
def test_microsoft_365_refuses_without_a_challenge(oauth2_provider: OAuth2Provider, oauth2_store: str, engine: str, refused: int) -> None:
    """A stub: Microsoft's challenge-less NO is a shape no local server produces."""
    user = "alice@example.com"
    enrol(oauth2_store, user, oauth2_provider.consent(user))
    with _Microsoft365(list(numbered_messages(1)), refuse=refused) as stub:
        settings = bridge_settings(
            stub.port, upstream={**stub_settings(stub), "auth": "oauth2", "engine": engine},
            oauth2=oauth2_section(oauth2_provider, oauth2_store),
        )
        with ThreadedBridge(settings) as bridge:
            with RawPop3("127.0.0.1", bridge.port) as pop:
                pop.command(b"USER " + user.encode())
                reply = pop.command(b"PASS " + DEVICE_PASSWORD.encode())
                if refused == 1:
                    # The first token was refused, the bridge refreshed once and tried once more.
                    assert reply.startswith(b"+OK"), reply
                    assert pop.command(b"STAT") == b"+OK 1 %d\r\n" % len(next(numbered_messages(1)))
                else:
                    assert reply == b"-ERR [SYS/PERM] the mail server refused the bridge's authorisation for this account\r\n"
                    wait_for_event(bridge, "login_failed", reason="token_refused")
            assert len(stub.tokens) == 2 and stub.tokens[0] != stub.tokens[1]
            assert stub.other_lines == 0
            assert oauth2_provider.token_calls("refresh_token") == 2
