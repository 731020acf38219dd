"""OAuth2 upstream login end to end: a POP3 device with its password, the bridge with a token
store, a real Dovecot checking bearer tokens by introspection against the loopback OAuth2
provider (sandbox.oauth2). What the device reads, what the provider was asked, what the
store holds."""

from __future__ import annotations

import poplib
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.imap.bearer import xoauth2_response
from sandbox import DovecotSandbox
from sandbox.oauth2 import OAuth2Provider
from sandbox.seeding import numbered_messages
from tests.harness import (
    ENGINES,
    Pop3Client,
    RawPop3,
    ThreadedBridge,
    poplib_payload,
    retr_payload,
    wait_for_event,
)
from tests.oauth2_support import CLIENT_SECRET, DEVICE_PASSWORD, enrol, stored_record, stored_tokens
from tests.security_support import secret_forms

Bridge = Callable[..., ThreadedBridge]


@pytest.fixture
def account(oauth2_dovecot: DovecotSandbox, oauth2_provider: OAuth2Provider, oauth2_store: str):  # type: ignore[no-untyped-def]
    """A mailbox with two messages whose owner consented; enrolled with DEVICE_PASSWORD."""
    box = oauth2_dovecot.new_mailbox()
    box.append(list(numbered_messages(2)))
    enrol(oauth2_store, box.user, oauth2_provider.consent(box.user))
    yield box
    box.close()


def _login(bridge: ThreadedBridge, user: str, password: str) -> bytes:
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.command(b"USER " + user.encode())
        return pop.command(b"PASS " + password.encode())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mechanism", ["auto", "xoauth2", "oauthbearer"])
def test_a_device_logs_in_with_its_password_and_reads_its_mail(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_store: str, account, engine: str, mechanism: str  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory(upstream={"engine": engine}, oauth2={"mechanism": mechanism})
    stored = [m for m in numbered_messages(2)]
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2
        assert poplib_payload(pop.retr(1)[1]) == retr_payload(stored[0])
    expected = {"auto": "OAUTHBEARER", "xoauth2": "XOAUTH2", "oauthbearer": "OAUTHBEARER"}[mechanism]
    assert wait_for_event(bridge, "upstream_bearer_login", result="OK")["mechanism"] == expected
    # One refresh for the first login (nothing cached), and its token saved sealed.
    assert oauth2_provider.token_calls("refresh_token") == 1
    assert stored_tokens(oauth2_store, account.user).access_token


@pytest.mark.parametrize("engine", ENGINES)
def test_without_sasl_ir_the_initial_response_follows_the_servers_continuation(
    oauth2_bridge_factory: Bridge, account, engine: str  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory(upstream={"engine": engine, "ignore_capabilities": ["SASL-IR"]})
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2
    assert wait_for_event(bridge, "upstream_bearer_login", result="OK")["sasl_ir"] is False


def test_a_wrong_device_password_is_refused_and_counted_like_any_other(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, account  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory(login_limits={"failure_delay_seconds": 0, "account_block_after": 2})
    assert _login(bridge, account.user, "not the device password").startswith(b"-ERR [AUTH] ")
    event = wait_for_event(bridge, "login_failed", reason="credentials")
    assert event["oauth2"] == "wrong_password"
    # The failed-login limiter counts it: the account is blocked from this address now.
    assert _login(bridge, account.user, "still not it").startswith(b"-ERR [AUTH] ")
    assert _login(bridge, account.user, DEVICE_PASSWORD).startswith(b"-ERR [SYS/TEMP] too many failed logins")
    # Nothing reached the provider: the device password is checked by the bridge.
    assert oauth2_provider.token_calls() == 0


def test_an_account_nobody_enrolled_is_refused_as_a_wrong_password_would_be(
    oauth2_bridge_factory: Bridge, oauth2_dovecot: DovecotSandbox  # type: ignore[no-untyped-def]
) -> None:
    box = oauth2_dovecot.new_mailbox()
    bridge = oauth2_bridge_factory()
    # The upstream password is not the device password: it gets the device nothing either.
    assert _login(bridge, box.user, box.password) == b"-ERR [AUTH] invalid user name or password\r\n"
    assert wait_for_event(bridge, "login_failed", reason="credentials")["oauth2"] == "not_enrolled"


def test_the_access_token_is_reused_until_it_nears_its_expiry(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, account  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory(pool={"park_seconds": 0})
    for _ in range(3):
        with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
            pop.stat()
    assert oauth2_provider.token_calls() == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_an_expired_access_token_is_refreshed_once_and_the_login_retried(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_store: str, account, engine: str  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory(pool={"park_seconds": 0}, upstream={"engine": engine})
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        pop.stat()
    first = stored_tokens(oauth2_store, account.user).access_token
    # The provider ends every token's life early (its clock, not the bridge's): Dovecot sends
    # the error challenge, the bridge answers it, refreshes, and logs in with the new token.
    oauth2_provider.expire_access_tokens()
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2
    assert oauth2_provider.token_calls("refresh_token") == 2
    assert stored_tokens(oauth2_store, account.user).access_token != first
    challenged = [e for e in bridge.events() if e.get("event") == "upstream_bearer_login" and e.get("challenged")]
    assert challenged and challenged[0]["result"] == "NO"
    # No password, token or secret in the log (debug level), in any form sent on the wire.
    tokens = stored_tokens(oauth2_store, account.user)
    log = bridge.log.getvalue()
    for secret in (DEVICE_PASSWORD, CLIENT_SECRET, first, tokens.access_token, tokens.refresh_token):
        assert secret
        for form in (*secret_forms(secret), xoauth2_response(account.user, secret).decode()):
            assert form not in log


@pytest.mark.parametrize("rotation", ["keep-old", "strict"])
def test_a_rotated_refresh_token_is_saved_before_it_is_needed(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_store: str, account, rotation: str  # type: ignore[no-untyped-def]
) -> None:
    oauth2_provider.rotation = rotation
    enrolled = stored_tokens(oauth2_store, account.user).refresh_token
    bridge = oauth2_bridge_factory(pool={"park_seconds": 0})
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        pop.stat()
    rotated = stored_tokens(oauth2_store, account.user).refresh_token
    assert rotated != enrolled
    assert rotated in oauth2_provider.valid_refresh_tokens(account.user)
    assert (enrolled in oauth2_provider.valid_refresh_tokens(account.user)) == (rotation == "keep-old")
    # A bridge started afresh (nothing in memory) goes on with the saved one.
    bridge.stop()
    oauth2_provider.expire_access_tokens()
    again = oauth2_bridge_factory(pool={"park_seconds": 0})
    with Pop3Client(again.port, account.user, DEVICE_PASSWORD) as pop:
        assert pop.stat()[0] == 2


def test_a_revoked_grant_asks_for_re_enrolment(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_store: str, account  # type: ignore[no-untyped-def]
) -> None:
    oauth2_provider.revoke_user(account.user)
    bridge = oauth2_bridge_factory(pool={"park_seconds": 0})
    reply = _login(bridge, account.user, DEVICE_PASSWORD)
    assert reply == b"-ERR [AUTH] re-authorisation needed: the administrator must enrol this account again\r\n"
    assert wait_for_event(bridge, "oauth2_reenrolment_needed")["account"] == account.user
    record = stored_record(oauth2_store, account.user)
    assert record is not None and record.reenrolment is not None and record.reenrolment["reason"] == "invalid_grant"
    # Flagged: the next login does not ask the provider again, and says the same.
    assert _login(bridge, account.user, DEVICE_PASSWORD) == reply
    assert oauth2_provider.token_calls("refresh_token") == 1
    # A wrong password still gets the wrong-password answer, not the account's state.
    assert _login(bridge, account.user, "a wrong password") == b"-ERR [AUTH] invalid user name or password\r\n"


@pytest.mark.parametrize("outage", ["http503", "hang", "refused"])
def test_a_token_endpoint_that_is_down_or_slow_is_a_temporary_failure(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_store: str, account, outage: str  # type: ignore[no-untyped-def]
) -> None:
    overrides = {"token_url": "http://127.0.0.1:9/token"} if outage == "refused" else {}
    if outage != "refused":
        oauth2_provider.set_outage(outage)
    bridge = oauth2_bridge_factory(upstream={"timeout_seconds": 3}, oauth2=overrides)
    reply = _login(bridge, account.user, DEVICE_PASSWORD)
    assert reply.startswith(b"-ERR [SYS/TEMP] ")
    wait_for_event(bridge, "oauth2_token_endpoint_unavailable", account=account.user)
    # Not the device's fault: nothing counted against it, nothing flagged.
    record = stored_record(oauth2_store, account.user)
    assert record is not None and record.reenrolment is None
    oauth2_provider.set_outage(None)
    if outage != "refused":
        with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
            assert pop.stat()[0] == 2


def test_a_parked_connection_serves_only_the_same_device_password(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, account  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory()
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        pop.stat()
        pop.quit()
    wait_for_event(bridge, "pool_parked")
    assert _login(bridge, account.user, "wrong device password").startswith(b"-ERR [AUTH] ")
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        pop.stat()
    wait_for_event(bridge, "upstream_reused")
    assert oauth2_provider.token_calls() == 1


def test_a_changed_device_password_applies_at_the_next_login_without_a_restart(
    oauth2_bridge_factory: Bridge, oauth2_provider: OAuth2Provider, oauth2_store: str, account  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory()
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        pop.stat()
        pop.quit()
    wait_for_event(bridge, "pool_parked")
    # As `oauth2 enrol` again with another device password would (a new consent too).
    enrol(oauth2_store, account.user, oauth2_provider.consent(account.user), password="the new device password")
    assert _login(bridge, account.user, DEVICE_PASSWORD).startswith(b"-ERR [AUTH] ")
    with Pop3Client(bridge.port, account.user, "the new device password") as pop:
        assert pop.stat()[0] == 2
    assert not [e for e in bridge.events() if e.get("event") == "upstream_reused"]


def test_a_removed_account_cannot_log_in_at_its_next_login(
    oauth2_bridge_factory: Bridge, oauth2_store: str, account  # type: ignore[no-untyped-def]
) -> None:
    bridge = oauth2_bridge_factory()
    with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD) as pop:
        pop.stat()
        pop.quit()
    wait_for_event(bridge, "pool_parked")
    for record in Path(oauth2_store.removeprefix("file:")).glob("*.json"):
        record.unlink()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        with Pop3Client(bridge.port, account.user, DEVICE_PASSWORD):
            pass
