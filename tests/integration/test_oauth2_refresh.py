"""One refresh at a time per account inside a process: many logins of one account needing a
token at once make one request to the (real, loopback) token endpoint, under strict
rotation where a second one would lose the account."""

from __future__ import annotations

import pytest
import trio

from bridge.config import load_settings
from bridge.oauth2.errors import DeviceLoginRefused
from bridge.oauth2.tokens import OAuth2Accounts
from sandbox.oauth2 import OAuth2Provider
from tests.oauth2_support import DEVICE_PASSWORD, enrol, oauth2_section, stored_tokens


def _accounts(provider: OAuth2Provider, store: str) -> OAuth2Accounts:
    settings = load_settings(None, {"upstream": {"auth": "oauth2", "timeout_seconds": 10}, "oauth2": oauth2_section(provider, store)})
    return OAuth2Accounts(lambda: settings)


async def test_concurrent_logins_of_one_account_refresh_once(oauth2_provider: OAuth2Provider, oauth2_store: str) -> None:
    oauth2_provider.rotation = "strict"
    enrol(oauth2_store, "alice@example.com", oauth2_provider.consent("alice@example.com"))
    accounts = _accounts(oauth2_provider, oauth2_store)
    tokens: list[str] = []

    async def log_in() -> None:
        tokens.append(await accounts.tokens("alice@example.com", DEVICE_PASSWORD).access_token())

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(log_in)
    assert oauth2_provider.token_calls() == 1
    assert len(set(tokens)) == 1 and len(tokens) == 8
    assert stored_tokens(oauth2_store, "alice@example.com").access_token == tokens[0]

    # Every session's server refused that token at once: still one refresh between them.
    async def rejected() -> None:
        tokens.append(await accounts.tokens("alice@example.com", DEVICE_PASSWORD).access_token(rejected=tokens[0]))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(rejected)
    assert oauth2_provider.token_calls() == 2
    assert len(set(tokens[8:])) == 1 and tokens[8] != tokens[0]


async def test_a_wrong_password_never_reaches_the_token_endpoint(oauth2_provider: OAuth2Provider, oauth2_store: str) -> None:
    enrol(oauth2_store, "bob@example.com", oauth2_provider.consent("bob@example.com"))
    accounts = _accounts(oauth2_provider, oauth2_store)
    with pytest.raises(DeviceLoginRefused) as refused:
        await accounts.tokens("bob@example.com", "a wrong password").access_token()
    assert refused.value.reason == "wrong_password"
    with pytest.raises(DeviceLoginRefused) as refused:
        await accounts.tokens("nobody@example.com", DEVICE_PASSWORD).access_token()
    assert refused.value.reason == "not_enrolled"
    assert oauth2_provider.token_calls() == 0
